"""Test data: WebDataset tar shards built member by member with ``tarfile`` (good samples from the demo photos,
PNG and JPEG, several boxes, keys with a directory part; and one bad sample of each kind), and the same good
rows as Parquet."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.data_helpers import demo_table, encode

IMAGES = ("ref_image", "edited_image")


@dataclasses.dataclass
class Entry:
    """One tar member to write: a regular file with ``data``, or a link / device / FIFO (``kind``)."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""


def write_tar(path: Path, entries: Sequence[Entry], gz: bool = False) -> None:
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.linkname, info.mtime, info.mode = entry.kind, entry.linkname, 0, 0o644
            if entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)


def _jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return encode(image.convert("RGB"), "JPEG")


def good_rows(count: int, size: int = 48, prefix: str = "g") -> list[dict[str, Any]]:
    """``count`` demo pairs as row dicts: odd rows JPEG, the others PNG; every third row has three boxes;
    pass-through fields ``edit``, ``quality`` (int), ``weight`` (float) and ``meta`` (a struct)."""
    base = demo_table(size=size, with_bad_rows=False).to_pylist()
    rows = []
    for index in range(count):
        row = dict(base[index % len(base)])
        if index % 2:
            row["ref_image"], row["edited_image"] = _jpeg(row["ref_image"]), _jpeg(row["edited_image"])
        if index % 3 == 0:
            x1, y1, x2, y2 = row["coords"][0]
            row["coords"] = [[x1, y1, x2, y2], [0.0, 0.0, 6.0, 5.0], [float(size - 9), 2.5, float(size), 11.0]]
        row["id"] = f"{prefix}{index:03d}"
        row["quality"] = index * 7
        row["weight"] = index / 4
        row["meta"] = {"source": f"photo-{index % 8}", "round": index % 3}
        rows.append(row)
    return rows


def sample_entries(key: str, row: dict[str, Any], image_ext: Optional[dict[str, str]] = None,
                   json_last: bool = False) -> list[Entry]:
    """The members of one good sample: its images as ``<key>.<column>.<ext>`` and the rest in ``<key>.json``."""
    entries = []
    for column in IMAGES:
        data = row[column]
        ext = (image_ext or {}).get(column) or ("png" if data.startswith(b"\x89PNG") else "jpg")
        entries.append(Entry(f"{key}.{column}.{ext}", data))
    others = {name: value for name, value in row.items() if name not in IMAGES}
    document = Entry(f"{key}.json", json.dumps(others).encode())
    return entries + [document] if json_last else [document] + entries


