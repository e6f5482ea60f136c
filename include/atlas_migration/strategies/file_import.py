"""The ``file_import`` strategy: JSON and CSV/TSV files into Atlas, the way ``mongoimport`` users expect.

Chosen when the run names files (``source_files``: local paths, globs, or ``s3://bucket/prefix`` read through
the Amazon provider's ``S3Hook``) instead of a source deployment.

    inspect_source (inspect_files: size, format, sample fields and types, estimated rows; no source server)
      -> route (rule 'source_files') -> file_import.plan (target checks; byte ranges per file)
      -> file_import.import_range   (mapped: one task per byte range, several per large file; batched
                                      beyond Airflow's max_map_length)
      -> validate (per namespace: documents = rows parsed - rows rejected; digest in full mode) -> report

Each file goes to ``file_options[<pattern>].namespace`` or ``<target_db>.<file stem>``. The parsing engine is
``atlas_migration.engines.file_import`` (its docstring gives the formats, the typing rules and the range
boundary rule). Insert mode refuses target namespaces that hold data unless ``drop_target`` (as the
mongorestore path does); upsert, merge and delete modes exist to change a target that holds data.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import IO, Any

from airflow.sdk import task, task_group

from atlas_migration.errors import ConfigurationError, MigrationError, ValidationFailed

log = logging.getLogger("atlas_migration")
GROUP_ID = "file_import"
SECTION = "Files"
ENGINES = ("auto", "native", "mongoimport")
OVERRIDABLE = ("namespace", "format", "header_line", "fields", "columns_have_types", "ignore_blanks",
               "parse_errors", "mode", "upsert_fields")
SAMPLE_ROWS = 20
MAX_RANGES_PER_FILE = 1000  # a larger file gets larger ranges (mapped tasks are batched beyond max_map_length)


def file_import_params() -> dict[str, Any]:
    """The trigger form's "Files" section."""
    from airflow.sdk import Param

    from atlas_migration.engines.file_import import MODES, PARSE_ERROR_POLICIES

    def param(default: Any, title: str, description: str, **schema: Any) -> Param:
        return Param(default, title=title, description=description, section=SECTION, **schema)

    return {
        "source_files": param(
            [], "Source files", "Import files instead of a source deployment: local paths or globs on the workers, "
            "or s3://bucket/prefix (every object under it, through the AWS connection). JSON, JSON array, CSV, TSV, "
            "optionally .gz.", type="array", items={"type": "string"}),
        "target_db": param("", "Target database",
                           "Database of files without a namespace in file_options: <target_db>.<file stem>.",
                           type="string"),
        "file_options": param(
            {}, "Per-file options",
            "Object: file-name glob -> overrides, e.g. {\"people*.csv\": {\"namespace\": \"crm.people\", "
            f"\"columns_have_types\": true}}}}. Keys: {', '.join(OVERRIDABLE)}.", type="object"),
        "file_format": param("auto", "Format", "auto (from the name, else the content), json (one document per "
                             "line), json_array, csv or tsv.", type="string",
                             enum=["auto", "json", "json_array", "csv", "tsv"]),
        "header_line": param(True, "Header line", "CSV/TSV: the first line names the columns (--headerline).",
                             type="boolean"),
        "fields": param([], "Fields", "CSV/TSV without a header line: the column names (--fields); set "
                        "header_line=false.", type="array", items={"type": "string"}),
        "columns_have_types": param(False, "Columns have types", "CSV/TSV names are name.type(arg) "
                                    "(--columnsHaveTypes), e.g. age.int32(), born.date(2006-01-02).",
                                    type="boolean"),
        "ignore_blanks": param(False, "Ignore blank fields", "Leave empty CSV/TSV fields out of the document "
                               "(--ignoreBlanks) instead of storing empty strings.", type="boolean"),
        "parse_errors": param("stop", "Bad rows", "stop (fail at the first bad row), skip_row, skip_field, or "
                              "auto_cast (store the value as auto-typed) (--parseGrace). Rejected rows are "
                              "reported by file and line, never by content.", type="string",
                              enum=list(PARSE_ERROR_POLICIES)),
        "import_mode": param("insert", "Mode", "insert, upsert (replace the matching document), merge (set the "
                             "file's fields on it) or delete (remove it), matched on upsert_fields (--mode).",
                             type="string", enum=list(MODES)),
        "upsert_fields": param(["_id"], "Upsert fields", "Fields (dotted paths) that identify a document for "
                               "upsert, merge and delete (--upsertFields).", type="array",
                               items={"type": "string"}, minItems=1),
        "import_engine": param("auto", "Import engine", "native (built in: parallel byte ranges, retry-safe, "
                               "rejections by line), mongoimport (when on PATH; one task per local, uncompressed "
                               "file), or auto (native).", type="string", enum=list(ENGINES)),
        "file_split_bytes": param(64 << 20, "Split size", "Bytes per import task: larger uncompressed JSON Lines, "
                                  "CSV and TSV files are split on record boundaries into ranges of about this "
                                  "size, imported in parallel.", type="integer", minimum=4096),
    }


