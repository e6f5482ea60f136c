"""Restoring from a dump the user already has (``source_dump_uri``), with no source server.

The dump is a ``mongodump`` directory (plain or gzip) in a local folder or under an ``s3://`` prefix, or a
``mongodump --archive`` file (local or an S3 object, plain or gzip). The run goes through the mongorestore
task group: inspection builds the inventory from the dump's own files, namespaces are filtered as usual,
each collection's files are made local (read in place from a folder, downloaded from S3, extracted from an
archive) and restored by the built-in engine, views last; validation compares the target with the dump's
documents (exact counts and, in full mode, the multiset digest of their raw BSON computed from the files).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from atlas_migration.engines import timeseries
from atlas_migration.engines.dump_layout import (
    PRELUDE_FILE,
    TIMESERIES_BUCKETS_PREFIX,
    collection_file_stem,
    dumped_files,
    find_bson_file,
    find_timeseries_buckets_file,
    iter_bson_file,
    list_dumped_namespaces,
    partial_path,
    read_metadata,
    read_prelude,
)
from atlas_migration.errors import ConfigurationError, DumpFormatError
from atlas_migration.namespaces import is_never_migrated
from atlas_migration.params import ARCHIVE, FOLDER, S3, DumpSource  # the URI's form is checked in the core
from atlas_migration.profile import CollectionInfo, SourceProfile

log = logging.getLogger(__name__)

def _local_kind(path: Path) -> str:
    if path.is_dir():
        return FOLDER
    if path.is_file():
        return ARCHIVE
    raise ConfigurationError(f"source_dump_uri {path} does not exist (neither a dump folder nor an archive file)")


def _check_folder(root: Path) -> Path:
    loose = [p.name for p in root.iterdir() if p.is_file() and p.name.endswith((".bson", ".bson.gz"))
             and not p.name.startswith(("oplog.", PRELUDE_FILE))]
    if loose:
        raise ConfigurationError(
            f"{root} holds collection files ({loose[0]}, ...) directly: source_dump_uri must be the dump's root, "
            "the folder above the database folders (mongodump --out)"
        )
    return root


class DumpReader:
    """Makes the user's dump readable on this worker and answers from it.

    ``work_root`` is this run's folder on this worker: downloads and extracted archives go below it, so every
    task (possibly on different workers) fetches what it reads.
    """

    def __init__(self, uri: str, work_root: Path, aws_conn_id: str = "") -> None:
        self.source = DumpSource.parse(uri)
        self.work_root = work_root
        self.aws_conn_id = aws_conn_id
        self._s3 = None

    # -- locating the dump
    @property
    def extracted_root(self) -> Path:
        return self.work_root / "source-dump"

    def _s3_parts(self) -> tuple[str, str]:
        bucket, _, key = self.source.uri[5:].partition("/")
        return bucket, key

    def _hook(self):
        if self._s3 is None:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            self._s3 = S3Hook(aws_conn_id=self.aws_conn_id or "aws_default")
        return self._s3

    def _s3_is_archive(self) -> bool:
        bucket, key = self._s3_parts()
        return bool(self._hook().check_for_key(key, bucket_name=bucket))

    def _archive_path(self) -> Path:
        """The local archive file (an S3 object is downloaded once per worker)."""
        if self.source.kind == FOLDER:
            return Path(self.source.uri)
        local = self.work_root / "source.archive"
        if not local.is_file():
            bucket, key = self._s3_parts()
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".part")
            self._hook().get_key(key, bucket_name=bucket).download_file(str(partial))
            partial.replace(local)
        return local

    def kind(self) -> str:
        """``folder``, ``archive`` or ``s3`` (an S3 prefix holding a dump folder)."""
        if self.source.kind == FOLDER:
            return _local_kind(Path(self.source.uri))
        return ARCHIVE if self._s3_is_archive() else S3

    # -- making files local
    def root_for(self, namespaces: list[tuple[str, str]] | None) -> Path:
        """A local dump root holding at least the files of ``namespaces`` (all of them when None)."""
        kind = self.kind()
        if kind == FOLDER:
            return _check_folder(Path(self.source.uri))
        root = self.extracted_root
        wanted = None if namespaces is None else set(namespaces)
        if kind == ARCHIVE:
            from atlas_migration.engines.archive import extract_archive

            extract_archive(self._archive_path(), root,
                            include=None if wanted is None else (lambda db, coll: (db, coll) in wanted))
            return root
        self._download_prefix(root, wanted)
        return root

    def _download_prefix(self, root: Path, wanted: set[tuple[str, str]] | None) -> None:
        bucket, prefix = self._s3_parts()
        hook = self._hook()
        keys = hook.list_keys(bucket_name=bucket, prefix=prefix + "/") or []
        if not keys:
            raise ConfigurationError(f"source_dump_uri {self.source.uri}: no dump files under that prefix")
        stems = None
        if wanted is not None:
            stems = {(db, collection_file_stem(c)) for db, c in wanted} | {
                (db, collection_file_stem(TIMESERIES_BUCKETS_PREFIX + c)) for db, c in wanted}
        fetched = 0
        for key in keys:
            relative = key[len(prefix) + 1:]
            parts = relative.split("/")
            if not relative or relative.endswith("/") or len(parts) > 2:
                continue
            if stems is not None and len(parts) == 2:
                stem = parts[1].split(".bson")[0].split(".metadata.json")[0]
                if (parts[0], stem) not in stems and not parts[1].startswith(PRELUDE_FILE):
                    continue
            destination = root / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            partial = partial_path(destination)  # the name may be 255 bytes already
            hook.get_key(key, bucket_name=bucket).download_file(str(partial))
            partial.replace(destination)
            fetched += 1
        log.info("fetched %d file(s) of the dump at %s", fetched, self.source.uri)

    def stage_collection(self, db: str, coll: str, dump_dir: Path, *, copy: bool) -> tuple[Path, list[str]]:
        """Put one namespace's files where a restore reads them: ``(dump root, files relative to it)``.

        A local folder is read in place unless ``copy`` (S3 staging: the files then go to ``dump_dir`` so that
        they can be uploaded like a dump's); S3 and archive sources are fetched or extracted into ``dump_dir``.
        """
        kind = self.kind()
        if kind == FOLDER:
            root = _check_folder(Path(self.source.uri))
            files = dumped_files(root, db, coll)
            if not copy:
                return root, files
            for relative in files:
                destination = dump_dir / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / relative, destination)
            return dump_dir, files
        if kind == ARCHIVE:
            from atlas_migration.engines.archive import extract_archive

            extract_archive(self._archive_path(), dump_dir, include=lambda d, c: (d, c) == (db, coll))
        else:
            self._download_prefix(dump_dir, {(db, coll)})
        return dump_dir, dumped_files(dump_dir, db, coll)


# ------------------------------------------------------------------------------------------- inventory
def _kind(meta) -> str:
    if meta.is_view:
        return "view"
    if meta.is_timeseries:
        return "timeseries"
    return "capped" if meta.options.get("capped") else "collection"


def timeseries_measurement_count(root: Path, db: str, coll: str, meta) -> int:
    """How many measurements the dumped buckets hold (``control.count`` of compressed buckets, the rows of
    uncompressed ones)."""
    spec = meta.options.get("timeseries") or {}
    data = find_timeseries_buckets_file(root, db, coll) or find_bson_file(root, db, coll)
    if data is None:
        return 0
    prelude = read_prelude(root)
    layout = timeseries.dumped_layout(find_timeseries_buckets_file(root, db, coll) is not None, True,
                                      prelude.server_version if prelude else None)
    if layout == timeseries.LAYOUT_MEASUREMENTS:
        return sum(1 for _ in iter_bson_file(data))
    total = 0
    for bucket in iter_bson_file(data):
        count = timeseries.bucket_count(bucket)
        total += count if count is not None else len(
            timeseries.unpack_bucket(bucket, spec.get("timeField"), spec.get("metaField"), f"{db}.{coll}"))
    return total


def collection_stats(root: Path, db: str, coll: str, meta) -> tuple[int, int]:
    """(documents, uncompressed BSON bytes) of one dumped namespace, read from its files."""
    if meta.is_view:
        return 0, 0
    data = find_timeseries_buckets_file(root, db, coll) or find_bson_file(root, db, coll)
    if data is None:
        return 0, 0
    size = count = 0
    for document in iter_bson_file(data):
        size += len(document)
        count += 1
    if meta.is_timeseries:
        count = timeseries_measurement_count(root, db, coll, meta)
    return count, size


def inventory(reader: DumpReader) -> SourceProfile:
    """A ``SourceProfile`` built from the dump's files: every namespace with its type, options, indexes,
    exact document count and size. No server is contacted."""
    from atlas_migration.inspection import _jsonable

    root = reader.root_for(None)
    prelude = read_prelude(root)
    profile = SourceProfile(conn_id="", hosts=[], version=prelude.server_version if prelude else None,
                            topology="unknown")
    profile.unknown["version"] = "read from the dump's prelude.json" if prelude else "the dump has no prelude.json"
    profile.notes.append(f"source: the dump at {reader.source.uri} (no source server)")
    for db, coll in list_dumped_namespaces(root):
        if is_never_migrated(db, coll):
            continue
        meta = read_metadata(root, db, coll)
        documents, size = collection_stats(root, db, coll, meta)
        profile.collections.append(CollectionInfo(
            db=db, name=coll, type=_kind(meta), documents=documents, size_bytes=size,
            indexes=[_jsonable(ix) for ix in meta.indexes], options=_jsonable(meta.options)))
    if not profile.collections:
        raise DumpFormatError(f"the dump at {reader.source.uri} holds no collection to restore")
    return profile


# ------------------------------------------------------------------------------------------ validation
def snapshot_from_dump(root: Path, db: str, coll: str, mode: str):
    """What the dump holds for one namespace, as a validation snapshot of the source side."""
    from atlas_migration.validation import (
        NamespaceSnapshot,
        multiset_digest,
        normalize_collection_options,
        normalize_indexes,
    )

    meta = read_metadata(root, db, coll)
    kind = _kind(meta)
    options = normalize_collection_options(meta.options)
    if kind == "view":
        return NamespaceSnapshot(db=db, coll=coll, mode=mode, exists=True, type=kind, options=options)
    indexes = normalize_indexes(meta.indexes)
    digest = None
    if kind == "timeseries":
        count = timeseries_measurement_count(root, db, coll, meta)
    else:
        data = find_bson_file(root, db, coll)
        if data is None:
            raise DumpFormatError(f"the dump has no data file for {db}.{coll}")
        if mode == "full":
            count, digest = multiset_digest(iter_bson_file(data))
        else:
            count = sum(1 for _ in iter_bson_file(data))
    return NamespaceSnapshot(db=db, coll=coll, mode=mode, exists=True, type=kind, count=count, indexes=indexes,
                             options=options, digest=digest)


def validate_against_dump(reader: DumpReader, target_client, namespaces: list[tuple[str, str]], *, mode: str,
                          target_db_map: dict[str, str] | None, run_id: str, strategy: str, batch_size: int):
    """A ``ValidationReport`` comparing the target with the dump's own files.

    Views compare their definitions (their documents are their source collection's, validated there); time
    series compare measurement counts, not digests (the server decides how measurements come back out of
    buckets); a digest mismatch is reported without document-level differences (no source to query).
    """
    import dataclasses
    import time

    from atlas_migration.validation import (
        ValidationReport,
        _utc_now,
        compare_namespace,
        snapshot_namespace,
    )

    db_map = dict(target_db_map or {})
    started_at, clock = _utc_now(), time.monotonic()
    root = reader.root_for(sorted(set(namespaces)))
    results = []
    for db, coll in sorted(set(namespaces)):
        source = snapshot_from_dump(root, db, coll, mode)
        target = snapshot_namespace(target_client, db_map.get(db, db), coll, mode=mode, batch_size=batch_size)
        if source.type in ("view", "timeseries"):
            target = dataclasses.replace(target, digest=None, count=None if source.type == "view" else target.count)
        results.append(compare_namespace(source, target))
    return ValidationReport(run_id=run_id, strategy=strategy, mode=mode, started_at=started_at,
                            finished_at=_utc_now(), seconds=round(time.monotonic() - clock, 3),
                            results=sorted(results, key=lambda r: r.namespace))


def result_summary(item: dict[str, Any], root: Path) -> dict[str, Any]:
    """Documents and bytes of a staged namespace, for the dump task's XCom."""
    meta = read_metadata(root, item["db"], item["collection"])
    documents, size = collection_stats(root, item["db"], item["collection"], meta)
    return {"documents": documents, "bytes": size}


__all__ = [
    "ARCHIVE",
    "FOLDER",
    "S3",
    "DumpReader",
    "DumpSource",
    "inventory",
    "snapshot_from_dump",
    "validate_against_dump",
]
