"""Tests of transforms.uri_io: bounded reads of local files and URIs, and relative paths resolved."""

from __future__ import annotations

import os

import pytest

from lpips_pipe.transforms import uri_io
from lpips_pipe.transforms.uri_io import read_local_file, resolve_against_file, resolve_path, unsupported_uri_scheme


# ----------------------------------------------------------------------------- bounded reads


def test_files_whose_stat_size_lies_are_read_at_most_cap_plus_one_bytes():
    # /proc files are regular files that stat as 0 bytes: the cap is enforced while reading.
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    with pytest.raises(uri_io.FileTooLargeError):
        read_local_file("/proc/self/status", 16)
    assert read_local_file("/proc/self/status", 1 << 20).startswith(b"Name:")
    reads = []

    def endless(size):
        reads.append(size)
        return b"x" * size

    with pytest.raises(uri_io.FileTooLargeError):
        uri_io.read_capped(endless, 3 * uri_io._READ_CHUNK)
    assert sum(reads) == 3 * uri_io._READ_CHUNK + 1


def test_read_uri_reads_local_paths_and_file_uris_bounded(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"12345")
    assert uri_io.read_uri(str(path), 5) == uri_io.read_uri("file://" + str(path), 5) == b"12345"
    with pytest.raises(uri_io.FileTooLargeError):
        uri_io.read_uri(str(path), 4)
    with pytest.raises(uri_io.NotARegularFileError):
        uri_io.read_uri(str(tmp_path), 5, fsspec_fallback=False)
    with pytest.raises(FileNotFoundError):
        uri_io.read_uri(str(tmp_path / "gone"), 5)


# ----------------------------------------------------------------------------- schemes


def test_unsupported_uri_scheme():
    assert unsupported_uri_scheme("/data/a.png") is None
    assert unsupported_uri_scheme("relative/a.png") is None
    assert unsupported_uri_scheme("file:///data/a.png") is None
    assert unsupported_uri_scheme("memory://a.png") is None  # fsspec's built-in in-memory filesystem
    assert "nope://" in unsupported_uri_scheme("nope://a/b.png")
    import importlib.util

    for uri, package in (("hf://datasets/org/name/a.png", "huggingface_hub"), ("https://example.invalid/a.png",
                                                                              "aiohttp")):
        reason = unsupported_uri_scheme(uri)
        if importlib.util.find_spec(package) is None:
            assert reason is not None and "\n" not in reason and uri.split(":")[0] in reason
        else:
            assert reason is None


def test_a_scheme_no_reader_knows_is_an_unsupported_uri_error():
    with pytest.raises(uri_io.UnsupportedUriError, match="nope://"):
        uri_io.read_uri("nope://a/b.png", 10)


# ----------------------------------------------------------------------------- relative paths


def test_resolve_against_file_on_object_stores():
    assert resolve_against_file("img/a.png", "gs://bucket/run/m.jsonl") == "gs://bucket/run/img/a.png"
    assert resolve_against_file("../a.png", "s3://bucket/run/meta/m.jsonl") == "s3://bucket/run/a.png"
    assert resolve_against_file("gs://other/a.png", "gs://bucket/m.jsonl") == "gs://other/a.png"


def test_resolve_against_file_locally_normalised_and_leaves_data_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_against_file("img/./a.png", "run/m.jsonl") == str(tmp_path / "run" / "img" / "a.png")
    assert resolve_against_file("../a.png", str(tmp_path / "run" / "m.jsonl")) == str(tmp_path / "a.png")
    assert resolve_against_file("/abs/../a.png", "run/m.jsonl") == "/abs/../a.png"
    assert resolve_against_file("data:image/png,xyz", "run/m.jsonl") == "data:image/png,xyz"
    assert resolve_against_file("", "run/m.jsonl") == ""
    assert resolve_against_file("b/../a.png", "file:///data/m.jsonl") == "file:///data/a.png"


def test_resolve_path_joins_to_a_folder_as_given_unless_asked_to_normalise():
    assert resolve_path("./a/../b.png", "/base") == os.path.join("/base", "./a/../b.png")
    assert resolve_path("./a/../b.png", "/base", normalise=True) == "/base/b.png"
    assert resolve_path("a/../b.png", "gs://bucket/data/") == "gs://bucket/data/a/../b.png"
    assert resolve_path("a/../b.png", "gs://bucket/data/", normalise=True) == "gs://bucket/data/b.png"
    assert resolve_path("a.png", "file:///base") == "file:///base/a.png"
    assert resolve_path("a.png", "") == "a.png"