def noise_png(size: int = 256, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


@dataclasses.dataclass
class ShardSet:
    """A folder of shards plus the Parquet of their good rows and what each bad sample must become."""

    folder: Path
    pattern: str  # every shard: folder/*.tar*
    parquet: Path  # the good rows
    good: list[dict[str, Any]]
    bad: dict[str, tuple[str, str]]  # id -> (error_stage, error_type)
    bad_members: dict[str, dict[str, bytes]]  # id -> {column: bytes it must keep}
    max_image_bytes: int = 100_000


def build_shard_set(root: Path, size: int = 48) -> ShardSet:
    """Four shards: ``a-000.tar`` (10 good samples, keys ``set-a/...``), ``b-001.tar.gz`` (6 good, gzip),
    ``c-002.tar`` (one bad sample of each kind between two good ones), ``d-003.tar`` (4 good samples, then a
    fifth cut inside its edited image)."""
    folder = root / "shards"
    folder.mkdir(parents=True)
    good = good_rows(22, size)
    write_tar(folder / "a-000.tar", [entry for index, row in enumerate(good[:10])
                                     for entry in sample_entries(f"set-a/{index:06d}", row, json_last=index % 2 == 1)])
    write_tar(folder / "b-001.tar.gz", [entry for index, row in enumerate(good[10:16])
                                        for entry in sample_entries(f"set-b/{index:06d}", row)], gz=True)
    template = good[0]
    ref, edited = template["ref_image"], template["edited_image"]
    meta = {name: value for name, value in template.items() if name not in IMAGES and name != "id"}

    def doc(key: str, ident: Optional[str] = None, **extra: Any) -> Entry:
        values = {**meta, **extra}
        if ident is not None:
            values["id"] = ident
        return Entry(f"{key}.json", json.dumps(values).encode())

    big = noise_png(256)
    bad_entries = [
        *sample_entries("set-c/000000", good[16]),
        # an image member missing
        Entry("set-c/missing.ref_image.png", ref), doc("set-c/missing", "bad-missing"),
        # two members for one field
        Entry("set-c/double.ref_image.png", ref), Entry("set-c/double.ref_image.jpg", _jpeg(ref)),
        Entry("set-c/double.edited_image.png", edited), doc("set-c/double", "bad-double"),
        # a json that does not parse
        Entry("set-c/badjson.ref_image.png", ref), Entry("set-c/badjson.edited_image.png", edited),
        Entry("set-c/badjson.json", b'{"id": "bad-json", "coords": [[1, 2'),
        # a json that is not an object
        Entry("set-c/listjson.ref_image.png", ref), Entry("set-c/listjson.edited_image.png", edited),
        Entry("set-c/listjson.json", b"[1, 2, 3]"),
        # no json while the scope needs boxes
        Entry("set-c/nojson.ref_image.png", ref), Entry("set-c/nojson.edited_image.png", edited),
        # a member over --max_image_bytes
        Entry("set-c/big.ref_image.png", big), Entry("set-c/big.edited_image.png", edited), doc("set-c/big", "bad-big"),
        # hostile names and member types
        Entry("/abs/evil.ref_image.png", ref), Entry("/abs/evil.edited_image.png", edited),
        Entry("../up/evil.ref_image.png", ref), Entry("../up/evil.edited_image.png", edited),
        Entry("set-c/link.ref_image.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        Entry("set-c/link.edited_image.png", edited), doc("set-c/link", "bad-symlink"),
        Entry("set-c/hard.ref_image.png", kind=tarfile.LNKTYPE, linkname="set-c/000000.ref_image.png"),
        Entry("set-c/hard.edited_image.png", edited), doc("set-c/hard", "bad-hardlink"),
        Entry("set-c/dev.ref_image.png", kind=tarfile.CHRTYPE), Entry("set-c/dev.edited_image.png", edited),
        doc("set-c/dev", "bad-device"),
        Entry("set-c/fifo.ref_image.png", ref), Entry("set-c/fifo.edited_image.png", kind=tarfile.FIFOTYPE),
        doc("set-c/fifo", "bad-fifo"),
        # ignored members: a caption without a field name, a folder, a name without a dot
        Entry("set-c/000001.txt", b"a caption"), Entry("README", b"not a sample"),
        *sample_entries("set-c/000001", good[17]),
    ]
    write_tar(folder / "c-002.tar", bad_entries)
    cut_entries = [entry for index, row in enumerate(good[18:22])
                   for entry in sample_entries(f"set-d/{index:06d}", row)]
    cut_entries += sample_entries("set-d/000004", {**good[0], "id": "cut-sample"})  # json first, then the images
    write_tar(folder / "d-003.tar", cut_entries)
    data = (folder / "d-003.tar").read_bytes()
    with tarfile.open(folder / "d-003.tar") as tar:
        last = tar.getmembers()[-1]  # set-d/000004.edited_image.*: cut inside its bytes
    (folder / "d-003.tar").write_bytes(data[: last.offset_data + last.size // 2])
    bad = {
        "bad-missing": ("read", "MissingImage"),
        "bad-double": ("read", "DuplicateMember"),
        "set-c/badjson": ("read", "BadSampleJson"),
        "set-c/listjson": ("read", "BadSampleJson"),
        "set-c/nojson": ("coords", "MissingCoords"),
        "bad-big": ("read", "ImageTooLarge"),
        "/abs/evil": ("read", "UnsafeMember"),
        "../up/evil": ("read", "UnsafeMember"),
        "bad-symlink": ("read", "UnsafeMember"),
        "bad-hardlink": ("read", "UnsafeMember"),
        "bad-device": ("read", "UnsafeMember"),
        "bad-fifo": ("read", "UnsafeMember"),
        "cut-sample": ("read", "TruncatedShard"),
    }
    bad_members = {
        "bad-missing": {"ref_image": ref},
        "bad-double": {"ref_image": ref, "edited_image": edited},
        "set-c/badjson": {"ref_image": ref, "edited_image": edited},
        "set-c/listjson": {"ref_image": ref, "edited_image": edited},
        "set-c/nojson": {"ref_image": ref, "edited_image": edited},
        "bad-big": {"edited_image": edited},
        "bad-symlink": {"edited_image": edited},
        "bad-fifo": {"ref_image": ref},
        "bad-device": {"edited_image": edited},
        "bad-hardlink": {"edited_image": edited},
        "cut-sample": {"ref_image": good[0]["ref_image"]},
    }
    parquet = root / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(good), parquet)
    return ShardSet(folder, str(folder / "*.tar*"), parquet, good, bad, bad_members)


def shard_members(path: Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every whole member of a shard (links and devices: empty bytes), read with tarfile;
    a cut member (a truncated shard) and what follows are left out."""
    out = []
    with tarfile.open(path) as tar:
        try:
            for info in tar:
                handle = tar.extractfile(info) if info.isreg() else None
                out.append((info.name, handle.read() if handle else b""))
        except tarfile.ReadError:
            pass
    return out

