"""Bundles as OCI artifacts: push with ``oras``, pull back by digest with every byte checked.

An artifact is one layer, the bundle folder as an uncompressed tar (``application/vnd.weakrest.bundle.v1.tar``),
and a small JSON config (product, bundle version, created-at) so a registry's UI says what it holds.  Any
OCI registry takes it (Harbor, GitLab, a cloud registry, the reference ``docker-registry``).

Pulling trusts nothing on the way: the manifest's bytes must hash to the announced digest, the layer's bytes
to the digest the manifest names (streamed to disk, so a cut connection leaves only a ``.part`` file), its
size must be what the manifest says and at most ``max_bytes``, and the tar is unpacked with no member outside
its folder.  What comes out is then validated and signature-checked by the store like any bundle.

``oras`` retries a failed request itself, sleeping up to two minutes; the fleet agent has its own back-off
(and must hear of a newer release meanwhile), so the client here makes one attempt, with timeouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.bundle import MANIFEST, BundleError, load_bundle

BUNDLE_MEDIA_TYPE = "application/vnd.weakrest.bundle.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.weakrest.bundle.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_NAME = "bundle.tar"
_CHUNK = 1 << 16


class PullError(Exception):
    """A pull failed; ``retry`` says whether trying again later can help (a registry that is down: yes; bytes
    that do not match their digest, or an artifact that is not a bundle: no)."""

    retry = True


class RegistryUnavailable(PullError):
    """The registry could not be reached or broke off (connection refused, timeout, cut transfer, 5xx)."""


class DigestMismatch(PullError):
    retry = False


class NotABundle(PullError):
    retry = False


@dataclass(frozen=True)
class Pushed:
    reference: str  # host[:port]/path:tag as given
    repository: str  # host[:port]/path
    tag: str
    digest: str  # of the manifest: what stations pull by
    size: int  # bytes of the bundle layer


def split_reference(ref: str) -> tuple[str, str, str]:
    """``host[:port]/path:tag`` -> (host, path, tag); a ValueError names what is missing."""
    if "@" in ref:
        raise ValueError(f"{ref!r}: push to a tag (REGISTRY/PRODUCT:VERSION), not to a digest")
    host, sep, rest = ref.partition("/")
    if not sep or not rest or ("." not in host and ":" not in host and host != "localhost"):
        raise ValueError(f"{ref!r}: expected REGISTRY/PATH:VERSION with a registry host (e.g. "
                         "registry.plant:5000/weakrest/bracket:2026-12-04)")
    path, sep, tag = rest.rpartition(":")
    if not sep or not path or "/" in tag:
        raise ValueError(f"{ref!r}: no version tag (expected REGISTRY/PATH:VERSION)")
    return host, path, tag


def _registry(host: str, *, insecure: bool, ca: Path | None, username: str | None, password: str | None,
              timeout_s: float):
    """An ``oras`` registry client for ``host`` that makes one attempt per request, with timeouts."""
    import oras.provider
    import requests.adapters

    class _OneAttempt(oras.provider.Registry):
        do_request = oras.provider.Registry.do_request.__wrapped__  # oras' own retry sleeps minutes

    class _Timeout(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):  # type: ignore[override]
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = (timeout_s, timeout_s)
            return super().send(request, **kwargs)

    # token auth (Harbor, GitLab, cloud registries): the credentials are traded for a bearer token
    reg = _OneAttempt(hostname=host, insecure=insecure, tls_verify=str(ca) if ca is not None else True)
    for scheme in ("http://", "https://"):
        reg.session.mount(scheme, _Timeout())
    if username:
        reg.auth.set_basic_auth(username, password or "")
    return reg


def push_bundle(bundle_dir: str | os.PathLike, reference: str, *, insecure: bool = False, ca: Path | None = None,
                username: str | None = None, password: str | None = None, timeout_s: float = 60.0,
                verify: bool = True) -> Pushed:
    """Push a bundle folder to ``REGISTRY/PATH:TAG``; returns the manifest digest to announce.

    ``verify``: load the bundle first (hashes, arrays), so a broken bundle never reaches the registry."""
    import requests

    src = Path(bundle_dir)
    if not (src / MANIFEST).is_file():
        raise BundleError(str(src), f"not a bundle folder (no {MANIFEST})")
    if verify:
        load_bundle(src)
    host, path, tag = split_reference(reference)
    reg = _registry(host, insecure=insecure, ca=ca, username=username, password=password, timeout_s=timeout_s)
    manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="weakrest-push-") as tmp:
        layer = Path(tmp) / LAYER_NAME
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
            for item in sorted(src.rglob("*")):
                if item.is_file() and not item.is_symlink():
                    info = tar.gettarinfo(item, arcname=str(item.relative_to(src)))
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0  # the same bundle gives the same layer digest
                    with open(item, "rb") as fh:
                        tar.addfile(info, fh)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"product": manifest.get("product"),
                                      "bundle_version": manifest.get("bundle_version"),
                                      "created_at": manifest.get("created_at"),
                                      "schema_version": manifest.get("schema_version")}, sort_keys=True))
        annotations = {"org.opencontainers.image.version": tag,
                       "org.opencontainers.image.title": f"{manifest.get('product')} bundle"}
        if manifest.get("created_at"):
            annotations["org.opencontainers.image.created"] = str(manifest["created_at"])
        try:
            response = reg.push(target=f"{host}/{path}:{tag}", files=[f"{layer}:{BUNDLE_MEDIA_TYPE}"],
                                manifest_config=f"{config}:{CONFIG_MEDIA_TYPE}", manifest_annotations=annotations,
                                disable_path_validation=True, quiet=True)
        except requests.RequestException as exc:
            raise RegistryUnavailable(f"registry {host}: {_reason(exc)}") from None
        except ValueError as exc:  # oras: "Issue with <url>: <reason>"
            raise RegistryUnavailable(f"registry {host} refused the push: {exc}") from None
        size = layer.stat().st_size
    digest = response.headers.get("Docker-Content-Digest")
    if not digest:
        raise RegistryUnavailable(f"registry {host} did not say the manifest's digest (Docker-Content-Digest)")
    return Pushed(reference=reference, repository=f"{host}/{path}", tag=tag, digest=digest, size=size)


def pull_bundle(repository: str, digest: str, workdir: str | os.PathLike, *, registry: str | None = None,
                insecure: bool = False, ca: Path | None = None, username: str | None = None,
                password: str | None = None, timeout_s: float = 30.0, max_bytes: int = 1 << 30) -> Path:
    """Pull ``repository@digest`` into a fresh folder under ``workdir``; returns the unpacked bundle folder.

    ``registry``: a host[:port] to pull the same path from instead of the repository's own host.  Raises
    :class:`PullError` (``retry`` false for bytes that do not match, or an artifact that is not a bundle)."""
    import requests

    host, _, path = repository.partition("/")
    host = registry or host
    reg = _registry(host, insecure=insecure, ca=ca, username=username, password=password, timeout_s=timeout_s)
    container = reg.get_container(f"{host}/{path}@{digest}")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    where = f"{host}/{path}@{digest[:19]}"
    try:
        reg.auth.load_configs(container)
        response = reg.do_request(f"{reg.prefix}://{container.manifest_url(digest)}", "GET",
                                  headers={"Accept": MANIFEST_MEDIA_TYPE})
        _check_status(response, where, "manifest")
        raw = response.content
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise DigestMismatch(f"{where}: the manifest's bytes do not match the announced digest")
        layer = _bundle_layer(raw, where, max_bytes)
        part = work / f"{layer['digest'].split(':', 1)[1]}.part"
        try:
            _download(reg, container, layer, part, where)
            return _unpack(part, work)
        finally:
            part.unlink(missing_ok=True)  # nothing half-fetched or unchecked stays behind
    except requests.RequestException as exc:
        raise RegistryUnavailable(f"registry {host}: {_reason(exc)}") from None
    except ValueError as exc:  # oras: a 401 it cannot answer
        raise RegistryUnavailable(f"registry {host}: {exc}") from None


def _download(reg, container, layer: dict, part: Path, where: str) -> None:
    """Stream the layer to ``part``, hashing as it comes; its size and sha256 must be the manifest's."""
    h = hashlib.sha256()
    got = 0
    with reg.get_blob(container, layer["digest"], stream=True) as blob, open(part, "wb") as fh:
        _check_status(blob, where, "bundle layer")
        for chunk in blob.iter_content(chunk_size=_CHUNK):
            got += len(chunk)
            if got > layer["size"]:
                raise DigestMismatch(f"{where}: the bundle layer is longer than the {layer['size']} bytes the "
                                     "manifest says")
            h.update(chunk)
            fh.write(chunk)
    if got != layer["size"]:
        raise RegistryUnavailable(f"{where}: the transfer of the bundle layer stopped at {got} of "
                                  f"{layer['size']} bytes")
    if "sha256:" + h.hexdigest() != layer["digest"]:
        raise DigestMismatch(f"{where}: the bundle layer's bytes do not match its digest {layer['digest']} "
                             "(altered in the registry or on the way)")


