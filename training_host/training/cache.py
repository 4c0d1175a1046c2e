"""On-disk cache of the fit stages that a variant does not change, for experiment sweeps.

A sweep over Swin settings refits the same bank from the same backbone features and rebuilds the same
residual fields every time; together that is most of a fit.  :class:`FitCache` keeps them, keyed by
everything that produced them:

- ``features``: the backbone features (PCFs and retrieval descriptors) of one list of images, keyed by
  the backbone settings, the input size, the position-code weight and the sha256 of every image;
- ``residuals``: the good and synthetic residual fields (with block labels and the synthetic preview),
  keyed by the bank images' features key and every setting except the Swin's own training
  hyperparameters (see :data:`SWIN_TRAINING_ONLY`).

A changed setting or image gives a new key, so a stale entry is never read; entries are written
atomically (a temporary file, then a rename) in safetensors with their key material as JSON metadata,
and an entry that cannot be read is logged and recomputed.  Off unless a cache folder is given
(``weakrest-train fit --cache DIR``, ``tools/sweep.py``): a production fit recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from edge_runtime.core.bundle import sha256_of
from training_host.config import ProductConfig

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is stored under a key changes
# Swin settings that only steer training: residual fields do not depend on them
SWIN_TRAINING_ONLY = frozenset({
    "embed_dim", "depth", "heads", "window", "mlp_ratio", "train_window", "window_stride", "position_embedding",
    "log_input", "magnitude_skip", "boundary_ignore", "steps", "finetune_steps", "batch_size", "lr", "finetune_lr",
    "weight_decay",
    "warmup_steps", "ema", "focal_alpha", "focal_gamma", "region_balance", "mask_ratio", "jitter", "defect_fraction",
    "defect_transplants", "finetune_objective", "members", "checkpoint_every",
})


def digest(material: Any) -> str:
    """A short stable hash of JSON-able key material."""
    text = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def images_digest(paths: list[Path]) -> str:
    """sha256 over the images' contents (not their names or times: a copied dataset still hits)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_of(p).encode("ascii"))
    return h.hexdigest()[:24]


def features_key(cfg: ProductConfig, paths: list[Path], shift: tuple[int, int] = (0, 0)) -> str:
    """``shift``: the images moved that many pixels down and right (scoring.frame_shift); the unmoved images'
    key is the one it always was."""
    b = cfg.backbone
    weights = sha256_of(Path(b.weights)) if b.weights else None
    raw = {"format": FORMAT, "kind": "features", "backbone": b.model_dump(mode="json"),
           "weights_sha256": weights, "input_size": list(cfg.input_size),
           "lambda_p": cfg.posfar.lambda_p, "images": images_digest(paths), "n": len(paths)}
    if shift != (0, 0):
        raw["shift"] = list(shift)
    return digest(raw)


def residuals_key(cfg: ProductConfig, bank_features_key: str) -> str:
    raw = cfg.model_dump(mode="json")
    raw["swin"] = {k: v for k, v in raw["swin"].items() if k not in SWIN_TRAINING_ONLY}
    for unrelated in ("product", "profile", "latency_budget_ms", "weak", "scoring"):
        raw.pop(unrelated, None)
    raw["threshold"] = {"holdout_fraction": raw["threshold"]["holdout_fraction"]}  # decides the bank
    return digest({"format": FORMAT, "kind": "residuals", "bank_features": bank_features_key, "config": raw})


class FitCache:
    """A folder of cached fit stages: ``<root>/<kind>/<key>.safetensors``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def load(self, kind: str, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, metadata) of a stored entry, or None (a miss; an unreadable entry is also a miss)."""
        path = self._path(kind, key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:  # one read: tensors and metadata
                arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("cache entry %s unreadable (%s): recomputing", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        log.info("cache hit: %s %s", kind, key)
        return arrays, meta

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
        """Store an entry atomically; a failure to write is logged, never fatal (it is only a cache)."""
        path = self._path(kind, key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                      metadata={"meta": json.dumps(meta or {}, default=str)})
            os.replace(tmp, path)
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("cache entry %s not written (%s)", path, exc)
            tmp.unlink(missing_ok=True)
