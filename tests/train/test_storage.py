"""The checkpoint stores: LocalStore and S3Store behave the same; S3Store retries transient failures and
throttling with backoff and gives up with StoreUnavailable when the store stays unreachable. The S3
server is real (moto on loopback); failures come from a proxy in front of it (tests/train/s3_proxy.py)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from botocore.exceptions import ClientError

from dip_scale.train.storage import LocalStore, Retry, S3Store, StoreUnavailable, open_store
from tests.train.s3_proxy import FaultyProxy

FAST = Retry(attempts=20, base_delay=0.02, max_delay=0.1)


@pytest.fixture
def proxy(s3_server, monkeypatch):
    with FaultyProxy(s3_server.endpoint_url) as p:
        monkeypatch.setenv("S3_ENDPOINT_URL", p.endpoint_url)
        yield p


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    s3_server = request.getfixturevalue("s3_server")
    return S3Store(s3_server.fresh_url("store"))


def test_stores_round_trip(store, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    store.upload(tmp_path / "a.bin", "checkpoints/step-1/state.pt")
    store.upload(tmp_path / "a.bin", "checkpoints/step-1/sharded/__0_0.distcp")
    store.write_text("checkpoints/step-2/manifest.json", "{}")
    store.write_text("latest", "step-2")
    assert store.read_text("latest") == "step-2"
    assert store.read_text("missing") is None
    assert sorted(store.list_dirs("checkpoints")) == ["step-1", "step-2"]
    assert sorted(store.list_files("checkpoints/step-1")) == ["sharded/__0_0.distcp", "state.pt"]
    store.download("checkpoints/step-1/state.pt", tmp_path / "got" / "state.pt")
    assert (tmp_path / "got" / "state.pt").read_bytes() == (tmp_path / "a.bin").read_bytes()
    store.delete_dir("checkpoints/step-1")
    assert store.list_dirs("checkpoints") == ["step-2"]
    assert store.list_files("checkpoints/step-1") == []


def test_open_store_picks_by_url(tmp_path, s3_server):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(s3_server.url("x")), S3Store)


def _in_thread(fn):
    """Run fn in a thread; returns a function that joins and returns its result (or raises its error)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001
            out["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def join(timeout=60):
        t.join(timeout)
        assert not t.is_alive(), "call did not return"
        if "error" in out:
            raise out["error"]
        return out.get("value")

    return join


def _wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("fault", ["down", "throttle"])
def test_transient_failures_are_retried(proxy, s3_url, tmp_path, caplog, fault):
    store = S3Store(s3_url, retry=FAST)
    (tmp_path / "f").write_bytes(b"x" * 4096)
    proxy.set(fault)
    with caplog.at_level(logging.WARNING, logger="dip_scale.train.storage"):
        join = _in_thread(lambda: store.upload(tmp_path / "f", "obj"))
        _wait_for(lambda: proxy.refused >= 3)
        proxy.set("up")
        join()
    assert store.read_text("obj") == "x" * 4096
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all("upload obj" in m for m in retries)
    if fault == "throttle":
        assert any("SlowDown" in m for m in retries), retries


def test_unreachable_store_raises_store_unavailable(proxy, s3_url):
    store = S3Store(s3_url, retry=Retry(attempts=3, base_delay=0.01, max_delay=0.01))
    proxy.set("down")
    with pytest.raises(StoreUnavailable, match="failed after 3 attempts"):
        store.list_dirs("checkpoints")
    assert proxy.refused >= 3


def test_stalled_store_times_out(proxy, s3_url):
    store = S3Store(s3_url, retry=Retry(attempts=2, base_delay=0.01, max_delay=0.01), timeout=0.5)
    proxy.set("stall")
    with pytest.raises(StoreUnavailable, match="failed after 2 attempts"):
        store.read_text("latest")


def test_missing_object_is_not_retried(proxy, s3_url, tmp_path, caplog):
    store = S3Store(s3_url, retry=FAST)
    with caplog.at_level(logging.WARNING, logger="dip_scale.train.storage"):
        with pytest.raises(ClientError):
            store.download("no/such/object", tmp_path / "x")
        assert store.read_text("no/such/object") is None
    assert not caplog.records
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()
