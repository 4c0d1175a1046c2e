"""Signed bundles: who made a bundle, not only whether its files are intact.

The manifest's hashes prove integrity; anyone who can write a folder can still make a bundle that passes them.
A signature proves origin.  The format is OpenSSF ``model-signing``'s own-key mode: a standard Sigstore
bundle (``bundle.sig``, a DSSE envelope over an in-toto statement that lists the SHA-256 of *every* file of
the bundle directory) signed with an ECDSA P-256 key.  ``model_signing`` verifies it offline; no Sigstore
service is contacted.  (``model-signing`` takes elliptic-curve keys, not Ed25519: using the standard format
that other tools verify was worth more than the curve.)

Keys: ``weakrest-train keys new`` writes ``<name>.key`` (PKCS#8 PEM, mode 0600, never inside a bundle) and
``<name>.pub``.  The edge trusts the public keys in one directory (``bundles.trust_store``): every ``*.pub``
there.  Rotation = put the new public key beside the old one, re-sign or replace the bundles, then remove the
old key; revocation = remove a key: bundles signed only by it are refused from then on (``add``,
``activate``, ``reload`` and start; the bundle being served keeps serving until the next switch).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .bundle import BundleError

log = logging.getLogger(__name__)

SIGNATURE = "bundle.sig"
PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"
_PRIVATE_MARKERS = (b"PRIVATE KEY-----",)


class SignatureError(BundleError):
    """A bundle's signature is missing, unreadable, from an untrusted key, or does not match its files."""

    def __init__(self, problem: str) -> None:
        Exception.__init__(self, problem)  # the message names the bundle itself
        self.file, self.problem = SIGNATURE, problem


def new_key_pair(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (mode 0600) and ``<name>.pub`` into ``out_dir``; refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: expected a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{name}{PRIVATE_SUFFIX}", out / f"{name}{PUBLIC_SUFFIX}"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists: choose another --name (keys are never overwritten)")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private, 0o600)  # whatever the umask said
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _hashing(bundle_dir: Path):
    from model_signing import hashing

    # the signature file is not part of what it signs
    return hashing.Config().set_ignored_paths(paths=[bundle_dir / SIGNATURE])


def sign_bundle(bundle_dir: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Sign every file of ``bundle_dir`` into ``bundle_dir/bundle.sig``; returns its path.

    Refuses a key that lies inside the bundle and a bundle holding anything that looks like a private key."""
    from model_signing import signing

    root, key = Path(bundle_dir).resolve(), Path(private_key).resolve()
    if not (root / "manifest.json").is_file():
        raise SignatureError(f"{root}: not a bundle (no manifest.json)")
    if key == root or root in key.parents:
        raise SignatureError(f"{key}: the private key must not be inside the bundle it signs")
    if not key.is_file():
        raise SignatureError(f"{key}: no such private key file (make one with: weakrest-train keys new)")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != SIGNATURE):
        with open(path, "rb") as f:
            head = f.read(4096)
        if any(marker in head for marker in _PRIVATE_MARKERS):
            raise SignatureError(f"{path}: looks like a private key; it must not be shipped in a bundle")
    signature = root / SIGNATURE
    try:
        signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(_hashing(root)).sign(
            root, signature)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"cannot sign {root} with {key}: {exc}") from None
    return signature


@dataclass(frozen=True)
class BundleTrust:
    """The edge's policy: ``require`` a signature from one of the public keys in ``store``.

    With ``require`` off, any intact bundle is served (the demo); a signature that is present is still
    checked when a trust store is given, and a bad one is refused: a forged signature is never a pass."""

    require: bool = False
    store: Path | None = None

    def keys(self) -> list[Path]:
        if self.store is None:
            return []
        if not self.store.is_dir():
            raise SignatureError(f"bundles.trust_store {self.store}: no such directory")
        return sorted(p for p in self.store.iterdir() if p.suffix == PUBLIC_SUFFIX and p.is_file())

    def check(self, bundle_dir: str | os.PathLike) -> str | None:
        """The trusted key (file name) that signed ``bundle_dir``, None when unsigned and not required.

        Raises :class:`SignatureError` naming the reason: unsigned, unreadable signature, a key that is not
        (or no longer) trusted, or files that do not match what was signed."""
        root = Path(bundle_dir)
        signature = root / SIGNATURE
        if not signature.is_file():
            if self.require:
                raise SignatureError(f"{root}: unsigned (no {SIGNATURE}) and bundles.require_signature is on; "
                                     "sign it with: weakrest-train sign --bundle DIR --key KEY")
            return None
        if self.store is None:
            if self.require:
                raise SignatureError("bundles.require_signature is on but bundles.trust_store is not set")
            return None
        keys = self.keys()
        if not keys:
            raise SignatureError(f"{root}: signed, but bundles.trust_store {self.store} holds no public key "
                                 f"(*{PUBLIC_SUFFIX})")
        return _verify(root, signature, keys)


def _verify(root: Path, signature: Path, keys: list[Path]) -> str:
    from model_signing import verifying

    mismatch: str | None = None
    for key in keys:
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing(root)).verify(
                root, signature)
            return key.name
        except ValueError as exc:
            text = str(exc)
            if text.startswith("Key mismatch"):
                continue  # signed by another key: try the next one
            if "Signature mismatch" in text or "Hash mismatch" in text or "files" in text.lower():
                mismatch = text
                break
            raise SignatureError(f"{root}: {SIGNATURE} is not a valid signature ({_short(text)})") from None
        except Exception as exc:  # a file that is not a Sigstore bundle at all (JSON, schema errors)
            raise SignatureError(f"{root}: {SIGNATURE} is not a readable signature "
                                 f"({type(exc).__name__}: {_short(str(exc))})") from None
    if mismatch is not None:
        raise SignatureError(f"{root}: files do not match the signature ({_describe_mismatch(mismatch)})")
    names = ", ".join(k.name for k in keys)
    raise SignatureError(f"{root}: signed by a key that is not in the trust store (trusted: {names})")


def _describe_mismatch(text: str) -> str:
    """model-signing's mismatch report, as the file names that changed, appeared or disappeared."""
    # the report is the str() of a list: its quotes may come escaped, depending on the digests' bytes
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)
    extra = re.findall(r"Extra files found in model \\?'[^'\\]*\\?': ([^\"'\\\]]+)", text)
    missing = re.findall(r"Missing files in model \\?'[^'\\]*\\?': ([^\"'\\\]]+)", text)
    parts = [f"{what}: {', '.join(names)}" for what, names in
             (("changed", changed), ("not signed", extra), ("missing", missing)) if names]
    return "; ".join(parts) or _short(text)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