@dataclass(frozen=True)
class FileImportParams:
    source_files: list[str]
    target_db: str
    file_options: dict[str, dict[str, Any]]
    file_format: str
    header_line: bool
    fields: list[str]
    columns_have_types: bool
    ignore_blanks: bool
    parse_errors: str
    mode: str
    upsert_fields: list[str]
    engine: str
    split_bytes: int
    aws_conn_id: str

    @classmethod
    def parse(cls, params: dict[str, Any]) -> FileImportParams:
        from atlas_migration.engines.file_import import MODES, PARSE_ERROR_POLICIES

        files = params.get("source_files") or []
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not all(isinstance(f, str) and f.strip() for f in files):
            raise ConfigurationError("source_files must be a list of paths, globs or s3:// prefixes")
        options = params.get("file_options") or {}
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ConfigurationError("file_options must be an object of file-name pattern -> options object")
        for pattern, values in options.items():
            unknown = sorted(set(values) - set(OVERRIDABLE))
            if unknown:
                raise ConfigurationError(f"file_options[{pattern!r}]: unknown option(s) {', '.join(unknown)} "
                                         f"(allowed: {', '.join(OVERRIDABLE)})")

        def choice(key: str, default: str, allowed: tuple[str, ...] | list[str]) -> str:
            value = params.get(key) or default
            if value not in allowed:
                raise ConfigurationError(f"parameter {key}={value!r} is not one of {', '.join(allowed)}")
            return value

        split = params.get("file_split_bytes", 64 << 20)
        if isinstance(split, bool) or not isinstance(split, int) or split < 4096:
            raise ConfigurationError(f"file_split_bytes must be an integer of at least 4096, got {split!r}")
        upsert_fields = list(params.get("upsert_fields") or ["_id"])
        return cls(
            source_files=[f.strip() for f in files], target_db=str(params.get("target_db") or "").strip(),
            file_options=options, file_format=choice("file_format", "auto", ["auto", "json", "json_array", "csv", "tsv"]),
            header_line=bool(params.get("header_line", True)), fields=list(params.get("fields") or []),
            columns_have_types=bool(params.get("columns_have_types", False)),
            ignore_blanks=bool(params.get("ignore_blanks", False)),
            parse_errors=choice("parse_errors", "stop", PARSE_ERROR_POLICIES), mode=choice("import_mode", "insert", MODES),
            upsert_fields=upsert_fields, engine=choice("import_engine", "auto", ENGINES),
            split_bytes=split, aws_conn_id=str(params.get("aws_conn_id") or ""))

    def overrides_for(self, location: str) -> dict[str, Any]:
        """Options of every ``file_options`` pattern matching the file's name (or full location), in order."""
        name = location.rsplit("/", 1)[-1]
        merged: dict[str, Any] = {}
        for pattern, values in self.file_options.items():
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(location, pattern):
                merged.update(values)
        return merged


def files_requested(params: dict[str, Any]) -> bool:
    """Whether the run names files (the router's test; no I/O)."""
    return bool(params.get("source_files"))


# ---------------------------------------------------------------- listing and opening files


@dataclass(frozen=True)
class SourceFile:
    location: str  # absolute local path or s3://bucket/key
    size: int


def _s3_hook(aws_conn_id: str):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id or "aws_default")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigurationError(f"{uri!r} is not an s3://bucket/prefix location")
    return bucket, key