def _reason(exc: Exception) -> str:
    """One line for a requests error (they nest urllib3's, which repeat the URL three times)."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.ConnectionError) and "refused" in text.lower():
        return "connection refused (is the registry running?)"
    if isinstance(exc, requests.ConnectionError) and any(w in text for w in ("aborted", "reset", "RemoteDisconnected")):
        return "the connection was closed before an answer (registry restarting or a proxy cutting it?)"
    if isinstance(exc, requests.Timeout):
        return f"no answer in time ({type(exc).__name__})"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off during the transfer"
    return f"{type(exc).__name__}: {text[:200]}"


def _check_status(response, where: str, what: str) -> None:
    code = response.status_code
    if code == 200:
        return
    detail = ""
    try:
        errors = response.json().get("errors") or []
        detail = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))
    except ValueError:
        pass
    text = f"{where}: the registry answered {code} {response.reason or ''} for the {what}"
    text = f"{text.rstrip()} ({detail})" if detail else text.rstrip()
    if code in (400, 415):
        raise NotABundle(text)
    raise RegistryUnavailable(text)  # 404 (not replicated yet), 401/403 (credentials being fixed), 5xx


def _bundle_layer(raw: bytes, where: str, max_bytes: int) -> dict:
    try:
        manifest = json.loads(raw)
        layers = manifest["layers"]
        ours = [x for x in layers if x.get("mediaType") == BUNDLE_MEDIA_TYPE]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise NotABundle(f"{where}: not an OCI image manifest") from None
    if len(ours) != 1:
        kinds = ", ".join(str(x.get("mediaType")) for x in layers if isinstance(x, dict)) or "none"
        raise NotABundle(f"{where}: not a weakrest bundle (expected one {BUNDLE_MEDIA_TYPE} layer; layers: {kinds})")
    layer = ours[0]
    digest, size = layer.get("digest"), layer.get("size")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or not isinstance(size, int) or size < 0:
        raise NotABundle(f"{where}: the bundle layer has no sha256 digest and size")
    if size > max_bytes:
        raise NotABundle(f"{where}: the bundle layer is {size / 1e6:.1f} MB, more than the {max_bytes / 1e6:.1f} MB "
                         "allowed (fleet.max_bundle_mb)")
    return layer


def _unpack(tar_path: Path, work: Path) -> Path:
    """Unpack the layer into a new folder under ``work``: regular files and folders only, none outside it."""
    out = Path(tempfile.mkdtemp(prefix="bundle-", dir=work))
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise NotABundle(f"{LAYER_NAME}: unsafe member {member.name!r} in the bundle layer")
            tar.extractall(out, filter="data")
    except tarfile.TarError as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise NotABundle(f"{LAYER_NAME}: not a readable tar archive ({exc})") from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
