"""WebDataset shards as inputs: tar files whose members, grouped by key, are samples (one sample = one row).

A shard (``.tar``, ``.tar.gz``, ``.tgz``; local or any Beam filesystem) holds each sample as consecutive members
sharing a key, the webdataset convention: for the member ``a/b/000123.ref_image.jpg`` the key is
``a/b/000123`` (the directory part belongs to the key, then the basename up to its first dot) and the rest,
``ref_image.jpg``, is the field ``ref_image`` (up to the next dot) and its extension. A new sample starts
wherever the key changes (as webdataset groups members). Of a sample's members:

- ``<key>.<field>.<ext>`` is the binary column ``<field>`` holding the member's bytes as stored: with the
  default columns ``<key>.ref_image.<ext>`` and ``<key>.edited_image.<ext>`` (``--ref_column src`` reads
  ``<key>.src.<ext>``); any other such field is a binary column too, passed through as a Parquet one would be;
- ``<key>.json`` holds a JSON object with the sample's other columns (``coords``, a scope column, pass-through
  fields); a json key that is also a member field of the shard is ignored (the member wins);
- anything else is ignored: members without a field name (``<key>.txt``, ``<key>.cls``), names whose
  basename has no dot or starts with one, folders. (A key whose members are all ignored is still a sample:
  an error row naming them, so nothing disappears silently.)

Column ``id`` is the json's ``id`` when it has one (not null), else the sample key. Its type is the json ids'
type when every sample's json object has one (so a Parquet file of the same rows has the same ids), else text
(a json id of another type is then written as text); a sample without a json object (none, or one that does
not parse) takes its key, or null when the ids are not text (it is an error row or unscored anyway, found by
its ``source_file`` / ``source_row``).

**Planning** (:func:`plan_shard`) reads the shard once: a ``.tar`` by seeking from header to header (image
bytes are never read, only the json members), a ``.tar.gz`` as a stream (``tarfile``'s ``r|*``: decompressed
once, nothing held but the current member). It counts the samples, infers the schema (image fields
``binary``; each json key's type as pyarrow infers it from the parsed values, block by block, so a Parquet
file of the same rows has the same types and a mixed ``--input`` shares columns) and cuts a ``.tar`` into
splits of at most ``SPLIT_ROWS`` samples / about ``SPLIT_BYTES`` bytes at sample starts (the offset of each
sample's first header, 512-byte aligned). A ``.tar.gz`` (no seeking inside gzip) or a shard with a pax
global header (it applies to every later member) is one split.

**Reading** (:func:`split_rows`) seeks to a split's first header (a ``.tar.gz`` streams from the start) and
reads its samples member by member: at most one sample's members are held, a member over
``max_image_bytes`` is skipped without being read, skipped rows (resume, restart) are walked past without
reading their data. Each sample gives the row dict a Parquet row gives (``id``, the member fields as bytes,
the json's columns in the planned types), and its row index is the sample's index in the shard (from 0).

**Bad samples are error rows** (stage ``read``), each with its reason, carrying every member that could be
read: the reader puts ``(stage, type, message)`` under :data:`transforms.layout.READ_PROBLEM_KEY` and the
scoring step raises it as the row's error. Types: ``UnsafeMember`` (an absolute name, a ``..`` component, a
symbolic or hard link, a device, a FIFO: never followed, never extracted), ``TruncatedShard`` (the shard
ends inside this sample, or without its end-of-archive blocks after it: the samples before the cut are
rows as usual), ``DuplicateMember`` (two members for one field, e.g. ``ref_image.jpg`` and
``ref_image.png``), ``ImageTooLarge`` / ``MemberTooLarge`` (a member over ``--max_image_bytes``: not read),
``BadSampleJson`` (the json does not parse, is not an object, or does not fit the planned types),
``MissingImage`` (no member for an image column). A sample without a json has null coords: an error row
``MissingCoords`` when its mask mode needs boxes (the scoring step's own rule), scored otherwise.

Nothing is ever extracted to disk: members are read into memory (bounded) or copied from tar to tar
(:func:`copy_samples`, the filter's ``--source``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tarfile
import zlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from lpips_pipe.transforms.outputs import layout
from lpips_pipe.transforms.records.decode import DEFAULT_MAX_IMAGE_BYTES
from lpips_pipe.transforms.messages import one_line, quote_value
from lpips_pipe.transforms.inputs.split import SPLIT_BYTES, SPLIT_ROWS, InputError, InputSplit, merge_types

STAGE = "read"
UNSAFE_MEMBER = "UnsafeMember"
TRUNCATED_SHARD = "TruncatedShard"
DUPLICATE_MEMBER = "DuplicateMember"
IMAGE_TOO_LARGE = "ImageTooLarge"
MEMBER_TOO_LARGE = "MemberTooLarge"
BAD_SAMPLE_JSON = "BadSampleJson"
MISSING_IMAGE = "MissingImage"
# When a sample has several problems, the row's error is the first of these (the others are named after it).
PROBLEM_ORDER = (UNSAFE_MEMBER, TRUNCATED_SHARD, DUPLICATE_MEMBER, IMAGE_TOO_LARGE, MEMBER_TOO_LARGE,
                 BAD_SAMPLE_JSON, MISSING_IMAGE)
PLAIN = "tar"  # InputSplit.tar: an uncompressed tar, read by seeking
STREAM = "stream"  # a compressed tar (gzip, bzip2, xz), read as a stream from its start
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
STREAM_BUFFER = 1 << 16  # bytes tarfile reads at a time from a compressed shard
SCHEMA_BLOCK = 1024  # json objects per type-inference block at planning
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)
_MARKER, _CUT = "marker", "cut"


def is_shard(path: str) -> bool:
    """Whether ``path`` names a tar shard (``.tar``, ``.tar.gz``, ``.tgz``, any case)."""
    return path.lower().endswith(layout.TAR_SUFFIXES)


def member_key(name: str) -> Optional[tuple[str, str]]:
    """``(key, suffix)`` of a member name by the webdataset convention (``a/b/000123.ref_image.jpg`` ->
    ``("a/b/000123", "ref_image.jpg")``), or ``None`` when the basename has no dot or starts with one."""
    folder, slash, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not stem or not dot:
        return None
    return folder + slash + stem, suffix


def field_of(suffix: str) -> Optional[str]:
    """The field a member suffix fills: ``json`` for ``<key>.json``, ``<field>`` for ``<key>.<field>.<ext>``,
    ``None`` (ignored) for anything else."""
    if suffix == layout.SAMPLE_JSON_FIELD:
        return suffix
    field, dot, ext = suffix.partition(".")
    if not field or not dot or not ext or field in (layout.SAMPLE_JSON_FIELD, layout.ID_FIELD):
        return None
    return field


def unsafe_reason(info: tarfile.TarInfo) -> Optional[str]:
    """Why a member must not be used (an absolute name, a ``..`` component, anything but a regular file), or
    ``None``."""
    name = info.name.replace("\\", "/")
    if name.startswith("/"):
        return "has an absolute name"
    if ".." in name.split("/"):
        return "has a '..' component in its name"
    if info.issym():
        return f"is a symbolic link (to {quote_value(info.linkname)})"
    if info.islnk():
        return f"is a hard link (to {quote_value(info.linkname)})"
    if info.ischr() or info.isblk():
        return "is a device"
    if info.isfifo():
        return "is a FIFO"
    if not info.isreg():
        return f"is not a regular file (tar type {info.type!r})"
    return None


# --------------------------------------------------------------------------- walking a tar


class _Header(tarfile.TarInfo):
    """tarfile's header reader, noting on the archive how it ended: at its end-of-archive blocks (a zero
    block) or at a missing, cut or damaged header (``tarfile`` treats both as the end)."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.lpips_pipe_end = _MARKER  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError:
            tar.lpips_pipe_end = _CUT  # type: ignore[attr-defined]
            raise


