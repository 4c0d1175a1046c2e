"""The edge bundle store: versions, atomic activation, refusal of broken bundles, rollback."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_runtime.store import BundleStore, StoreError


def test_add_activate_rollback(tmp_path, fitted):
    bundle, _ = fitted
    store = BundleStore(tmp_path / "store")
    v1 = store.add("demo", bundle, version="v1")
    v2 = store.add("demo", bundle, version="v2")
    assert store.versions("demo") == ["v1", "v2"] and store.current("demo") is None
    with pytest.raises(StoreError, match="no current bundle for product 'demo'"):
        store.current_path("demo")
    assert store.activate("demo", v1) is None
    assert store.activate("demo", v2) == "v1"
    assert store.current_path("demo").name == "v2" and store.previous("demo") == "v1"
    assert store.rollback("demo") == "v1"
    assert store.current("demo") == "v1" and store.previous("demo") == "v2"
    assert not list((tmp_path / "store" / "demo").glob(".*tmp")), "no temporary link left behind"
    with pytest.raises(StoreError, match="already in the store"):
        store.add("demo", bundle, version="v1")


def test_broken_bundle_is_refused_and_current_untouched(tmp_path, fitted):
    bundle, _ = fitted
    store = BundleStore(tmp_path / "store")
    store.activate("demo", store.add("demo", bundle, version="good"))
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["thresholds"]["image"] = "high"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="manifest.json"):
        store.add("demo", broken, version="bad")
    # a version that went bad inside the store cannot be activated either
    shutil.copytree(bundle, tmp_path / "store" / "demo" / "later")
    (tmp_path / "store" / "demo" / "later" / "arrays.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StoreError, match="arrays.safetensors"):
        store.activate("demo", "later")
    assert store.current("demo") == "good"
    with pytest.raises(StoreError, match="not a plain name"):
        store.activate("demo", "../good")
    with pytest.raises(StoreError, match="no such version"):
        store.activate("demo", "v9")
