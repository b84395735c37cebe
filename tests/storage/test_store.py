"""The store interface on a local folder and on an S3 prefix (a real S3 server on loopback): the same
operations, the same errors; botocore's retries carry S3 through short outages and throttling, and a store
that stays unreachable is StoreUnavailable. Faults come from a proxy in front of the server (s3_proxy.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dip_scale.storage import LocalStore, NotFound, S3Store, StoreUnavailable, atomic_write, open_store
from tests.storage.s3_proxy import FaultyProxy


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("s3_server").fresh_url("store"))


@pytest.fixture
def proxy(s3_server, monkeypatch):
    with FaultyProxy(s3_server.endpoint_url) as p:
        monkeypatch.setenv("S3_ENDPOINT_URL", p.endpoint_url)
        yield p


def test_write_read_list_delete(store):
    assert store.is_empty()
    assert not store.exists("a/b.json")
    store.write_json("a/b.json", {"x": 1})
    store.write_bytes("a/c/d.bin", b"\x00\x01")
    store.write_text("ab.txt", "sibling")
    assert not store.is_empty()
    assert store.exists("a/b.json") and not store.exists("a")
    assert store.read_json("a/b.json") == {"x": 1}
    assert store.read_bytes("a/c/d.bin") == b"\x00\x01"
    assert store.read_text("ab.txt") == "sibling"
    assert store.list() == ["a/b.json", "a/c/d.bin", "ab.txt"]
    assert store.list("a/") == ["a/b.json", "a/c/d.bin"]
    assert store.list("a") == ["a/b.json", "a/c/d.bin", "ab.txt"]  # a string prefix, as in S3
    assert store.list_dirs() == ["a"] and store.list_dirs("a") == ["c"]
    assert store.file_sizes("a") == {"b.json": len(b'{\n "x": 1\n}\n'), "c/d.bin": 2}
    store.delete_tree("a")
    assert store.list() == ["ab.txt"]
    store.delete_tree("missing")  # not an error


def test_upload_download_round_trip(store, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    store.upload(tmp_path / "a.bin", "checkpoints/step-1/sharded/__0_0.distcp")
    store.download("checkpoints/step-1/sharded/__0_0.distcp", tmp_path / "got" / "x.bin")
    assert (tmp_path / "got" / "x.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()
    assert store.child("checkpoints").list_dirs() == ["step-1"]


def test_missing_is_not_found_naming_the_url(store, tmp_path):
    for call in (lambda: store.read_bytes("missing.json"), lambda: store.read_text("missing.json"),
                 lambda: store.download("missing.json", tmp_path / "x")):
        with pytest.raises(NotFound, match=f"{store.url}/missing.json"):
            call()
    assert not list(tmp_path.glob("*x*"))  # no partial download left behind
    with pytest.raises(FileNotFoundError):  # NotFound is a FileNotFoundError
        store.read_json("missing.json")


def test_bad_json_names_the_file(store):
    store.write_bytes("bad.json", b"{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        store.read_json("bad.json")


def test_open_store_picks_by_url(tmp_path, s3_server):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(s3_server.url("x")), S3Store)
    for url, message in [("gs://bucket/x", "unsupported URL scheme"), ("s3://", "no bucket"),
                         ("", "empty location")]:
        with pytest.raises(ValueError, match=message):
            open_store(url)


def test_s3_prefix_does_not_leak_into_sibling_prefixes(s3_server):
    base = s3_server.fresh_url("siblings")
    S3Store(base + "256").write_bytes("index.json", b"{}")
    assert S3Store(base).is_empty() and S3Store(base).list() == []


def test_missing_bucket_is_not_found(s3_server):
    with pytest.raises(NotFound, match="no such bucket"):
        S3Store("s3://no-such-bucket/x").read_bytes("dataset.json")


def test_access_denied_is_an_error_not_a_missing_object(s3_server, proxy):
    """A permissions problem must never read as 'missing' (an incomplete checkpoint, a fresh start)."""
    proxy.set("deny")
    store = S3Store(s3_server.fresh_url("denied"))
    with pytest.raises(PermissionError, match="access denied"):
        store.read_text("latest")
    with pytest.raises(PermissionError):
        store.exists("latest")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "d" / "f.json"
    atomic_write(target, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["f.json"]


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
def test_transient_failures_are_retried_by_botocore(proxy, s3_url, tmp_path, fault):
    store = S3Store(s3_url)
    (tmp_path / "f").write_bytes(b"x" * 4096)
    proxy.set(fault)
    join = _in_thread(lambda: store.upload(tmp_path / "f", "obj"))
    _wait_for(lambda: proxy.refused >= 3)
    proxy.set("up")
    join()
    assert store.read_text("obj") == "x" * 4096


def test_unreachable_store_raises_store_unavailable(proxy, s3_url, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    store = S3Store(s3_url)
    proxy.set("down")
    with pytest.raises(StoreUnavailable, match="failed after retries"):
        store.list_dirs("checkpoints")
    assert proxy.refused == 3


def test_stalled_store_times_out(proxy, s3_url, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("DIP_S3_READ_TIMEOUT", "0.5")
    store = S3Store(s3_url)
    proxy.set("stall")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.read_text("latest")
    assert time.monotonic() - start < 20


def test_missing_object_is_not_retried(proxy, s3_url, tmp_path):
    store = S3Store(s3_url)
    before = proxy.connections
    with pytest.raises(NotFound):
        store.download("no/such/object", tmp_path / "x")
    assert proxy.connections - before <= 1
    assert not list(Path(tmp_path).iterdir())


def test_checksums_off_for_custom_endpoints_unless_set(s3_server, monkeypatch):
    """S3-compatible stores reject boto3's new default checksums; the user's choice wins."""
    from dip_scale.storage import s3_compatible_defaults

    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")
    s3_compatible_defaults()
    import os

    assert os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_supported"
    client = S3Store(s3_server.fresh_url("ck")).client
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_supported"


def test_deletes_carry_content_md5_for_s3_compatible_stores(s3_server, tmp_path):
    """What checkpoint retention sends: DeleteObjects with Content-MD5 (which S3-compatible stores require) and
    none of the CRC32 headers botocore >= 1.36 adds; a real Uploader's retention deletes go through."""
    import base64
    import hashlib

    from dip_scale.checkpoint import Uploader, describe_files, write_manifest

    store = S3Store(s3_server.fresh_url("retention"))
    sent = []

    def capture(request, **_):
        sent.append((dict(request.headers), request.body))

    store.client.meta.events.register("before-send.s3.DeleteObjects", capture)
    uploader = Uploader(store, retry_pause=0.1)
    for step in (1, 2, 3):
        folder = tmp_path / f"step-{step:09d}"
        folder.mkdir()
        (folder / "state.pt").write_bytes(bytes([step]) * 100)
        text = write_manifest(folder, step, describe_files(folder, ["state.pt"]), "state.pt", {})
        uploader.files(step, folder, ["state.pt"])
        uploader.commit(step, text, keep_last=1, milestones=set())
    uploader.queue.join()
    assert store.list_dirs("checkpoints") == ["step-000000003"]
    assert sent, "no DeleteObjects request"
    for headers, body in sent:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert not [k for k in lowered if k.startswith("x-amz-checksum") or k.startswith("x-amz-sdk-checksum")]
        digest = base64.b64encode(hashlib.md5(body if isinstance(body, bytes) else body.encode()).digest())
        assert lowered["content-md5"] in (digest, digest.decode())