@contextlib.contextmanager
def _open(path: str, offset: int = 0) -> Iterator[tuple[tarfile.TarFile, str]]:
    """``(tar, PLAIN or STREAM)``: an uncompressed shard opened for seeking, its first header at ``offset``;
    a compressed one as a stream from its start (``offset`` must be 0). Never a name on disk."""
    handle = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        head = handle.read(6)
        if head.startswith(_COMPRESSED_MAGIC):
            if offset:
                raise InputError(f"{path} is compressed: it cannot be read from byte {offset}")
            handle.seek(0)
            tar = tarfile.open(fileobj=handle, mode="r|*", tarinfo=_Header, bufsize=STREAM_BUFFER)
            mode = STREAM
        else:
            handle.seek(offset)
            tar = tarfile.TarFile(fileobj=handle, mode="r", tarinfo=_Header)
            mode = PLAIN
        with contextlib.closing(tar):
            yield tar, mode
    finally:
        handle.close()


class _Walk:
    """The members of an open tar, each with its sample's index (consecutive members sharing a key), folders
    and keyless names left out. After the loop, ``ended`` says how the archive ended: ``marker`` (its
    end-of-archive blocks), ``cut`` (a missing or damaged header: cut here) or ``error`` (``error`` holds it:
    the data of the member before was cut, or the stream is damaged)."""

    def __init__(self, tar: tarfile.TarFile, first_index: int = 0) -> None:
        self._tar = tar
        self.index = first_index - 1
        self.key: Optional[str] = None
        self.ended: Optional[str] = None
        self.error: Optional[BaseException] = None

    def __iter__(self) -> Iterator[tuple[int, str, str, tarfile.TarInfo]]:
        tar = self._tar
        while True:
            try:
                info = tar.next()
            except _READ_ERRORS as error:
                self.ended, self.error = "error", error
                return
            tar.members.clear()  # tarfile keeps every header it read: memory would grow with the shard
            if info is None:
                self.ended = getattr(tar, "lpips_pipe_end", _CUT)
                return
            if info.isdir():
                continue
            parsed = member_key(info.name)
            if parsed is None:
                continue
            key, suffix = parsed
            if key != self.key:
                self.index += 1
                self.key = key
            yield self.index, key, suffix, info


