"""Signed bundles (OpenSSF model-signing, own-key mode): keys, signing, the edge's trust store and policy at
add, activate, reload and start; key rotation and revocation; calibration and training sign what they make."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from calibration.cli import main as calibrate_main
from edge_runtime.core.signing import SIGNATURE, BundleTrust, SignatureError, new_key_pair, sign_bundle
from edge_runtime.service.config import parse_edge_config
from edge_runtime.service.runner import EdgeService, ServiceError
from edge_runtime.store import BundleStore, StoreError
from training_host.cli import main as train_main


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """Two key pairs of the plant (``a``, ``b``), one of a stranger; the edge trusts ``a`` only."""
    made = {}
    for name, where in (("a", "plant"), ("b", "plant"), ("stranger", "elsewhere")):
        made[f"{name}.key"], made[f"{name}.pub"] = new_key_pair(tmp_path / where, name)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(made["a.pub"], trusted)
    made["trusted"] = trusted
    return made


@pytest.fixture
def bundle(tmp_path, fitted_slice) -> Path:
    """A private copy of the small distance-only bundle (tests sign and tamper with it)."""
    copy = tmp_path / "bundle"
    shutil.copytree(fitted_slice[0], copy)
    return copy


def test_keys_new_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert train_main(["keys", "new", "--out", str(tmp_path / "k"), "--name", "line3-2026"]) == 0
    private, public = tmp_path / "k" / "line3-2026.key", tmp_path / "k" / "line3-2026.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert "line3-2026.pub" in capsys.readouterr().out
    assert train_main(["keys", "new", "--out", str(tmp_path / "k"), "--name", "line3-2026"]) == 2
    assert "exists" in capsys.readouterr().err and private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY")


def test_signature_proves_origin_and_every_file(bundle, keys):
    trust = BundleTrust(require=True, store=keys["trusted"])
    with pytest.raises(SignatureError, match="unsigned"):
        trust.check(bundle)
    assert BundleTrust(require=False, store=keys["trusted"]).check(bundle) is None  # the demo's policy

    sign_bundle(bundle, keys["a.key"])
    assert trust.check(bundle) == "a.pub"
    statement = json.loads((bundle / SIGNATURE).read_text())
    assert statement["mediaType"].startswith("application/vnd.dev.sigstore.bundle")

    sign_bundle(bundle, keys["stranger.key"])
    with pytest.raises(SignatureError, match="signed by a key that is not in the trust store"):
        trust.check(bundle)

    sign_bundle(bundle, keys["a.key"])
    manifest = bundle / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original + b" ")
    with pytest.raises(SignatureError, match="files do not match the signature.*changed: manifest.json"):
        trust.check(bundle)
    manifest.write_bytes(original)
    (bundle / "extra.onnx").write_bytes(b"not signed")
    with pytest.raises(SignatureError, match="not signed: extra.onnx"):
        trust.check(bundle)
    (bundle / "extra.onnx").unlink()
    assert trust.check(bundle) == "a.pub"

    (bundle / SIGNATURE).write_text("{not json")
    with pytest.raises(SignatureError, match="not a valid signature|not a readable signature"):
        trust.check(bundle)
    empty = keys["trusted"].parent / "no-keys"
    empty.mkdir()
    with pytest.raises(SignatureError, match="holds no public key"):
        BundleTrust(require=True, store=empty).check(bundle)


def test_a_private_key_never_goes_into_a_bundle(bundle, keys):
    inside = bundle / "a.key"
    shutil.copy(keys["a.key"], inside)
    with pytest.raises(SignatureError, match="must not be inside the bundle"):
        sign_bundle(bundle, inside)
    with pytest.raises(SignatureError, match="looks like a private key"):
        sign_bundle(bundle, keys["a.key"])
    assert not (bundle / SIGNATURE).exists()


def test_store_refuses_unsigned_and_untrusted_bundles_at_add_and_activate(tmp_path, bundle, keys):
    store = BundleStore(tmp_path / "store", trust=BundleTrust(require=True, store=keys["trusted"]))
    with pytest.raises(StoreError, match="refused .*unsigned"):
        store.add("demo", bundle, version="v1")
    sign_bundle(bundle, keys["stranger.key"])
    with pytest.raises(StoreError, match="not in the trust store"):
        store.add("demo", bundle, version="v1")
    sign_bundle(bundle, keys["a.key"])
    store.activate("demo", store.add("demo", bundle, version="v1"))
    # a version changed on disk after it was added is refused when someone tries to activate it
    plain = BundleStore(store.root)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(bundle, unsigned)
    (unsigned / SIGNATURE).unlink()
    plain.add("demo", unsigned, version="v2")  # a store without the policy lets it in ...
    with pytest.raises(StoreError, match="refused to activate demo@v2: .*unsigned"):
        store.activate("demo", "v2")  # ... the line's policy does not let it serve
    assert store.current("demo") == "v1"


def _service(tmp_path: Path, store: BundleStore, trusted: Path) -> EdgeService:
    cfg = parse_edge_config({
        "bundles": {"store": str(store.root), "product": "demo", "require_signature": True,
                    "trust_store": str(trusted)},
        "camera": {"source": "replay", "replay": {"path": str(tmp_path)}},
        "mqtt": {"port": 1, "topic_prefix": "plant/line/st1"},  # never reached: nothing is published here
        "queue": {"dir": str(tmp_path / "queue")}, "health": {"port": 0}, "threads": 1,
    })
    return EdgeService(cfg)


def test_service_serves_only_trusted_bundles_with_rotation_and_revocation(tmp_path, bundle, keys):
    root = tmp_path / "store"
    plain = BundleStore(root)  # the files as an attacker with write access could arrange them
    unsigned = tmp_path / "unsigned"
    shutil.copytree(bundle, unsigned)
    plain.activate("demo", plain.add("demo", unsigned, version="v0"))
    with pytest.raises(ServiceError, match="bundle refused: .*unsigned"):
        _service(tmp_path, plain, keys["trusted"])  # start

    for version, key in (("v1", "a.key"), ("v2", "b.key"), ("v3", "stranger.key")):
        signed = tmp_path / version
        shutil.copytree(bundle, signed)
        sign_bundle(signed, keys[key])
        plain.add("demo", signed, version=version)
    plain.activate("demo", "v1")
    service = _service(tmp_path, plain, keys["trusted"])
    try:
        assert service.served.version == "v1"
        # reload to a bundle signed by a key the edge does not trust: refused, v1 keeps serving
        plain.activate("demo", "v3")
        with pytest.raises(ServiceError, match="not in the trust store"):
            service.switch()
        assert service.served.version == "v1"

        # rotation: trust b beside a, move to the b-signed bundle, then drop a
        shutil.copy(keys["b.pub"], keys["trusted"])
        plain.activate("demo", "v2")
        assert service.switch().version == "v2" and service.served.version == "v2"
        (keys["trusted"] / "a.pub").unlink()

        # revocation: a is no longer trusted, so its bundle cannot come back; v2 keeps serving
        plain.activate("demo", "v1")
        with pytest.raises(ServiceError, match="not in the trust store"):
            service.switch()
        assert service.served.version == "v2"
    finally:
        service.stop(flush_timeout_s=0.1)


def test_calibration_and_training_sign_what_they_make(tmp_path, fitted_slice, demo_data, keys):
    out = tmp_path / "cal"
    assert calibrate_main(["fit", "--base", str(fitted_slice[0]), "--images", str(demo_data / "train" / "good"),
                           "--out", str(out), "--version", "cal1", "--sign-key", str(keys["a.key"])]) == 0
    assert BundleTrust(require=True, store=keys["trusted"]).check(out) == "a.pub"
    # the store of a line that requires signatures takes it
    store = BundleStore(tmp_path / "store", trust=BundleTrust(require=True, store=keys["trusted"]))
    store.activate("demo", store.add("demo", out, version="cal1"))

    copy = tmp_path / "host-bundle"
    shutil.copytree(fitted_slice[0], copy)
    assert train_main(["sign", "--bundle", str(copy), "--key", str(keys["a.key"])]) == 0
    assert BundleTrust(require=True, store=keys["trusted"]).check(copy) == "a.pub"
    assert train_main(["sign", "--bundle", str(copy), "--key", str(tmp_path / "missing.key")]) == 2
