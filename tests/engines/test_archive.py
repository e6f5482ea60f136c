"""``mongodump --archive`` files: the reader (with CRC checks) and the writer, no server involved.

The reader was also checked by hand against mongo-tools' own ``mongorestore/testdata/timeseries_tests/
dump.archive`` (written by mongodump 100.3.1 from 5.0.0-rc0): 10 buckets of ``timeseries_test.foo_ts``,
CRCs matching; that file is not part of the shared reference folder, so no test here depends on it.
"""

from __future__ import annotations

import gzip

import pytest

from atlas_migration.engines.archive import Crc64, extract_archive, read_archive_prelude, write_archive
from atlas_migration.engines.dump_layout import (
    find_bson_file,
    find_metadata_file,
    iter_bson_file,
    metadata_text,
    read_prelude,
)
from atlas_migration.errors import DumpFormatError

PEER = "mongodump-100.9.4/plain"


def test_crc64_is_go_ecma():
    crc = Crc64()
    crc.update(b"123456789")
    assert crc.value == 0x995DC9BBDF1939FA  # the CRC-64/XZ (Go crc64.ECMA) check value


@pytest.mark.parametrize("compressed", [False, True])
def test_an_archive_of_real_mongodump_output_extracts_to_the_same_files(mongodump_fixtures, tmp_path, compressed):
    source = mongodump_fixtures / PEER
    archive = write_archive(source, tmp_path / "peer.archive", gzip=compressed, server_version="8.2.11",
                            tool_version="100.9.4")
    assert (archive.read_bytes()[:2] == b"\x1f\x8b") is compressed
    header, collections = read_archive_prelude(archive)
    assert (header.format_version, header.server_version, header.tool_version) == ("0.1", "8.2.11", "100.9.4")
    assert {c.collection for c in collections} >= {"sp ace", "c++", "big_orders", "orders.2024"}
    out = tmp_path / "out"
    extract_archive(archive, out)
    names = {c.collection for c in collections}
    for name in names:
        assert metadata_text(find_metadata_file(out, "peer", name)) == metadata_text(find_metadata_file(source, "peer", name))
        original = find_bson_file(source, "peer", name)
        if original is not None:
            assert find_bson_file(out, "peer", name).read_bytes() == original.read_bytes(), name
    assert read_prelude(out).server_version == "8.2.11"
    # Only what is asked for.
    only = tmp_path / "only"
    extract_archive(archive, only, include=lambda db, coll: coll == "c++")
    assert sorted(p.name for p in (only / "peer").iterdir()) == ["c%2B%2B.bson", "c%2B%2B.metadata.json"]


def test_a_corrupt_or_truncated_archive_is_refused(mongodump_fixtures, tmp_path):
    archive = write_archive(mongodump_fixtures / PEER, tmp_path / "a.archive", server_version="8.2.11")
    data = archive.read_bytes()
    # One bit flipped in the middle of a document: framing intact, only the namespace's CRC can tell.
    document = next(iter_bson_file(mongodump_fixtures / PEER / "peer" / "orders.2024.bson"))
    at = data.index(document) + len(document) // 2
    flipped = tmp_path / "flipped.archive"
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
    with pytest.raises(DumpFormatError, match=r"documents of peer\.orders\.2024 do not match their CRC"):
        extract_archive(flipped, tmp_path / "x")
    assert not (tmp_path / "x" / "peer" / "orders.2024.bson").exists()  # no half-extracted data file
    truncated = tmp_path / "truncated.archive"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DumpFormatError, match="ends early|truncated"):
        extract_archive(truncated, tmp_path / "y")
    not_archive = tmp_path / "nope.archive"
    not_archive.write_bytes(gzip.compress(b"\x00" * 64))
    with pytest.raises(DumpFormatError, match="not a mongodump archive"):
        extract_archive(not_archive, tmp_path / "z")


def test_an_archive_of_a_server_before_4_2_is_refused(mongodump_fixtures, tmp_path):
    archive = write_archive(mongodump_fixtures / PEER, tmp_path / "old.archive", server_version="4.0.14")
    with pytest.raises(DumpFormatError, match=r"MongoDB 4\.0\.14.*100\.19"):
        extract_archive(archive, tmp_path / "x")
    assert not (tmp_path / "x").exists()