def _read_data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """A regular member's bytes (the archive is at its data); ``tarfile.ReadError`` when they are cut."""
    if info.sparse is not None:  # GNU sparse: tarfile's reader expands it
        handle = tar.extractfile(info)
        assert handle is not None
        data = handle.read()
    else:
        tar.fileobj.seek(info.offset_data)
        data = tar.fileobj.read(info.size)
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


@dataclasses.dataclass
class Member:
    """One member of a sample: its name, suffix, field (``None``: ignored), header, and its bytes when they
    were read (``too_large``: over the limit, not read)."""

    name: str
    suffix: str
    field: Optional[str]
    info: tarfile.TarInfo
    data: Optional[bytes] = None
    too_large: bool = False


@dataclasses.dataclass
class Sample:
    """One sample: its index in the shard, key, the offset of its first header, the offset after its last
    member, its members and the problems found while reading it (``(type, message)``)."""

    index: int
    key: str
    offset: int
    end: int
    members: list[Member] = dataclasses.field(default_factory=list)
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def cut(self) -> bool:
        return any(kind == TRUNCATED_SHARD for kind, _ in self.problems)

    def names(self) -> str:
        return ", ".join(member.name for member in self.members) or "none"


Wants = Callable[[int, Member], bool]


def _samples(tar: tarfile.TarFile, path: str, first_index: int, wants: Wants,
             max_bytes: int) -> Iterator[Sample]:
    """The samples of an open tar, in order, each yielded once its last member is known (the next key, or the
    end). A member's bytes are read when ``wants(index, member)`` and it is at most ``max_bytes``; only the
    current sample's members are held."""
    walk = _Walk(tar, first_index)
    current: Optional[Sample] = None
    for index, key, suffix, info in walk:
        if current is not None and index != current.index:
            yield current
            current = None  # dropped before the next sample's bytes are read
        if current is None:
            current = Sample(index, key, info.offset, tar.offset)
        member = Member(info.name, suffix, field_of(suffix), info)
        current.members.append(member)
        current.end = tar.offset  # the next header
        unsafe = unsafe_reason(info)
        if unsafe is not None:
            current.problems.append((UNSAFE_MEMBER, f"member {quote_value(info.name)} {unsafe}; such members are "
                                                    "never followed or extracted"))
            continue
        if member.field is None or not wants(index, member):
            continue
        if info.size > max_bytes:
            member.too_large = True
            continue
        try:
            member.data = _read_data(tar, info)
        except _READ_ERRORS as error:
            current.problems.append((TRUNCATED_SHARD, f"{path} ends inside member {quote_value(info.name)} "
                                                      f"({one_line(error)}): the shard was cut in this sample"))
            yield current
            return
    if current is None:
        return
    if walk.ended == "error":
        current.problems.append((TRUNCATED_SHARD, f"{path} ends inside this sample's last member "
                                                  f"({one_line(walk.error)}): the shard was cut in this sample"))
    elif walk.ended != _MARKER:
        current.problems.append((TRUNCATED_SHARD, f"{path} ends without its end-of-archive blocks after this "
                                                  "sample: it was cut (or damaged) here, so this sample may be "
                                                  "incomplete"))
    yield current


