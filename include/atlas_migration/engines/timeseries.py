"""Time-series buckets in dumps: which layout a dump holds, and unpacking buckets into measurements.

mongodump writes a time-series collection's *buckets* (the internal storage documents), never its
measurements: as ``system.buckets.<coll>.bson`` for servers before 8.3, and (Database Tools 100.16+ with
8.3+ servers, read through the ``rawData`` API) as ``<coll>.bson``. Both come with ``<coll>.metadata.json``
of ``type: "timeseries"``; the 8.3+ layout is told apart by the dump's ``prelude.json`` server version.
This package's engine writes buckets the same way whenever the source exposes them, and measurements as
``<coll>.bson`` only for a source that exposes no buckets (no prelude server version of 8.3+ then).

A restore inserts buckets as buckets when the target accepts them (``rawData`` on 8.3+, the
``system.buckets`` collection before), and otherwise unpacks them into measurements: exactly, byte for byte
per value, for uncompressed (version 1) buckets, in the field order the server's unpacker produces (time
field, meta field, then the data columns in bucket order). Compressed buckets (version 2 and later, BSON
column binaries) are refused with an error naming the collection: they are never inserted as measurements.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from atlas_migration.engines.dump_layout import version_tuple
from atlas_migration.errors import DumpFormatError

# Bucket storage came in with 5.0; from 8.3 the rawData API reads and writes buckets through the collection.
RAW_DATA_MIN_VERSION = (8, 3, 0)

LAYOUT_BUCKETS_FILE = "system.buckets"  # system.buckets.<coll>.bson (mongodump, servers before 8.3)
LAYOUT_RAW_DATA = "rawData"  # <coll>.bson holding buckets (mongodump 100.16+, servers 8.3+)
LAYOUT_MEASUREMENTS = "measurements"  # <coll>.bson holding measurements (this engine, bucket-less sources)

_INT32 = struct.Struct("<i")
_FIXED_SIZES = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
                0x7F: 0, 0xFF: 0}
_STRING_TYPES = frozenset({0x02, 0x0D, 0x0E})
_DOCUMENT_TYPES = frozenset({0x03, 0x04})


@dataclass(frozen=True)
class Element:
    """One BSON element: its type byte, name and the exact bytes of its value."""

    type: int
    name: str
    value: bytes

    def renamed(self, name: str) -> bytes:
        return bytes([self.type]) + name.encode("utf-8") + b"\x00" + self.value


def _cstring_end(data: bytes, start: int) -> int:
    end = data.find(b"\x00", start)
    if end < 0:
        raise DumpFormatError("malformed BSON: unterminated field name")
    return end


def iter_elements(document: bytes) -> Iterator[Element]:
    """The top-level elements of one BSON document, values as their exact bytes."""
    (length,) = _INT32.unpack_from(document, 0)
    if length != len(document) or document[-1] != 0:
        raise DumpFormatError("malformed BSON: document length does not match")
    pos = 4
    end = length - 1
    while pos < end:
        kind = document[pos]
        name_end = _cstring_end(document, pos + 1)
        name = document[pos + 1:name_end].decode("utf-8")
        start = name_end + 1
        if kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
        elif kind in _STRING_TYPES:
            size = 4 + _INT32.unpack_from(document, start)[0]
        elif kind in _DOCUMENT_TYPES or kind == 0x0F:  # document, array, code with scope: int32 total size
            size = _INT32.unpack_from(document, start)[0]
        elif kind == 0x05:  # binary: int32 length, subtype byte, bytes
            size = 5 + _INT32.unpack_from(document, start)[0]
        elif kind == 0x0B:  # regex: two cstrings
            size = _cstring_end(document, _cstring_end(document, start) + 1) + 1 - start
        elif kind == 0x0C:  # DBPointer: string + ObjectId
            size = 4 + _INT32.unpack_from(document, start)[0] + 12
        else:
            raise DumpFormatError(f"malformed BSON: unknown element type 0x{kind:02x} in field {name!r}")
        if size < 0 or start + size > end:
            raise DumpFormatError(f"malformed BSON: field {name!r} runs past the end of its document")
        yield Element(kind, name, document[start:start + size])
        pos = start + size


def _subdocument(element: Element, what: str) -> bytes:
    if element.type != 0x03:
        raise DumpFormatError(f"{what} is not a document")
    return element.value


def _encode(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _INT32.pack(len(body) + 5) + body + b"\x00"


def bucket_version(bucket: bytes) -> int | None:
    """``control.version`` of a bucket document, or None when the document is not a bucket."""
    fields = {e.name: e for e in iter_elements(bucket)}
    control, data = fields.get("control"), fields.get("data")
    if control is None or data is None or control.type != 0x03 or data.type != 0x03:
        return None
    for element in iter_elements(control.value):
        if element.name == "version" and element.type in (0x10, 0x12, 0x01):
            if element.type == 0x01:
                return int(struct.unpack("<d", element.value)[0])
            return int.from_bytes(element.value, "little", signed=True)
    return None


def bucket_count(bucket: bytes) -> int | None:
    """``control.count`` (the number of measurements) of a compressed bucket; None where it is absent
    (uncompressed buckets do not carry it)."""
    for element in iter_elements(bucket):
        if element.name == "control" and element.type == 0x03:
            for field in iter_elements(element.value):
                if field.name == "count" and field.type in (0x10, 0x12):
                    return int.from_bytes(field.value, "little", signed=True)
    return None


def unpack_bucket(bucket: bytes, time_field: str, meta_field: str | None, where: str) -> list[bytes]:
    """The measurements of one uncompressed (version 1) bucket, as raw BSON documents.

    Each measurement is the time value, then the bucket's ``meta`` under the meta field (when present and not
    null/undefined), then every data column holding a value for that row, in the bucket's column order, as
    the server's bucket unpacker produces them. Values are copied byte for byte.
    """
    version = bucket_version(bucket)
    if version is None:
        raise DumpFormatError(f"{where}: a document in the buckets file is not a time-series bucket")
    if version != 1:
        raise DumpFormatError(
            f"{where}: compressed time-series buckets (control.version {version}) cannot be unpacked exactly by "
            "this engine, and the target does not accept raw buckets; restore into MongoDB (which takes the "
            "buckets as they are) or with mongorestore"
        )
    fields = {e.name: e for e in iter_elements(bucket)}
    columns: dict[str, dict[str, Element]] = {}
    for column in iter_elements(_subdocument(fields["data"], f"{where}: a bucket's data")):
        columns[column.name] = {e.name: e for e in iter_elements(_subdocument(column, f"{where}: column {column.name}"))}
    if time_field not in columns:
        raise DumpFormatError(f"{where}: a bucket has no column for the time field {time_field!r}")
    meta = fields.get("meta")
    include_meta = meta_field is not None and meta is not None and meta.type not in (0x0A, 0x06)
    measurements = []
    for row, time_value in columns[time_field].items():
        elements = [time_value.renamed(time_field)]
        if include_meta:
            assert meta is not None and meta_field is not None
            elements.append(meta.renamed(meta_field))
        for name, values in columns.items():
            if name != time_field and row in values:
                elements.append(values[row].renamed(name))
        measurements.append(_encode(elements))
    return measurements


def supports_raw_data(version: str | None) -> bool:
    """Whether a server of this version reads and writes buckets through the collection (``rawData``)."""
    parsed = version_tuple(version)
    return parsed is not None and parsed >= RAW_DATA_MIN_VERSION


def layout_to_dump(server_version: str | None, buckets_collection_listed: bool) -> str:
    """How to dump a time-series collection of a source (``LAYOUT_*``), as mongodump does: through
    ``rawData`` on 8.3+, from the ``system.buckets`` collection before; measurements only for a source that
    exposes no buckets at all."""
    if supports_raw_data(server_version):
        return LAYOUT_RAW_DATA
    return LAYOUT_BUCKETS_FILE if buckets_collection_listed else LAYOUT_MEASUREMENTS


def dumped_layout(has_buckets_file: bool, has_data_file: bool, dump_server_version: str | None) -> str | None:
    """Which layout a time-series collection's files are in (``LAYOUT_*``), or None when it has no data file."""
    if has_buckets_file:
        return LAYOUT_BUCKETS_FILE
    if not has_data_file:
        return None
    return LAYOUT_RAW_DATA if supports_raw_data(dump_server_version) else LAYOUT_MEASUREMENTS


__all__ = [
    "LAYOUT_BUCKETS_FILE",
    "LAYOUT_MEASUREMENTS",
    "LAYOUT_RAW_DATA",
    "bucket_count",
    "bucket_version",
    "dumped_layout",
    "iter_elements",
    "layout_to_dump",
    "supports_raw_data",
    "unpack_bucket",
]
