"""``mongodump --archive`` files: read into mongodump's directory layout, and written from it.

The format (mongo-tools ``common/archive/spec.md``)::

    archive        = magic (int32 LE 0x8199e26d), header document, *collection-metadata document,
                     terminator (0xffffffff), *(namespace-segment | namespace-eof)
    namespace-segment = {db, collection, EOF: false, CRC: 0}, +document, terminator
    namespace-eof     = {db, collection, EOF: true, CRC: <CRC-64-ECMA of the namespace's documents>}, terminator
    header         = {concurrent_collections: int32, version: "0.1", server_version, tool_version}
    collection-metadata = {db, collection, metadata: <the metadata.json text>, size: int32, type}

Documents of several collections are interleaved. ``--archive --gzip`` gzips the whole stream. A
time-series collection's data is under ``system.buckets.<coll>`` (servers before 8.3) or ``<coll>`` (8.3+).

``extract_archive`` turns an archive into the directory layout (plain files, a ``prelude.json`` carrying the
archive's server and tool versions), checking every namespace's CRC, so the rest of this package reads an
archive exactly like a dump folder. ``write_archive`` does the reverse, for tests and for handing a dump to
``mongorestore --archive``.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import bson
from bson import SON, Int64

from atlas_migration.engines.dump_layout import (
    MAX_BSON_DOCUMENT_SIZE,
    METADATA_SUFFIX,
    MIN_BSON_DOCUMENT_SIZE,
    TIMESERIES_BUCKETS_PREFIX,
    BsonFileWriter,
    Prelude,
    bson_path,
    check_prelude,
    collection_file_stem,
    find_bson_file,
    find_metadata_file,
    find_timeseries_buckets_file,
    iter_bson_file,
    list_dumped_namespaces,
    metadata_text,
    read_metadata,
    write_prelude,
)
from atlas_migration.errors import DumpFormatError

MAGIC = 0x8199E26D
FORMAT_VERSION = "0.1"
_TERMINATOR = b"\xff\xff\xff\xff"
_INT32 = struct.Struct("<i")
_GZIP_MAGIC = b"\x1f\x8b"

# CRC-64-ECMA as Go's hash/crc64 computes it (reflected polynomial, initial and final value inverted).
_CRC64_POLY = 0xC96C5795D7870F42
_CRC64_MASK = (1 << 64) - 1


def _crc64_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC64_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC64_TABLE = _crc64_table()


class Crc64:
    """Running CRC-64-ECMA (Go ``crc64.New(crc64.MakeTable(crc64.ECMA))``). Pure Python: about 10 MB/s."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes) -> None:
        crc, table = self._crc ^ _CRC64_MASK, _CRC64_TABLE
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self._crc = crc ^ _CRC64_MASK

    @property
    def value(self) -> int:
        return self._crc


@dataclass(frozen=True)
class ArchiveHeader:
    concurrent_collections: int
    format_version: str
    server_version: str
    tool_version: str


@dataclass(frozen=True)
class ArchiveCollection:
    """One collection-metadata entry of the archive's prelude."""

    db: str
    collection: str
    metadata: str
    size: int
    type: str


class _Reader:
    """Reads the archive stream, tracking the offset for error messages."""

    def __init__(self, stream: BinaryIO, where: str) -> None:
        self.stream, self.where, self.offset = stream, where, 0

    def exact(self, n: int, what: str) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:
            raise DumpFormatError(f"{self.where} ends early at offset {self.offset} while reading {what}")
        self.offset += n
        return data

    def document_or_terminator(self, what: str, *, end_ok: bool = False) -> bytes | None:
        if end_ok:
            head = self.stream.read(4)
            if not head:
                raise EOFError  # the stream ends cleanly between two namespace segments
            if len(head) < 4:
                raise DumpFormatError(f"{self.where} ends early at offset {self.offset} while reading {what}")
            self.offset += 4
        else:
            head = self.exact(4, what)
        if head == _TERMINATOR:
            return None
        (length,) = _INT32.unpack(head)
        if not MIN_BSON_DOCUMENT_SIZE <= length <= MAX_BSON_DOCUMENT_SIZE:
            raise DumpFormatError(f"{self.where}: {what} at offset {self.offset - 4} declares {length} bytes")
        body = self.exact(length - 4, what)
        if body[-1] != 0:
            raise DumpFormatError(f"{self.where}: {what} at offset {self.offset - length} is not valid BSON")
        return head + body

    def document(self, what: str) -> dict:
        raw = self.document_or_terminator(what)
        if raw is None:
            raise DumpFormatError(f"{self.where}: a terminator at offset {self.offset - 4} where {what} was expected")
        try:
            return bson.decode(raw)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed archive
            raise DumpFormatError(f"{self.where}: {what} at offset {self.offset - len(raw)} is not valid BSON: {exc}") from None