# --------------------------------------------------------------------------- planning


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


class _Columns:
    """The columns of a shard, as its samples are scanned: member fields (binary), json keys (types inferred
    from the parsed values block by block, promoted across blocks), and whether every sample has a json id."""

    def __init__(self, path: str) -> None:
        self._path = path
        self.order: list[str] = [layout.ID_FIELD]
        self._known = {layout.ID_FIELD}
        self.binary: set[str] = set()
        self.types: dict[str, pa.DataType] = {}
        self.id_missing = False
        self._block: list[tuple[int, dict]] = []

    def _name(self, name: str) -> None:
        if name not in self._known:
            self._known.add(name)
            self.order.append(name)

    def member(self, field: str) -> None:
        self.binary.add(field)
        self._name(field)

    def sample(self, index: int, obj: Optional[dict]) -> None:
        if obj is None:  # its id is its key when the ids are text (null otherwise)
            return
        if obj.get(layout.ID_FIELD) is None:
            self.id_missing = True
        for name in obj:
            self._name(name)
        self._block.append((index, obj))
        if len(self._block) >= SCHEMA_BLOCK:
            self.flush()

    def flush(self) -> None:
        if not self._block:
            return
        first, last = self._block[0][0], self._block[-1][0]
        names = list(dict.fromkeys(name for _, obj in self._block for name in obj))
        for name in names:
            values = [obj.get(name) for _, obj in self._block]
            try:
                kind = pa.array(values).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                    OverflowError) as error:
                raise InputError(f"{self._path}: json key {name!r} holds values of different types in samples "
                                 f"{first}-{last} ({one_line(error, 200)}); a column has one type") from error
            if name in self.types:
                kind = merge_types(self._path, name, self.types[name], kind, strings_win=False,
                                    where=f" (json of samples up to {last})")
            self.types[name] = kind
        self._block = []

    def schema(self) -> pa.Schema:
        self.flush()
        fields = []
        for name in self.order:
            if name == layout.ID_FIELD:
                json_id = self.types.get(name)
                kind = pa.string() if self.id_missing or json_id is None or pa.types.is_null(json_id) else json_id
            elif name in self.binary:
                kind = pa.binary()
            else:
                kind = self.types.get(name, pa.null())
            fields.append(pa.field(name, kind))
        return pa.schema(fields)


def _json_object(member: Optional[Member]) -> tuple[Optional[dict], Optional[str]]:
    """The json member's object, or ``(None, why not)`` (``(None, None)``: no json, or it was not read)."""
    if member is None or member.data is None:
        return None, None
    try:
        value = json.loads(member.data)
    except ValueError as error:  # invalid JSON, or not UTF-8/16/32
        return None, f"member {quote_value(member.name)} is not valid JSON ({one_line(error, 200)})"
    if not isinstance(value, dict):
        return None, f"member {quote_value(member.name)} holds a JSON {type(value).__name__}, not an object"
    return value, None


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """A scanned shard: its schema, samples, splits, and whether it is complete (it ends with its
    end-of-archive blocks and nothing in it was cut)."""

    path: str
    schema: pa.Schema
    rows: int
    splits: tuple[InputSplit, ...]
    complete: bool
    mode: str