def list_files(p: FileImportParams) -> list[SourceFile]:
    """Every file the params name, in a stable order; an entry that matches nothing is an error."""
    found: dict[str, SourceFile] = {}
    for entry in p.source_files:
        matched: list[SourceFile] = []
        if entry.startswith("s3://"):
            bucket, prefix = _split_s3(entry)
            hook = _s3_hook(p.aws_conn_id)
            for key in hook.list_keys(bucket_name=bucket, prefix=prefix) or []:
                if key.endswith("/"):
                    continue
                size = hook.get_key(key, bucket_name=bucket).content_length
                matched.append(SourceFile(f"s3://{bucket}/{key}", int(size)))
        else:
            path = os.path.expanduser(entry)
            paths = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
            for candidate in paths:
                if os.path.isdir(candidate):
                    paths += sorted(os.path.join(candidate, n) for n in os.listdir(candidate))
                    continue
                if os.path.isfile(candidate):
                    matched.append(SourceFile(os.path.abspath(candidate), os.path.getsize(candidate)))
        if not matched:
            raise ConfigurationError(f"source_files entry {entry!r} matches no file (on this worker, or in S3)")
        for f in matched:
            found.setdefault(f.location, f)
    return list(found.values())


def open_at(location: str, start: int, aws_conn_id: str) -> IO[bytes]:
    """A binary stream of the file from byte ``start`` (S3: a ranged GET, streamed)."""
    if location.startswith("s3://"):
        bucket, key = _split_s3(location)
        obj = _s3_hook(aws_conn_id).get_key(key, bucket_name=bucket)
        body = obj.get(Range=f"bytes={start}-")["Body"] if start else obj.get()["Body"]
        return _Body(body)
    handle = open(location, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    handle.seek(start)
    return handle


class _Body(io.RawIOBase):
    """A botocore StreamingBody as a raw stream (so it can be buffered and read by line)."""

    def __init__(self, body) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


# ---------------------------------------------------------------- inspection


def _options_for(p: FileImportParams, f: SourceFile, head: bytes) -> tuple[dict[str, Any], str]:
    from atlas_migration.engines.file_import import ImportOptions, detect_format, file_stem, format_from_name

    over = p.overrides_for(f.location)
    fmt = over.get("format") or p.file_format
    _, compressed = format_from_name(f.location)
    if fmt == "auto":
        fmt, compressed = detect_format(head, f.location)
    else:
        compressed = compressed or head.startswith(b"\x1f\x8b")
    fields = list(over.get("fields", p.fields))
    header_line = bool(over.get("header_line", p.header_line and not over.get("fields")))
    options = ImportOptions(format=fmt, gzip=compressed, header_line=header_line if fmt in ("csv", "tsv") else False,
                            fields=tuple(fields) if fmt in ("csv", "tsv") else (),
                            columns_have_types=bool(over.get("columns_have_types", p.columns_have_types)),
                            ignore_blanks=bool(over.get("ignore_blanks", p.ignore_blanks)),
                            parse_errors=over.get("parse_errors", p.parse_errors))
    namespace = over.get("namespace")
    if not namespace:
        if not p.target_db:
            raise ConfigurationError(f"no target namespace for {f.location}: set target_db (the collection is the "
                                     "file's stem) or file_options[<name>].namespace")
        namespace = f"{p.target_db}.{file_stem(f.location)}"
    _check_namespace(namespace, f.location)
    return options.to_dict(), namespace


def _check_namespace(namespace: str, location: str) -> None:
    db, _, coll = namespace.partition(".")
    if not db or not coll or any(c in db for c in '/\\. "$') or coll.startswith(("system.", "$")) or "$" in coll:
        raise ConfigurationError(f"target namespace {namespace!r} for {location} is not a valid db.collection")
    if db in ("admin", "local", "config"):
        raise ConfigurationError(f"target namespace {namespace!r} for {location}: Atlas does not take imports into {db}")


def _type_name(value: Any) -> str:
    import datetime as dt

    from bson import Decimal128, Int64, ObjectId
    from bson.binary import Binary

    for cls, name in ((bool, "bool"), (Int64, "long"), (int, "int"), (float, "double"), (str, "string"),
                      (dt.datetime, "date"), (ObjectId, "objectId"), (Decimal128, "decimal"), (Binary, "binData"),
                      (bytes, "binData"), (dict, "object"), (list, "array"), (type(None), "null")):
        if isinstance(value, cls):
            return name
    return type(value).__name__


def _field_types(document: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not key.startswith("$"):
            out.update(_field_types(value, f"{name}."))
        else:
            out[name] = _type_name(value)
    return out


def inspect_file(p: FileImportParams, f: SourceFile) -> dict[str, Any]:
    """Size, detected format, sample field names and types, estimated rows (from a sample's bytes per row)."""
    from atlas_migration.engines import file_import as engine

    with closing(open_at(f.location, 0, p.aws_conn_id)) as raw:
        buffered = io.BufferedReader(raw, 1 << 20)  # type: ignore[arg-type]
        head = buffered.peek(64 << 10)[: 64 << 10]
        options_dict, namespace = _options_for(p, f, head)
        options = engine.ImportOptions.from_dict(options_dict)
        stream = engine.open_range(buffered, engine.ByteRange(0, 0, -1, 1), options)
        counter = _Counting(stream)
        header: list[str] = []
        if options.format in ("csv", "tsv") and options.header_line:
            header, _, lines = engine.header_end(counter, options)
            rng = engine.ByteRange(0, counter.count, -1, lines + 1)
        else:
            rng = engine.ByteRange(0, 0, -1, 1)
        started = counter.count
        types: dict[str, set[str]] = {}
        rows = bad = 0
        for record in engine.records(counter, rng, options, header):
            rows += 1
            if record.document is None:
                bad += 1
            else:
                for name, kind in _field_types(record.document).items():
                    types.setdefault(name, set()).add(kind)
            if rows >= SAMPLE_ROWS:
                break
        sampled = max(counter.count - started, 1)
    # Bytes per row from the sample (the reader reads ahead, so this underestimates rows a little for tiny
    # samples); a compressed file's size is its compressed size, so its estimate is marked as such.
    estimate = None if not rows else round(rows * (f.size / sampled)) if rows >= SAMPLE_ROWS else rows
    return {"location": f.location, "size_bytes": f.size, "format": options.format, "gzip": options.gzip,
            "namespace": namespace, "options": options_dict, "header": header,
            "sample_fields": {k: "|".join(sorted(v)) for k, v in list(types.items())[:50]},
            "sample_rows": rows, "sample_rejected": bad, "estimated_rows": estimate,
            "estimate_basis": "compressed bytes" if options.gzip else "bytes"}


class _Counting(io.BufferedIOBase):
    """Counts bytes read through it (read, read1, readline): the inspection's bytes-per-row sample."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        data = self.inner.read(n)
        self.count += len(data)
        return data

    def read1(self, n: int = -1) -> bytes:
        data = self.inner.read1(n)  # type: ignore[attr-defined]
        self.count += len(data)
        return data

    def readline(self, limit: int | None = -1) -> bytes:
        data = self.inner.readline(limit)
        self.count += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def inspect_files(params: dict[str, Any]) -> dict[str, Any]:
    """The ``inspect_source`` result of a file run: a profile-shaped dict with ``source_kind=files``."""
    p = FileImportParams.parse(params)
    files = [inspect_file(p, f) for f in list_files(p)]
    lines = []
    for f in files:
        lines.append(f"{f['location']}: {f['size_bytes']:,} bytes, {f['format']}{' (gzip)' if f['gzip'] else ''} -> "
                     f"{f['namespace']}, ~{f['estimated_rows'] if f['estimated_rows'] is not None else '?'} rows "
                     f"(per {f['estimate_basis']})")
        lines.append("    fields: " + ", ".join(f"{k}: {v}" for k, v in f["sample_fields"].items()))
        if f["sample_rejected"]:
            lines.append(f"    {f['sample_rejected']} of the first {f['sample_rows']} rows cannot be parsed")
    log.info("Source files\n%s", "\n".join(f"    {line}" for line in lines))
    return {"conn_id": "source_files", "hosts": [], "source_kind": "files", "files": files,
            "topology": "files", "notes": [f"{len(files)} file(s), {sum(f['size_bytes'] for f in files):,} bytes"]}


# ---------------------------------------------------------------- plan and import


def _engine(p: FileImportParams) -> str:
    if p.engine == "mongoimport":
        if not shutil.which("mongoimport"):
            raise ConfigurationError("import_engine=mongoimport but mongoimport is not on PATH; install the MongoDB "
                                     "Database Tools or use import_engine=auto")
        return "mongoimport"
    # auto is the native engine: only it splits files, keys rows by file and line (retry-safe inserts) and
    # reports rejected rows by line; mongoimport is used when asked for.
    return "native"


def plan(params: dict[str, Any], profile: dict[str, Any]) -> list[dict[str, Any]]:
    """Refuse occupied targets (insert mode) before writing; cut each file into byte ranges (work items)."""
    from atlas_migration.engines import file_import as engine
    from atlas_migration.hooks.mongo import endpoint_from_connection
    from atlas_migration.params import MigrationParams

    mp = MigrationParams.parse(params)
    if mp.rehearsal:
        raise ConfigurationError("rehearsals of file imports are not built: the scratch prefix is not applied to "
                                 "file namespaces. Import into a scratch database with target_db instead.")
    p = FileImportParams.parse(params)
    files = profile["files"]
    kind = _engine(p)
    namespaces = sorted({f["namespace"] for f in files})
    target = endpoint_from_connection(mp.target_conn_id, "target")
    with closing(target.connect()) as client:
        occupied = [ns for ns in namespaces if client[ns.split(".", 1)[0]][ns.split(".", 1)[1]].find_one(
            {}, projection={"_id": 1}) is not None]
        if p.mode == "insert" and occupied:
            if not mp.drop_target:
                raise MigrationError(
                    f"insert mode into target namespace(s) that already hold data: {', '.join(occupied)}. Nothing was "
                    "written. Set drop_target=true to replace them, or use import_mode=upsert/merge to change them.")
            for ns in occupied:
                db, coll = ns.split(".", 1)
                client[db][coll].drop()
            log.warning("drop_target=true: dropped %s", ", ".join(occupied))
    items: list[dict[str, Any]] = []
    for f in files:
        options = engine.ImportOptions.from_dict(f["options"])
        tag = engine.file_tag(f["location"], f["size_bytes"])
        base = {"location": f["location"], "namespace": f["namespace"], "options": f["options"], "tag": tag,
                "engine": kind, "mode": p.mode, "upsert_fields": p.upsert_fields}
        if kind == "mongoimport":
            items.append({**base, "header": f["header"], "range": engine.ByteRange(0, 0, -1, 1).to_dict()})
            continue
        split = max(p.split_bytes, f["size_bytes"] // MAX_RANGES_PER_FILE + 1)
        with closing(open_at(f["location"], 0, p.aws_conn_id)) as raw:
            header, ranges = engine.plan_ranges(io.BufferedReader(raw, 1 << 20), f["size_bytes"], options, split)  # type: ignore[arg-type]
        items += [{**base, "header": header, "range": r.to_dict()} for r in ranges]
    log.info("file import: %d file(s) -> %d task(s) into %s; mode %s, engine %s", len(files), len(items),
             ", ".join(namespaces), p.mode, kind)
    return items


def import_range(params: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Import one byte range (native) or one file (mongoimport) into its namespace."""
    from atlas_migration.engines import file_import as engine
    from atlas_migration.hooks.mongo import endpoint_from_connection
    from atlas_migration.params import MigrationParams

    mp = MigrationParams.parse(params)
    p = FileImportParams.parse(params)
    target = endpoint_from_connection(mp.target_conn_id, "target")
    db, coll = item["namespace"].split(".", 1)
    rng = engine.ByteRange(**item["range"])
    options = engine.ImportOptions.from_dict(item["options"])
    label = item["location"]
    started = time.monotonic()
    if item["engine"] == "mongoimport":
        return _run_mongoimport(target, item, options)
    result = engine.RangeResult(file=label, namespace=item["namespace"], range_index=rng.index, mode=item["mode"])
    with closing(target.connect()) as client, closing(open_at(label, rng.start, p.aws_conn_id)) as raw:
        stream = engine.open_range(raw, rng, options)
        records = engine.records(stream, rng, options, item["header"])
        engine.import_records(client[db][coll], records, result=result, tag=item["tag"], policy=options.parse_errors,
                              upsert_fields=item["upsert_fields"], batch_size=mp.batch_size)
    seconds = time.monotonic() - started
    log.info("imported %s range %d into %s: %d rows, %d documents (%d inserted, %d already present from an earlier "
             "attempt, %d matched, %d upserted, %d deleted), %d rejected, %d field(s) skipped in %.1fs",
             label, rng.index, item["namespace"], result.rows, result.documents, result.inserted,
             result.already_present, result.matched, result.upserted, result.deleted, result.rejected,
             result.fields_skipped, seconds)
    for r in result.rejections[:20]:
        log.info("  rejected: %s line %d: %s (%s)", r["file"], r["line"], r["reason"], r["action"])
    return {**result.to_dict(), "seconds": round(seconds, 3)}


def mongoimport_argv(config: str, item: dict[str, Any], options) -> list[str]:
    """mongoimport's argv for one local, uncompressed file (connection string in the --config file)."""
    db, coll = item["namespace"].split(".", 1)
    fmt = "json" if options.format == "json_array" else options.format
    argv = ["mongoimport", f"--config={config}", f"--db={db}", f"--collection={coll}", f"--type={fmt}",
            f"--file={item['location']}", f"--mode={item['mode']}"]
    if options.format == "json_array":
        argv.append("--jsonArray")
    if options.format in ("csv", "tsv"):
        argv.append("--headerline" if options.header_line else f"--fields={','.join(options.fields)}")
        if options.columns_have_types:
            grace = {"stop": "stop", "skip_row": "skipRow", "skip_field": "skipField", "auto_cast": "autoCast"}
            argv += ["--columnsHaveTypes", f"--parseGrace={grace[options.parse_errors]}"]
        if options.ignore_blanks:
            argv.append("--ignoreBlanks")
    if item["mode"] != "insert":
        argv.append(f"--upsertFields={','.join(item['upsert_fields'])}")
    if options.parse_errors == "stop":
        argv.append("--stopOnError")
    return argv


def _run_mongoimport(target, item: dict[str, Any], options) -> dict[str, Any]:
    from atlas_migration.engines import mongotools

    if item["location"].startswith("s3://") or options.gzip:
        raise ConfigurationError(f"{item['location']}: mongoimport reads local, uncompressed files only; use "
                                 "import_engine=native")
    with mongotools.tool_config_file(target.tool_uri()) as config:
        result = mongotools.run_tool(mongoimport_argv(str(config), item, options), secrets=target.secrets, log=log)
    return {"file": item["location"], "namespace": item["namespace"], "range_index": 0, "mode": item["mode"],
            "engine": "mongoimport", "tool": result.to_dict()}


# ---------------------------------------------------------------- validation


@dataclass
class NamespaceCheck:
    namespace: str
    mode: str
    rows: int
    rejected: int
    documents: int
    target_documents: int | None
    expected_documents: int | None
    digest_expected: str | None = None
    digest_target: str | None = None
    problems: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_namespaces(results: list[dict[str, Any]], counts: dict[str, int], digests: dict[str, str]) -> list[NamespaceCheck]:
    """Per namespace (pure): insert mode needs target documents == rows parsed - rows rejected (and, when
    given, equal digests); upsert/merge need every document accounted for as matched or upserted."""
    from atlas_migration.engines.file_import import combine_digests

    by_ns: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_ns.setdefault(r["namespace"], []).append(r)
    checks = []
    for ns, parts in sorted(by_ns.items()):
        mode = parts[0]["mode"]
        rows = sum(r.get("rows", 0) for r in parts)
        rejected = sum(r.get("rejected", 0) for r in parts)
        documents = sum(r.get("documents", 0) for r in parts)
        problems = []
        check = NamespaceCheck(ns, mode, rows, rejected, documents, counts.get(ns), None)
        if documents != rows - rejected:
            problems.append(f"{documents} documents written from {rows} rows with {rejected} rejected")
        if mode == "insert":
            check.expected_documents = documents
            if counts.get(ns) != documents:
                problems.append(f"the target holds {counts.get(ns)} documents; the files gave {documents} "
                                f"(rows parsed {rows} - rejected {rejected})")
            if ns in digests:
                check.digest_expected = combine_digests([r.get("digest", "") for r in parts])
                check.digest_target = digests[ns]
                if documents and check.digest_expected != check.digest_target:
                    problems.append("the digest of the target's documents differs from the digest of the parsed "
                                    "documents")
        elif mode in ("upsert", "merge"):
            accounted = sum(r.get("matched", 0) + r.get("upserted", 0) + r.get("inserted", 0)
                            + r.get("already_present", 0) for r in parts)
            if accounted != documents:
                problems.append(f"{accounted} of {documents} documents were matched or upserted")
        check.problems = problems
        checks.append(check)
    return checks


def validate(params: dict[str, Any], results: list[dict[str, Any]], report_dir,
             publish: Callable[[dict[str, Any], str], None] | None = None) -> dict[str, Any]:
    """Check every imported namespace; write validation.json/.md under ``report_dir``; hand the report to
    ``publish`` (the task's XCom, for the report pages) before failing on any problem."""
    import json
    from pathlib import Path

    from atlas_migration.hooks.mongo import endpoint_from_connection
    from atlas_migration.params import MigrationParams

    mp = MigrationParams.parse(params)
    results = [r for r in results if r]
    if any(r.get("engine") == "mongoimport" for r in results):
        raise MigrationError("validation of mongoimport runs by rows and rejections is not built: mongoimport "
                             "does not report rejected rows by line. Use import_engine=native.")
    target = endpoint_from_connection(mp.target_conn_id, "target")
    counts: dict[str, int] = {}
    digests: dict[str, str] = {}
    with closing(target.connect()) as client:
        from atlas_migration.validation import _natural_documents, multiset_digest

        for ns in sorted({r["namespace"] for r in results}):
            db, coll = ns.split(".", 1)
            collection = client[db][coll]
            if mp.validation_mode == "full" and results[0]["mode"] == "insert":
                counts[ns], digests[ns] = multiset_digest(
                    d.raw for d in _natural_documents(collection, mp.batch_size))
            else:
                counts[ns] = collection.count_documents({})
    checks = check_namespaces(results, counts, digests)
    rejections = [r2 for r in results for r2 in r.get("rejections", [])]
    not_listed = sum(r.get("rejections_not_listed", 0) for r in results)
    failed = [c for c in checks if c.problems]
    report = {"verdict": "FAIL" if failed else "PASS", "strategy": "file_import", "mode": mp.validation_mode,
              "namespaces": [c.to_dict() for c in checks], "rejections": rejections,
              "rejections_not_listed": not_listed}
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(report, indent=2))
    lines = [f"# File import validation: {report['verdict']}", "",
             "| namespace | mode | rows | rejected | documents | target | check |", "|---|---|---:|---:|---:|---:|---|"]
    for c in checks:
        lines.append(f"| `{c.namespace}` | {c.mode} | {c.rows} | {c.rejected} | {c.documents} | "
                     f"{c.target_documents} | {'; '.join(c.problems or []) or 'ok'} |")
    if rejections:
        lines += ["", "## Rejected rows (file, line, reason; values are never shown)", ""]
        lines += [f"- {r['file']} line {r['line']}: {r['reason']} ({r['action']})" for r in rejections]
        if not_listed:
            lines.append(f"- ... and {not_listed} more not listed")
    (out / "validation.md").write_text("\n".join(lines) + "\n")
    log.info("File import validation (%s)\n%s", out / "validation.md", "\n".join(lines))
    if publish is not None:
        publish(report, str(out / "validation.json"))
    if failed:
        raise ValidationFailed("file import validation failed: " + "; ".join(
            f"{c.namespace}: {' / '.join(c.problems or [])}" for c in failed))
    return {"verdict": "PASS", "files": {"json": str(out / "validation.json"), "markdown": str(out / "validation.md")},
            "namespaces": len(checks)}


# ---------------------------------------------------------------- the task group


@task_group(group_id=GROUP_ID)
def file_import_group(profile) -> None:
    """plan (target checks, byte ranges) -> import_range (mapped)."""

    @task
    def plan_import(profile: dict, params=None) -> list[list[dict]]:
        from atlas_migration.mapping import batches_for_mapping, max_parallel_copies

        return batches_for_mapping(plan(params, profile), "byte ranges", max_parallel_copies(params))

    @task(retries=2)
    def import_file_range(items: list[dict], params=None) -> list[dict]:
        # Each range is idempotent (documents keyed to file and line), so a retry of the batch repeats none.
        return [import_range(params, item) for item in items]

    import_file_range.expand(items=plan_import(profile))