def _open(path: Path) -> BinaryIO:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller's with-block
    head = raw.read(2)
    raw.seek(0)
    if head == _GZIP_MAGIC:  # mongodump --archive --gzip compresses the whole stream
        return io.BufferedReader(gzip_module.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 20)
    return raw


def _read_prelude(reader: _Reader) -> tuple[ArchiveHeader, list[ArchiveCollection]]:
    (magic,) = struct.unpack("<I", reader.exact(4, "the magic number"))
    if magic != MAGIC:
        raise DumpFormatError(
            f"{reader.where} is not a mongodump archive (magic number 0x{magic:08x}, expected 0x{MAGIC:08x})"
        )
    header = reader.document("the archive header")
    parsed = ArchiveHeader(
        concurrent_collections=int(header.get("concurrent_collections") or 1),
        format_version=str(header.get("version") or ""),
        server_version=str(header.get("server_version") or ""),
        tool_version=str(header.get("tool_version") or ""),
    )
    if parsed.format_version != FORMAT_VERSION:
        raise DumpFormatError(
            f"{reader.where}: archive format version {parsed.format_version!r} is not {FORMAT_VERSION!r}, the only "
            "one mongodump writes; this engine cannot read it"
        )
    collections = []
    while True:
        raw = reader.document_or_terminator("a collection's metadata")
        if raw is None:
            break
        entry = bson.decode(raw)
        if not isinstance(entry.get("db"), str) or not isinstance(entry.get("collection"), str):
            raise DumpFormatError(f"{reader.where}: a collection-metadata entry has no db/collection")
        collections.append(ArchiveCollection(entry["db"], entry["collection"], str(entry.get("metadata") or ""),
                                             int(entry.get("size") or 0), str(entry.get("type") or "")))
    return parsed, collections


def read_archive_prelude(path: Path | str) -> tuple[ArchiveHeader, list[ArchiveCollection]]:
    """The header and the collection list of an archive (only its beginning is read)."""
    path = Path(path)
    with _open(path) as stream:
        return _read_prelude(_Reader(stream, str(path)))


def _data_collection(entry: ArchiveCollection, server_version: str) -> str:
    from atlas_migration.engines.timeseries import supports_raw_data

    if entry.type == "timeseries" and not supports_raw_data(server_version):
        return TIMESERIES_BUCKETS_PREFIX + entry.collection
    return entry.collection


def extract_archive(path: Path | str, out_root: Path | str,
                    include: Callable[[str, str], bool] | None = None) -> ArchiveHeader:
    """Write the archive's collections (those ``include(db, coll)`` accepts) into ``out_root`` in mongodump's
    directory layout, plain files, with a ``prelude.json``. Every namespace's CRC is checked; a mismatch,
    a truncated stream or data for an undeclared namespace raises ``DumpFormatError``."""
    path, out_root = Path(path), Path(out_root)
    where = str(path)
    try:
        with _open(path) as stream:
            reader = _Reader(stream, where)
            header, collections = _read_prelude(reader)
            # Refuse servers the engine cannot restore before writing anything.
            check_prelude(Prelude(header.server_version or "unknown", header.tool_version), where)
            wanted = {(c.db, c.collection) for c in collections if include is None or include(c.db, c.collection)}
            data_names: dict[tuple[str, str], ArchiveCollection] = {}
            for entry in collections:
                data_names[(entry.db, _data_collection(entry, header.server_version))] = entry
                if (entry.db, entry.collection) in wanted:
                    meta_file = out_root / entry.db / (collection_file_stem(entry.collection) + METADATA_SUFFIX)
                    meta_file.parent.mkdir(parents=True, exist_ok=True)
                    meta_file.write_text(entry.metadata, encoding="utf-8")
            writers: dict[tuple[str, str], BsonFileWriter] = {}
            crcs: dict[tuple[str, str], Crc64] = {}
            done: set[tuple[str, str]] = set()
            try:
                _read_body(reader, data_names, wanted, out_root, writers, crcs, done)
                for writer in writers.values():
                    writer.close()
            except BaseException:
                for writer in writers.values():
                    writer.abort()
                raise
    except (EOFError, zlib.error, gzip_module.BadGzipFile) as exc:
        raise DumpFormatError(f"{where} is not a complete gzip stream: {exc}") from None
    for db, coll in wanted:
        entry = next(c for c in collections if (c.db, c.collection) == (db, coll))
        if entry.type != "view" and (db, _data_collection(entry, header.server_version)) not in writers:
            # A collection with no documents has no segment: give it the empty data file mongodump writes.
            BsonFileWriter(bson_path(out_root, db, _data_collection(entry, header.server_version), gzip=False)).close()
    write_prelude(out_root, Prelude(header.server_version or "unknown", header.tool_version), gzip=False)
    return header