def plan_shard(path: str, split_rows: int = SPLIT_ROWS, split_bytes: int = SPLIT_BYTES,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ShardPlan:
    """Scan a shard once (see the module docstring): its schema, sample count, splits. :class:`InputError`
    (one line naming it) when it is not a readable tar or holds no sample."""
    columns = _Columns(path)
    cuts: list[tuple[int, int, int]] = []  # (first sample, byte start, byte stop) of each split
    rows = 0
    complete = True
    with contextlib.ExitStack() as stack:
        try:
            tar, mode = stack.enter_context(_open(path))
        except InputError:
            raise
        except Exception as error:  # pylint: disable=broad-except  # not a tar, unreadable
            raise InputError(f"{path} is not a readable tar shard ({type(error).__name__}: "
                             f"{one_line(error, 200)})") from error
        wants: Wants = lambda index, member: member.field == layout.SAMPLE_JSON_FIELD
        split_start: Optional[int] = None
        split_first = 0
        split_stop = 0
        for sample in _samples(tar, path, 0, wants, max_bytes):
            rows += 1
            complete = complete and not sample.cut
            json_member = None
            for member in sample.members:
                if member.field is None or unsafe_reason(member.info) is not None:
                    continue
                if member.field != layout.SAMPLE_JSON_FIELD:
                    columns.member(member.field)
                elif json_member is None:
                    json_member = member
            obj, _ = _json_object(json_member)
            columns.sample(sample.index, obj)
            if split_start is not None and (sample.index - split_first >= split_rows
                                            or sample.end - split_start > split_bytes):
                cuts.append((split_first, split_start, split_stop))
                split_start = None
            if split_start is None:
                split_start, split_first = sample.offset, sample.index
            split_stop = sample.end
        if split_start is not None:
            cuts.append((split_first, split_start, split_stop))
        if tar.pax_headers and len(cuts) > 1:  # a pax global header applies to the members after it
            cuts = [(0, cuts[0][1], cuts[-1][2])]
    if not rows:
        raise InputError(f"{path} holds no sample (no member named <key>.<field>.<ext>, <key>.json or <key>.<ext>)")
    if mode == STREAM:
        cuts = [(0, 0, cuts[-1][2])]
    schema = columns.schema()
    serialized = schema.serialize().to_pybytes()
    splits = tuple(InputSplit(path, 0, first, cuts[i + 1][0] if i + 1 < len(cuts) else rows, first,
                                byte_start=start, byte_stop=stop, json_schema=serialized, tar=mode)
                   for i, (first, start, stop) in enumerate(cuts))
    return ShardPlan(path, schema, rows, splits, complete, mode)


def shard_complete(path: str) -> bool:
    """Whether a shard reads to its end-of-archive blocks with nothing cut (a stream waits for that)."""
    try:
        return plan_shard(path).complete
    except InputError:
        return False


# --------------------------------------------------------------------------- reading


def _problem(problems: Sequence[tuple[str, str]], key: str) -> tuple[str, str, str]:
    """The row's ``(stage, type, message)``: the first problem by :data:`PROBLEM_ORDER`, the others named."""
    ordered = sorted(problems, key=lambda problem: PROBLEM_ORDER.index(problem[0]))
    kind, message = ordered[0]
    others = sorted({other for other, _ in ordered[1:] if other != kind})
    also = f" (also: {', '.join(others)})" if others else ""
    return STAGE, kind, f"sample {quote_value(key)}: {message}{also}"


def _json_values(obj: Optional[dict], key: str, schema: pa.Schema, problems: list[tuple[str, str]],
                 json_name: str) -> dict[str, Any]:
    """The sample's id and json columns in the planned types (Python values, as a Parquet row gives them)."""
    fields = [field for field in schema if not _is_binary(field.type)]
    id_field = schema.field(layout.ID_FIELD)
    text_ids = pa.types.is_string(id_field.type) or pa.types.is_large_string(id_field.type)
    values = {field.name: (obj or {}).get(field.name) for field in fields}
    ident = values.get(layout.ID_FIELD)
    if ident is None:
        ident = key if text_ids else None  # (a json object without an id made the column text at planning)
    elif text_ids and not isinstance(ident, str):
        ident = json.dumps(ident)
    values[layout.ID_FIELD] = ident
    try:
        return pa.Table.from_pylist([values], schema=pa.schema(fields)).to_pylist()[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
            OverflowError) as error:
        problems.append((BAD_SAMPLE_JSON, f"member {quote_value(json_name)} does not fit the shard's planned column "
                                          f"types ({one_line(error, 200)}; did the shard change after planning?)"))
        empty = {field.name: None for field in fields}
        empty[layout.ID_FIELD] = key if text_ids else None
        return empty


def sample_row(sample: Sample, schema: pa.Schema, image_columns: Sequence[str] = (),
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> dict[str, Any]:
    """The row dict of one sample (``schema``: its shard's planned schema): every column (null where the
    sample has none), and under :data:`layout.READ_PROBLEM_KEY` the reason it is an error row, if it is."""
    row: dict[str, Any] = dict.fromkeys(schema.names)
    problems = list(sample.problems)
    by_field: dict[str, list[Member]] = {}
    for member in sample.members:
        if member.field is not None and unsafe_reason(member.info) is None:
            by_field.setdefault(member.field, []).append(member)
    for field, members in by_field.items():
        if len(members) > 1:
            problems.append((DUPLICATE_MEMBER, f"{len(members)} members for {field}: "
                                               f"{', '.join(quote_value(m.name) for m in members)}; one is needed"))
        first = members[0]
        if first.too_large:
            kind = IMAGE_TOO_LARGE if field in image_columns else MEMBER_TOO_LARGE
            problems.append((kind, f"member {quote_value(first.name)} is {first.info.size} bytes, over the limit of "
                                   f"{max_bytes} (--max_image_bytes); it was not read"))
        if field != layout.SAMPLE_JSON_FIELD and field in row and _is_binary(schema.field(field).type):
            row[field] = first.data
    json_members = by_field.get(layout.SAMPLE_JSON_FIELD, [])
    obj, bad = _json_object(json_members[0] if json_members else None)
    if bad is not None:
        problems.append((BAD_SAMPLE_JSON, bad))
    row.update(_json_values(obj, sample.key, schema, problems,
                            json_members[0].name if json_members else f"{sample.key}.json"))
    for column in image_columns:
        if column in row and row[column] is None and column not in by_field:
            problems.append((MISSING_IMAGE, f"no {column} member (members: {sample.names()})"))
    if problems:
        row[layout.READ_PROBLEM_KEY] = _problem(problems, sample.key)
    return row


def split_rows(split: InputSplit, skip: Optional[np.ndarray] = None, image_columns: Sequence[str] = (),
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
               fields: Optional[Sequence[str]] = None) -> Iterator[tuple[int, Optional[dict[str, Any]]]]:
    """``(position in the split, row)`` for every sample of a shard split, in order; ``row`` is ``None`` for
    a sample in ``skip`` (walked past, its bytes not read). ``fields``: read only these members' bytes (and
    the json), e.g. for one column. :class:`InputError` when the shard no longer holds the planned samples."""
    schema = split.schema()
    assert schema is not None, "a shard split carries its schema"
    count = split.num_rows
    read_fields = None if fields is None else set(fields) | {layout.SAMPLE_JSON_FIELD}
    seen = 0
    with _open(split.path, (split.byte_start or 0) if split.tar == PLAIN else 0) as (tar, mode):
        first_index = split.first_row if mode == PLAIN else 0

        def wants(index: int, member: Member) -> bool:
            position = index - split.first_row
            return (0 <= position < count and (skip is None or not skip[position])
                    and (read_fields is None or member.field in read_fields))

        for sample in _samples(tar, split.path, first_index, wants, max_bytes):
            position = sample.index - split.first_row
            if position < 0:
                continue
            if position >= count:
                break
            seen += 1
            if skip is not None and skip[position]:
                yield position, None
                continue
            row = sample_row(sample, schema, image_columns, max_bytes)
            del sample
            yield position, row
            del row
    if seen != count:
        raise InputError(f"{split.path} changed after planning: {seen} samples from sample {split.first_row}, "
                         f"{count} were planned")


def read_column(split: InputSplit, column: str) -> pa.Array:
    """One column of a shard split's rows (every sample; e.g. ids for resume), only the json and that
    member read."""
    schema = split.schema()
    assert schema is not None
    values = [row[column] if row is not None else None for _, row in split_rows(split, fields=[column])]
    return pa.array(values, type=schema.field(column).type)


def fetch_samples(path: str, rows: Sequence[int], image_columns: Sequence[str] = ()) -> dict[int, dict[str, Any]]:
    """``{row: row dict}`` of the samples ``rows`` of a shard (the report): planned, then only the splits
    holding them read, seeking to each (a ``.tar.gz`` streams), only those samples' bytes read. Rows the
    shard does not hold are absent."""
    plan = plan_shard(path)
    wanted = sorted(set(int(row) for row in rows if 0 <= int(row) < plan.rows))
    found: dict[int, dict[str, Any]] = {}
    for split in plan.splits:
        inside = [row for row in wanted if split.first_row <= row < split.first_row + split.num_rows]
        if not inside:
            continue
        skip = np.ones(split.num_rows, dtype=bool)
        skip[np.array(inside) - split.first_row] = False
        for position, row in split_rows(split, skip, image_columns):
            if row is not None:
                found[split.first_row + position] = row
    return found


# --------------------------------------------------------------------------- copying samples (the filter)


def copy_samples(plan: ShardPlan, choose: Callable[[int], str], targets: Mapping[str, str]) -> dict[str, int]:
    """Copy every sample of a planned shard, members whole (headers and bytes, links and devices as headers
    only: nothing is followed or extracted), into the shard ``targets[choose(index)]``, streaming member by
    member; samples per target. Every target is written (an empty archive when no sample goes there). The
    members a cut sample still has whole are copied; its cut member is left out."""
    counts = {name: 0 for name in targets}
    compress = "w|gz" if any(target.lower().endswith((layout.TAR_GZ_SUFFIX, layout.TGZ_SUFFIX))
                             for target in targets.values()) else "w|"
    handles = {name: FileSystems.create(target, compression_type=CompressionTypes.UNCOMPRESSED)
               for name, target in targets.items()}
    writers: dict[str, tarfile.TarFile] = {}
    try:
        for name, handle in handles.items():
            writers[name] = tarfile.open(fileobj=handle, mode=compress, format=tarfile.PAX_FORMAT)
        at_risk = plan.rows - 1 if not plan.complete else -1  # the last sample of a cut shard
        with _open(plan.path) as (tar, _):
            walk = _Walk(tar)
            last = -1
            for index, _, _, info in walk:
                target = choose(index)
                if index != last:
                    counts[target] += 1
                    last = index
                out = writers[target]
                if not info.isreg():
                    out.addfile(_copy_header(info))
                    continue
                if index == at_risk:  # read it whole first: a cut member must not be half-written
                    try:
                        data = _read_data(tar, info)
                    except _READ_ERRORS:
                        break
                    header = _copy_header(info)
                    out.addfile(header, _Bytes(data))
                    del data
                    continue
                handle = tar.extractfile(info)
                out.addfile(_copy_header(info), handle)
    finally:
        for name in handles:
            if name in writers:
                writers[name].close()
            handles[name].close()
    return counts


class _Bytes:
    """A readable view of bytes for ``TarFile.addfile`` (``read(n)``)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else min(self._at + size, len(self._data))
        chunk = bytes(self._data[self._at:end])
        self._at = end
        return chunk


def _copy_header(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A header to write for a member read from a shard (a sparse member is written out as a regular one)."""
    header = tarfile.TarInfo(info.name)
    for name in ("size", "mtime", "mode", "type", "linkname", "uid", "gid", "uname", "gname", "devmajor",
                 "devminor", "pax_headers"):
        setattr(header, name, getattr(info, name))
    if info.sparse is not None:
        header.type = tarfile.REGTYPE
    return header


# --------------------------------------------------------------------------- writing rows as a shard

_EXTENSIONS = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"), (b"II*\x00", "tif"),
               (b"MM\x00*", "tif"))


def extension_of(data: bytes) -> str:
    """A file extension for encoded image bytes, from their signature (``bin`` when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _EXTENSIONS if data.startswith(magic)), "bin")


def write_shard(path: str, rows: Sequence[Mapping[str, Any]], keys: Optional[Sequence[str]] = None,
                mtime: int = 0) -> int:
    """Write row dicts (e.g. ``pyarrow.Table.to_pylist()`` of a pairs file) as a WebDataset shard (``.tar``,
    or gzip for ``.tar.gz`` / ``.tgz``): per row, each bytes value as ``<key>.<column>.<ext>`` (the extension
    from the bytes' signature) and every other column in ``<key>.json``. ``keys`` default to ``000000``,
    ``000001``, ...; the values must be JSON-serialisable; returns the samples written. The reverse of reading a
    shard: the rows come back the same."""
    compress = "w|gz" if path.lower().endswith((layout.TAR_GZ_SUFFIX, layout.TGZ_SUFFIX)) else "w|"
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        with tarfile.open(fileobj=handle, mode=compress, format=tarfile.PAX_FORMAT) as tar:
            for index, row in enumerate(rows):
                key = keys[index] if keys is not None else f"{index:06d}"
                others = {}
                members = []
                for name, value in row.items():
                    if isinstance(value, (bytes, bytearray, memoryview)):
                        data = bytes(value)
                        members.append((f"{key}.{name}.{extension_of(data)}", data))
                    else:
                        others[name] = value
                members.append((f"{key}.{layout.SAMPLE_JSON_FIELD}", json.dumps(others).encode("utf-8")))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644  # ustar headers: no pax
                    tar.addfile(info, _Bytes(data))
    return len(rows)
