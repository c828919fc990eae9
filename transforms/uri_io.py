"""Bounded reads of local files and URIs, and relative paths resolved against a folder or a file.

What may be read, and how much: a local path (no scheme, or ``file://``) is read only when ``os.stat`` says it
is a regular file (a FIFO, device, socket or directory is refused before it is opened, and the open is
non-blocking), and at most ``max_bytes`` (+1) bytes are read (:func:`read_local_file`). URIs of a Beam
filesystem (``s3://``, ``gs://`` with its extra, ...) are read through ``FileSystems`` with the same byte cap
(:func:`read_capped`); other schemes (``hf://``, ``http(s)://``) through ``fsspec`` when it and the protocol's
package are installed (:func:`unsupported_uri_scheme` says why not, without fetching anything).

Failures are exceptions, not messages for a row: :class:`NotARegularFileError`, :class:`FileTooLargeError`
(both ``OSError``), :class:`UnsupportedUriError`, or whatever the filesystem raised; the caller (image
decoding, weights) words them. Beam and fsspec are imported only when a URI needs them.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from typing import Any, Callable, Optional

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_READ_CHUNK = 1 << 20


class NotARegularFileError(OSError):
    """A path that is not a regular file (FIFO, device, socket, directory): never opened for reading."""


class FileTooLargeError(OSError):
    """A file over the byte cap (known from ``stat``, or found while reading at most cap + 1 bytes)."""


class UnsupportedUriError(ValueError):
    """A URI no reader here can open (the message says why, in one line: see :func:`unsupported_uri_scheme`)."""


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def read_capped(read: Callable[[int], bytes], max_bytes: int, first: int = _READ_CHUNK) -> bytes:
    """Call ``read(n)`` until EOF or more than ``max_bytes`` bytes; never more than ``max_bytes + 1``.

    Raises :class:`FileTooLargeError` when there are more than ``max_bytes`` bytes."""
    chunks, total, want = [], 0, max(1, min(first, max_bytes + 1))
    while total <= max_bytes:
        chunk = read(min(want, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = _READ_CHUNK
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"larger than the limit of {max_bytes} bytes")
    return data


def read_local_file(path: str, max_bytes: int) -> bytes:
    """Read a local regular file, at most ``max_bytes`` bytes, without ever blocking.

    ``os.stat`` first: anything but a regular file raises :class:`NotARegularFileError`
    before it is opened, a size over ``max_bytes`` raises :class:`FileTooLargeError`
    before a byte is read. The open is ``O_NONBLOCK`` and re-checked with ``fstat`` (a
    file swapped for a FIFO in between is refused too), and at most ``max_bytes + 1``
    bytes are read (files whose size ``stat`` does not tell, as in ``/proc``).
    Other failures are the ``OSError`` of ``os.stat``/``os.open``.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFileError(f"is {_file_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise FileTooLargeError(f"is {info.st_size} bytes, over the limit of {max_bytes} bytes")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFileError(f"is {_file_kind(info.st_mode)}, not a regular file")
        return read_capped(lambda size: os.read(descriptor, size), max_bytes, first=info.st_size + 1)
    finally:
        os.close(descriptor)


def uri_scheme(value: str) -> Optional[str]:
    """The lower-cased scheme of ``scheme://...``, or ``None`` for a plain path."""
    match = _SCHEME.match(value)
    return match.group(1).lower() if match else None


def _beam_filesystem(value: str) -> Optional[Any]:
    """The Beam filesystem serving ``value`` (a URI), or ``None`` if Beam has none for its scheme."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.localfilesystem import LocalFileSystem

    try:
        filesystem = FileSystems.get_filesystem(value)
    except Exception:  # ValueError for unknown schemes, BeamIOError when the package is missing
        return None
    return None if isinstance(filesystem, LocalFileSystem) else filesystem


# Beam's own filesystems for these schemes come with an extra of apache-beam.
BEAM_EXTRAS = {"gs": "apache-beam[gcp]", "s3": "apache-beam[aws]", "azfs": "apache-beam[azure]"}


def _fsspec_problem(scheme: str) -> Optional[str]:
    """``None`` when fsspec can read ``scheme://`` here, else why not (no network use), naming the package
    that would read it."""
    beam_extra = f"; or `pip install {BEAM_EXTRAS[scheme]}` for Beam's own {scheme}://" if scheme in BEAM_EXTRAS else ""
    try:
        import fsspec
    except ImportError:
        return (f"{scheme}:// is not a Beam filesystem here and fsspec is not installed (pip install fsspec)"
                f"{beam_extra}")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{scheme}:// needs a package fsspec lacks here: {reason}{beam_extra}"
    except Exception:
        return f"{scheme}:// is known neither to Beam's filesystems nor to fsspec"
    return None


def unsupported_uri_scheme(value: str) -> Optional[str]:
    """Why the path/URI ``value`` cannot be read here, in one line, or ``None`` when it can.

    Plain paths and ``file://`` are read locally; a scheme Beam has a filesystem for
    (``s3://``, ``gs://`` with ``apache-beam[gcp]``, ...) through ``FileSystems``; any other
    (``hf://``, ``http://``, ``https://``) through ``fsspec`` when fsspec and that protocol's
    package (``huggingface_hub``, ``aiohttp``) are installed. Nothing is fetched: the planner
    calls this on a sample of path values to stop a job that could read none of them.
    """
    scheme = uri_scheme(value)
    if scheme is None or scheme == "file" or _beam_filesystem(value) is not None:
        return None
    return _fsspec_problem(scheme)


def read_uri(uri: str, max_bytes: int, *, fsspec_fallback: bool = True) -> bytes:
    """The bytes of a local path, ``file://`` or URI, at most ``max_bytes``.

    Local: :func:`read_local_file`. A URI: through Beam's ``FileSystems``; with ``fsspec_fallback``, a URI
    whose scheme Beam has no filesystem for goes through ``fsspec`` instead (:class:`UnsupportedUriError`
    when it cannot). Raises what the reader raised (``OSError``, a filesystem's own errors).
    """
    scheme = uri_scheme(uri)
    if scheme is None or scheme == "file":
        return read_local_file(uri[len("file://"):] if scheme == "file" else uri, max_bytes)
    if fsspec_fallback and _beam_filesystem(uri) is None:
        problem = _fsspec_problem(scheme)
        if problem is not None:
            raise UnsupportedUriError(problem)
        import fsspec

        with fsspec.open(uri, "rb") as handle:
            return read_capped(handle.read, max_bytes)
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems  # gs://, s3://, ...

    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return read_capped(handle.read, max_bytes)


def resolve_path(value: str, base_dir: Optional[str], *, normalise: bool = False) -> str:
    """``value`` (a path) joined to the folder ``base_dir`` when it is a relative local path (no scheme, not
    absolute); other values, and every value when ``base_dir`` is empty or ``None``, are returned unchanged.

    ``base_dir`` is a local folder or a folder URI (joined with ``/``). ``normalise`` folds ``.`` and ``..``
    (``os.path.normpath``; after the scheme of a URI, ``posixpath.normpath``).
    """
    if not base_dir or uri_scheme(value) is not None or os.path.isabs(value):
        return value
    scheme = uri_scheme(base_dir)
    if scheme is None or (scheme == "file" and not normalise):  # a local folder (file:// joins as a path)
        joined = os.path.join(base_dir, value)
        return os.path.normpath(joined) if normalise else joined
    if normalise:
        prefix, rest = base_dir.split("://", 1)
        return f"{prefix}://{posixpath.normpath(posixpath.join(rest, value))}"
    return posixpath.join(base_dir.rstrip("/") + "/", value)


def resolve_against_file(value: str, base_file: str) -> str:
    """``value`` (an image path) made absolute and normalised against the folder of ``base_file`` (the input
    file naming it, local or a URI) when it is relative; empty values, ``data:`` URLs, absolute paths and
    URIs are returned unchanged."""
    if not value or value.startswith("data:"):
        return value
    if uri_scheme(base_file) is None:
        return resolve_path(value, os.path.dirname(os.path.abspath(base_file)), normalise=True)
    prefix, rest = base_file.split("://", 1)
    return resolve_path(value, f"{prefix}://{posixpath.dirname(rest)}", normalise=True)