def _read_body(reader: _Reader, data_names: dict[tuple[str, str], ArchiveCollection],
               wanted: set[tuple[str, str]], out_root: Path, writers: dict[tuple[str, str], BsonFileWriter],
               crcs: dict[tuple[str, str], Crc64], done: set[tuple[str, str]]) -> None:
    while True:
        try:
            raw = reader.document_or_terminator("a namespace header", end_ok=True)
        except EOFError:
            break
        if raw is None:
            continue  # mongodump may end the body with a bare terminator
        header = bson.decode(raw)
        key = (str(header.get("db")), str(header.get("collection")))
        if key == ("", "oplog"):  # mongodump --archive --oplog
            if not header.get("EOF") and reader.document_or_terminator("an oplog entry") is not None:
                raise DumpFormatError(
                    f"{reader.where} was written by mongodump --oplog and holds oplog entries that must be replayed "
                    "for the data to be consistent; this engine does not replay them: restore it with mongorestore "
                    "--oplogReplay"
                )
            if header.get("EOF"):
                reader.document_or_terminator("the terminator after the oplog's EOF header")
            continue
        entry = data_names.get(key)
        if entry is None:
            raise DumpFormatError(f"{reader.where}: data for {key[0]}.{key[1]}, which the archive does not declare")
        crc = crcs.setdefault(key, Crc64())
        if header.get("EOF"):
            if reader.document_or_terminator("the terminator after an EOF header") is not None:
                raise DumpFormatError(f"{reader.where}: no terminator after the EOF header of {key[0]}.{key[1]}")
            expected = int(header.get("CRC") or 0) & _CRC64_MASK
            if crc.value != expected:
                raise DumpFormatError(
                    f"{reader.where}: the documents of {key[0]}.{key[1]} do not match their CRC "
                    f"(computed {crc.value:016x}, archive {expected:016x}): the archive is corrupt"
                )
            done.add(key)
            continue
        if key in done:
            raise DumpFormatError(f"{reader.where}: data for {key[0]}.{key[1]} after its EOF header")
        writer = writers.get(key)
        if (entry.db, entry.collection) in wanted and writer is None:
            writer = writers[key] = BsonFileWriter(bson_path(out_root, key[0], key[1], gzip=False))
        while True:
            document = reader.document_or_terminator(f"a document of {key[0]}.{key[1]}")
            if document is None:
                break
            crc.update(document)
            if writer is not None:
                writer.write(document)
    unfinished = sorted(f"{db}.{coll}" for db, coll in crcs if (db, coll) not in done)
    if unfinished:
        raise DumpFormatError(f"{reader.where} ends before the EOF header of {', '.join(unfinished)}: it is truncated")


def write_archive(dump_root: Path | str, archive_path: Path | str, *, gzip: bool = False,
                  server_version: str = "", tool_version: str = "") -> Path:
    """Write a directory dump as a mongodump archive (format 0.1): every namespace in one segment and an EOF
    header with its CRC, as mongodump does with one collection at a time."""
    dump_root, archive_path = Path(dump_root), Path(archive_path)
    namespaces = list_dumped_namespaces(dump_root)
    entries, data = [], []
    for db, coll in namespaces:
        meta = read_metadata(dump_root, db, coll)
        meta_file = find_metadata_file(dump_root, db, coll)
        text = metadata_text(meta_file) if meta_file else meta.to_json()
        kind = "view" if meta.is_view else ("timeseries" if meta.is_timeseries else "")
        entries.append(SON([("db", db), ("collection", coll), ("metadata", text), ("size", 0), ("type", kind)]))
        if meta.is_view:
            continue
        buckets = find_timeseries_buckets_file(dump_root, db, coll)
        source = buckets or find_bson_file(dump_root, db, coll)
        if source is not None:
            data.append((db, TIMESERIES_BUCKETS_PREFIX + coll if buckets else coll, source))
    header = SON([("concurrent_collections", 1), ("version", FORMAT_VERSION),
                  ("server_version", server_version), ("tool_version", tool_version)])
    with open(archive_path, "wb") as raw:
        out: BinaryIO = gzip_module.GzipFile(fileobj=raw, mode="wb", mtime=0) if gzip else raw  # type: ignore[assignment]
        out.write(struct.pack("<I", MAGIC) + bson.encode(header))
        for entry in entries:
            out.write(bson.encode(entry))
        out.write(_TERMINATOR)
        for db, coll, source in data:
            crc = Crc64()
            out.write(bson.encode(SON([("db", db), ("collection", coll), ("EOF", False), ("CRC", Int64(0))])))
            for document in iter_bson_file(source):
                crc.update(document)
                out.write(document)
            out.write(_TERMINATOR)
            signed = crc.value - (1 << 64) if crc.value >= 1 << 63 else crc.value
            out.write(bson.encode(SON([("db", db), ("collection", coll), ("EOF", True), ("CRC", Int64(signed))])))
            out.write(_TERMINATOR)
        if out is not raw:
            out.close()
    return archive_path


__all__ = [
    "ArchiveCollection",
    "ArchiveHeader",
    "Crc64",
    "extract_archive",
    "read_archive_prelude",
    "write_archive",
]
