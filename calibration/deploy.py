"""``list``, ``activate`` and ``rollback`` on the edge bundle store, then telling the service to reload.

The switch is the store's atomic ``current`` link, and only after the bundle passed the same validation
the service runs before serving one (:func:`~edge_runtime.core.pipeline.open_inspector`: hashes, arrays,
and one smoke run of each graph).  A refused version leaves ``current`` as it was.  Telling the service is
a separate, best-effort step (see :mod:`calibration.notify`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.core.bundle import BundleError
from edge_runtime.core.pipeline import open_inspector
from edge_runtime.publishing.command_auth import CommandAuth, read_secret
from edge_runtime.service.config import EdgeConfig, EdgeConfigError, load_edge_config
from edge_runtime.store import BundleStore, StoreError, VersionInfo

from .errors import CalibrationError
from .notify import ReloadOutcome, reload_over_mqtt, send_sighup


def validate_bundle(path: Path) -> None:
    """The store's validator: what the service checks before it serves a bundle (raises BundleError)."""
    open_inspector(path)


@dataclass
class Target:
    """Which store and product a command acts on, and the service config when one was given."""

    store: BundleStore
    product: str
    config: EdgeConfig | None = None

    @property
    def served_by_config(self) -> bool:
        """True when the configured service serves this store and product (so it is worth telling)."""
        if self.config is None:
            return False
        b = self.config.bundles
        return b.product == self.product and Path(b.store).resolve() == self.store.root.resolve()


def resolve_target(store: str | None, product: str | None, config: str | None,
                   need_product: bool = True) -> Target:
    """--store/--product, else the config's ``bundles.store``/``bundles.product``."""
    cfg = None
    if config is not None:
        try:
            cfg = load_edge_config(config)
        except EdgeConfigError as exc:
            raise CalibrationError(str(exc)) from None
    root = Path(store) if store else (cfg.bundles.store if cfg else None)
    name = product or (cfg.bundles.product if cfg else None)
    if root is None:
        raise CalibrationError("no store: give --store (or --config with bundles.store)")
    if need_product and name is None:
        raise CalibrationError("no product: give --product (or --config with bundles.product)")
    if not root.is_dir():
        raise CalibrationError(f"{root}: no such bundle store")
    return Target(BundleStore(root, trust=cfg.bundles.trust() if cfg is not None else None), name or "", cfg)


def list_versions(target: Target, all_products: bool) -> dict[str, list[VersionInfo]]:
    products = target.store.products() if all_products else [target.product]
    try:
        return {p: target.store.describe(p) for p in products}
    except StoreError as exc:
        raise CalibrationError(str(exc)) from None


def format_listing(listing: dict[str, list[VersionInfo]]) -> list[str]:
    lines = []
    for product, infos in listing.items():
        lines.append(f"{product}:" if infos else f"{product}: no versions")
        for v in infos:
            mark = "* current " if v.current else "  previous" if v.previous else "          "
            if v.problem:
                lines.append(f"  {mark} {v.version:<28} {v.problem}")
                continue
            thr = f"{v.threshold:.4g}" if isinstance(v.threshold, int | float) else "?"
            lines.append(f"  {mark} {v.version:<28} created {v.created_at}  threshold {thr:<8} "
                         f"refs {v.n_reference_images}  parent {v.parent or '-'}")
    return lines


def switch(target: Target, version: str | None) -> tuple[str | None, str]:
    """Activate ``version`` (``None``: roll back); returns (version before, version now current)."""
    store, product = target.store, target.product
    before = store.current(product) if store.product_dir(product).is_dir() else None
    try:
        if version is None:
            now = store.rollback(product, validate=validate_bundle)
        else:
            store.activate(product, version, validate=validate_bundle)
            now = version
    except (StoreError, BundleError) as exc:
        raise CalibrationError(f"{exc}; current is still {before or 'unset'}") from None
    return before, now


def tell_service(target: Target, version: str, pid: int | None, timeout_s: float) -> ReloadOutcome | None:
    """Ask the service to reload (SIGHUP to ``pid`` and/or MQTT per the config); None when nothing to tell."""
    cfg = target.config
    if pid is not None:
        problem = send_sighup(pid)
        if problem is not None:
            return ReloadOutcome("sighup", version, False, f"SIGHUP not delivered: {problem}")
        if cfg is None:
            return ReloadOutcome("sighup", version, False, f"SIGHUP sent to pid {pid}; not confirmed (give --config "
                                                           "to watch the service's status)")
        return reload_over_mqtt(cfg.mqtt, version, timeout_s, send_command=False)
    if cfg is None:
        return None
    if not target.served_by_config:
        return ReloadOutcome("mqtt", version, False, f"the configured service serves {cfg.bundles.product} from "
                                                     f"{cfg.bundles.store}, not {target.product} from "
                                                     f"{target.store.root}: not told to reload")
    auth = None
    if cfg.commands.require_auth and cfg.commands.secret_file is not None:
        try:
            auth = CommandAuth(read_secret(cfg.commands.secret_file), cfg.commands.max_age_s)
        except ValueError as exc:
            return ReloadOutcome("mqtt", version, False, f"cannot sign the reload command: {exc}")
    return reload_over_mqtt(cfg.mqtt, version, timeout_s, command_auth=auth)
