"""Folder: the same small-file operations on a local directory and on an S3 prefix (real S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dip_scale.data.storage import Folder


@pytest.fixture(params=["local", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> Folder:
    if request.param == "local":
        return Folder(str(tmp_path / "root"))
    s3_server = request.getfixturevalue("s3_server")
    return Folder(s3_server.fresh_url("storage"))


def test_write_read_list_delete(folder: Folder) -> None:
    assert folder.is_empty()
    assert not folder.exists("a/b.json")
    folder.write_json("a/b.json", {"x": 1})
    folder.write_bytes("a/c/d.bin", b"\x00\x01")
    folder.write_bytes("ab.txt", b"sibling")
    assert not folder.is_empty()
    assert folder.exists("a/b.json")
    assert folder.read_json("a/b.json") == {"x": 1}
    assert folder.read_bytes("a/c/d.bin") == b"\x00\x01"
    assert folder.list() == ["a/b.json", "a/c/d.bin", "ab.txt"]
    assert folder.list("a/") == ["a/b.json", "a/c/d.bin"]
    assert folder.list("a") == ["a/b.json", "a/c/d.bin", "ab.txt"]  # a string prefix, as in S3
    folder.delete_tree("a")
    assert folder.list() == ["ab.txt"]
    folder.delete_tree("missing")  # not an error


def test_download(folder: Folder, tmp_path: Path) -> None:
    folder.write_bytes("x.bin", b"payload")
    folder.download("x.bin", str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == b"payload"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        folder.download("nope.bin", str(tmp_path / "other"))


def test_missing_file_names_its_url(folder: Folder) -> None:
    with pytest.raises(FileNotFoundError, match=f"{folder.url}/missing.json"):
        folder.read_bytes("missing.json")


def test_bad_json_names_the_file(folder: Folder) -> None:
    folder.write_bytes("bad.json", b"{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        folder.read_json("bad.json")


def test_prefix_does_not_leak_into_sibling_prefixes(s3_server) -> None:
    base = s3_server.fresh_url("siblings")
    Folder(base + "256").write_bytes("index.json", b"{}")
    assert Folder(base).is_empty()
    assert Folder(base).list() == []


def test_missing_bucket_is_reported(s3_server) -> None:
    with pytest.raises(FileNotFoundError, match="no such bucket 'no-such-bucket'"):
        Folder("s3://no-such-bucket/x").read_bytes("dataset.json")


@pytest.mark.parametrize("url,message", [("gs://bucket/x", "unsupported URL scheme"), ("s3://", "no bucket"),
                                         ("", "empty folder URL")])
def test_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Folder(url)
