"""Every dump written by real mongodump in ``../shared/reference/mongodump-dumps`` (read-only): the engine
restores it exactly (raw BSON, indexes, options, views) or refuses it with the clear error its README row
calls for, before anything of it stays in the target.

Each case restores every namespace the dump holds (views last) into the session's target server, compares,
and the ``target`` fixture drops everything afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import bson
import pytest
from bson import SON, ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines import timeseries
from atlas_migration.engines.dump_layout import (
    find_bson_file,
    find_timeseries_buckets_file,
    iter_bson_file,
    list_dumped_namespaces,
    read_metadata,
)
from atlas_migration.engines.native import restore_collection
from atlas_migration.errors import DumpFormatError, MigrationError
from atlas_migration.namespaces import is_never_migrated

pytestmark = pytest.mark.integration

RAW = CodecOptions(document_class=RawBSONDocument)
TD = "mongo-tools/mongorestore/testdata"
QA = "mongo-tools/test/qa-tests/jstests/restore/testdata"
BSONDUMP = "mongo-tools/bsondump/testdata"

# Refusals the README rows call for (legacy or corrupt inputs), by namespace ("*": every namespace).
OPLOG = r"mongodump --oplog .* mongorestore --oplogReplay"
CASES: dict[str, tuple[str, dict[str, str]]] = {
    "coll_with_index": (f"{TD}/coll_with_index", {}),
    "coll_without_index": (f"{TD}/coll_without_index", {}),
    "collMod_ttl_index": (f"{TD}/collMod_ttl_index", {"*": OPLOG}),
    "duplicate_index_key_with_oplog": (f"{TD}/duplicate_index_key_with_oplog", {"*": OPLOG}),
    "hashedIndexes": ("placed:hashedIndexes", {}),
    "test_auto_idx": ("placed:test_auto_idx", {"*": r"autoIndexId: false"}),
    "aws_test_db": ("placed:aws_test_db", {}),
    "indexmetadata": (f"{TD}/indexmetadata", {}),
    "longindextestdump": (f"{TD}/longindextestdump", {}),
    "longcollectionname": (f"{TD}/longcollectionname", {}),
    "specialcharacter": (f"{TD}/specialcharacter", {}),
    "prelude_gzip": (f"{TD}/prelude_test/prelude_gzip", {}),
    "foodump": (f"{TD}/foodump", {}),
    "index_collation": (f"{TD}/index_collation", {}),
    "viewdump": (f"{TD}/viewdump", {}),
    "timeseries ts_dump": (f"{TD}/timeseries_tests/ts_dump", {}),
    "c5timeseries": (f"{TD}/c5timeseries", {}),
    "dump_with_oplog (2.x)": (f"{QA}/dump_with_oplog", {"*": r"system\.indexes\.bson.*mongodump 2\.x/3\.0"}),
    "coll_with_ttl_index": (f"{TD}/coll_with_ttl_index", {}),
    "coll_with_geohaystack_index": (f"{TD}/coll_with_geohaystack_index", {"*": r"geoHaystack index.*removed"}),
    "duplicate_index_key": (f"{TD}/duplicate_index_key", {"*": r"legacy key value '' for 'foo'"}),
    "indextestdump": (f"{TD}/indextestdump", {"*": r"legacy key value True for 'b'"}),
    "testdirs": (f"{TD}/testdirs", {"db1.c2": r"no metadata file for db1\.c2"}),
    "dump_extended_json_options": (f"{QA}/dump_extended_json_options", {}),
    "dump_ordered_partial_index": (f"{QA}/dump_ordered_partial_index", {"*": r"no data file .* incomplete"}),
    "mongodump-100.9.4 plain": ("mongodump-100.9.4/plain", {}),
    "mongodump-100.9.4 gzip": ("mongodump-100.9.4/gzip", {}),
    "bsondump": ("placed:bsondump", {
        "bsondump.bad_cstring": r"refused a batch .* invalid BSON",
        "bsondump.bad_type": r"refused a batch .* invalid BSON",
        "bsondump.invalid_field_name": r"invalid_field_name\.bson is truncated",
        "bsondump.partial_file": r"partial_file\.bson is truncated",
        "bsondump.random_bytes": r"random_bytes\.bson is not valid BSON at offset 0",
    }),
}
# What the local test server (SecantusDB) cannot build although MongoDB does: there the restore must fail
# naming the indexes, with the server's reason, and leave nothing behind; against MongoDB
# (MIGRATION_TEST_TARGET_URI) these cases must restore exactly like the others.
TEST_SERVER_GAPS = {
    "hashedIndexes": r"cannot build indexes \(a\.a_1, a\.b_hashed, b_hashed\) on test\.hashedIndexes \(code 67\)",
    "index_collation": r"cannot build indexes \(example_text\) on test\.foo \(code 67\)",
    # Decimal128(-1) as an index key value: the server fails internally.
    "indexmetadata": r"cannot build indexes \(a_1_b_true\) on indextest\.test_coll_no_index_ns \(code 1\)",
}


def _link(dest: Path, source: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(source)


def _materialise(spec: str, fixtures: Path, tmp_path: Path) -> Path:
    """The dump root of a case; some fixtures are single files a mongo-tools test places into a dump first
    (symlinked here, never copied into the repository)."""
    if not spec.startswith("placed:"):
        return fixtures / spec
    name, root = spec.removeprefix("placed:"), tmp_path / "dump"
    if name in ("hashedIndexes", "test_auto_idx"):
        for suffix in (".bson", ".metadata.json"):
            _link(root / "test" / f"{name}{suffix}", fixtures / TD / f"{name}{suffix}")
    elif name == "aws_test_db":
        _link(root / "aws_test_db", fixtures / TD / "aws_test_db")
    elif name == "bsondump":
        # bsondump's inputs, each given a metadata file in mongodump's format.
        for path in sorted((fixtures / BSONDUMP).glob("*.bson")):
            _link(root / "bsondump" / path.name, path)
            (root / "bsondump" / f"{path.stem}.metadata.json").write_text(json.dumps({
                "indexes": [{"v": {"$numberInt": "2"}, "key": {"_id": {"$numberInt": "1"}}, "name": "_id_"}],
                "collectionName": path.stem, "type": "collection"}, separators=(",", ":")))
    return root


def _without_generated_id(raw: bytes) -> bytes:
    """A document minus its ``_id`` element: the server adds one to documents that have none."""
    body = b"".join(e.renamed(e.name) for e in timeseries.iter_elements(raw) if e.name != "_id")
    return len(body + b"12345").to_bytes(4, "little") + body + b"\x00"


def _as_test_server_stores(raw: bytes, *, array: bool = False) -> bytes:
    """The local test server decodes and re-encodes documents, so the deprecated BSON types come back as
    their modern equivalents (symbol -> string, undefined -> null, DBPointer -> DBRef document) and array
    keys renumbered, where MongoDB keeps the bytes it was given; only against that server, the expected
    bytes get the same rewrite."""
    out = []
    for position, e in enumerate(timeseries.iter_elements(raw)):
        name = (str(position) if array else e.name).encode() + b"\x00"
        if e.type == 0x0E:
            out.append(b"\x02" + name + e.value)
        elif e.type == 0x06:
            out.append(b"\x0a" + name)
        elif e.type == 0x0C:
            length = int.from_bytes(e.value[:4], "little")
            ref = SON([("$ref", e.value[4:4 + length - 1].decode()), ("$id", ObjectId(e.value[4 + length:]))])
            out.append(b"\x03" + name + bson.encode(ref))
        elif e.type in (0x03, 0x04):
            out.append(bytes([e.type]) + name + _as_test_server_stores(e.value, array=e.type == 0x04))
        else:
            out.append(bytes([e.type]) + name + e.value)
    body = b"".join(out)
    return len(body + b"12345").to_bytes(4, "little") + body + b"\x00"


def _assert_restored_exactly(dst, root: Path, db: str, coll: str, *, test_server: bool) -> None:
    meta = read_metadata(root, db, coll)
    info = next(dst[db].list_collections(filter={"name": coll}))
    for option, value in meta.options.items():
        assert info["options"].get(option) == value, (db, coll, option)
    if meta.is_view:
        assert info["type"] == "view"
        return
    if meta.is_timeseries:
        spec = meta.options["timeseries"]
        buckets = find_timeseries_buckets_file(root, db, coll)
        expected = sum(len(timeseries.unpack_bucket(b, spec["timeField"], spec.get("metaField"), coll))
                       for b in iter_bson_file(buckets))
        assert dst[db][coll].count_documents({}) == expected
    else:
        dumped = sorted(iter_bson_file(find_bson_file(root, db, coll)))
        if test_server:
            dumped = sorted(_as_test_server_stores(d) for d in dumped)
        restored = [bytes(d.raw) for d in dst[db].get_collection(coll, codec_options=RAW).find()]
        have_ids = {d for d in dumped}
        restored = sorted(d if d in have_ids else _without_generated_id(d) for d in restored)
        assert restored == dumped, (db, coll)  # byte for byte
    target_indexes = {ix["name"]: ix for ix in dst[db][coll].list_indexes()}
    for index in meta.indexes:
        if index["name"] == "_id_":
            continue
        built = target_indexes[index["name"]]
        assert list(built["key"].items()) == list(index["key"].items()), index["name"]
        for option, value in index.items():
            if option not in ("v", "ns", "background", "key"):
                assert built.get(option) == value, (index["name"], option)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_dump_restores_exactly_or_is_refused_clearly(case, target, mongodump_fixtures, tmp_path):
    spec, refusals = CASES[case]
    root = _materialise(spec, mongodump_fixtures, tmp_path)
    namespaces = [(db, c) for db, c in list_dumped_namespaces(root) if not is_never_migrated(db, c)]
    assert namespaces, f"{case}: no namespace found in {root}"
    views = [ns for ns in namespaces if find_bson_file(root, *ns) is None and _is_view(root, *ns)]
    restored = 0
    with target.client() as dst:
        for db, coll in [ns for ns in namespaces if ns not in views] + views:
            refusal = refusals.get(f"{db}.{coll}") or refusals.get("*")
            if refusal is not None:
                with pytest.raises(MigrationError, match=refusal):
                    restore_collection(dst, root, db, coll)
                assert coll not in dst[db].list_collection_names()  # nothing of it left behind
                continue
            gap = TEST_SERVER_GAPS.get(case) if target.local is not None else None
            if gap is not None:
                with pytest.raises(MigrationError, match=gap):
                    restore_collection(dst, root, db, coll)
                assert coll not in dst[db].list_collection_names()
                continue
            restore_collection(dst, root, db, coll)
            _assert_restored_exactly(dst, root, db, coll, test_server=target.local is not None)
            restored += 1
    assert restored or refusals or case in TEST_SERVER_GAPS, case


def _is_view(root: Path, db: str, coll: str) -> bool:
    try:
        return read_metadata(root, db, coll).is_view
    except DumpFormatError:
        return False
