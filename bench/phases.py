"""The benchmark's phases: each runs its work in child processes and turns the measurements into figures.

Phases run in ``PHASES`` order and may leave artefacts for later ones (the dump directory, the restored
database). A phase is a ``Phase(name, summary, run, needs)``; ``run(ctx)`` returns its figures. To add
one: write its child work in ``workers``, a ``run_...`` function
here that calls ``ctx.child``/``ctx.children`` and builds figures with ``figure_from``, append it to
``PHASES``, and, if the issue sets a goal for it, add a row to ``report.TARGETS``.

Every engine figure is compared with a ceiling measured in the same run: the dump with the source's raw
read, restores and copies with the target's raw bulk insert, full validation with the raw read, the live
sync's initial copy and catch-up with the raw bulk insert.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo

from bench import workers
from bench.datagen import SECONDARY_INDEX, SeededDataset
from bench.measure import BenchError, ChildOutcome, GroupOutcome, Section, run_children
from bench.report import INSERT_CEILING, READ_CEILING, Figure

# Figure groups in the order the table shows them.
GROUP_ORDER = ("ceiling", "dump", "restore", "copy", "tools", "file_import", "validation", "scaling", "live", "memory")
VALIDATION_MODES = ("counts", "full")
VALIDATION_SIZES = (1, 2, 4)  # multiples of the base (one-unit) collection size
MEMORY_SIZES = (1, 4)
CEILING_DB = "bench_ceiling"
LIVE_SYNC_ID = "bench-live"
LIVE_PREFIX = "live_"  # target database prefix of the live sync: live_<db>, apart from every other phase's
LIVE_COLLECTION = "live_writes"  # source collection the live phase's writers write to; dropped afterwards
LIVE_STREAMS = (2_000, 2_001)  # DocumentFactory streams of the steady-state and the backlog writers
LIVE_ROUND_SECONDS = 1.0
LIVE_SAMPLE_SECONDS = 0.5
LIVE_QUIET_SECONDS = 2.0
VERIFY_SETTLE_SECONDS = 30.0  # after the writer stops, how long rechecks may take to verify the last writes


# The file_import phase's generated files: format name -> file suffix, and how figures name them.
IMPORT_SUFFIXES = {"csv": "csv", "json": "jsonl"}
IMPORT_NAMES = {"csv": "CSV", "json": "JSON Lines"}
IMPORT_FORMATS = tuple(IMPORT_SUFFIXES)


@dataclass(frozen=True)
class BenchConfig:
    """What to generate and how to run the engine (defaults: the DAG's parameter defaults)."""

    docs: int = 1_000_000
    doc_bytes: int = 1_024
    collections: int = 10
    seed: int = 7
    batch_docs: int = 1_000  # the DAG's batch_size default: cursor and insert batch
    restore_workers: int = 4  # the DAG's restore_workers default: insert threads per collection
    worker_counts: tuple[int, ...] = (1, 2, 4)
    insert_batch_sizes: tuple[int, ...] = (250, 1_000, 4_000)
    insert_threads: tuple[int, ...] = (1, 2, 4)
    read_batch_sizes: tuple[int, ...] = (0, 1_000)  # 0: the server's default batching
    live_copy_order: str = "auto"  # LiveSync(copy_order): auto, id_range or natural
    live_write_rate: float = 200.0  # ops/s of the live phase's steady-state writer (inserts, updates, deletes)
    live_seconds: float | None = None  # steady-state duration; None: see live_duration
    live_backlog_ops: int | None = None  # ops written while catch-up is stopped; None: see live_backlog
    import_mb: float = 8.0  # size of each generated import file (one CSV, one JSON Lines)
    import_ranges: int = 4  # byte ranges (the DAG's mapped import tasks) each import file is cut into
    import_formats: tuple[str, ...] = IMPORT_FORMATS  # which generated files the file_import phase imports

    @property
    def live_duration(self) -> float:
        """Steady-state seconds: 60, or 20 up to 50,000 documents (--small), 10 below 10,000 (smoke test)."""
        if self.live_seconds is not None:
            return self.live_seconds
        return 10.0 if self.docs < 10_000 else 20.0 if self.docs <= 50_000 else 60.0

    @property
    def live_backlog(self) -> int:
        """Backlog for the catch-up rate: a tenth of the data, at least 2,000 and at most 20,000 ops."""
        if self.live_backlog_ops is not None:
            return self.live_backlog_ops
        return max(2_000, min(20_000, self.docs // 10))

    @property
    def ceiling_docs(self) -> int:
        """Documents per insert-ceiling trial: a fifth of the data, at least 2,000 and at most 50,000."""
        return min(self.docs, max(2_000, min(50_000, self.docs // 5)))


@dataclass
class BenchContext:
    """What phases share: configuration, dataset, servers, a scratch directory and earlier artefacts."""

    config: BenchConfig
    dataset: SeededDataset
    source_uri: str
    target_uri: str
    server_pids: dict[str, int]
    workdir: Path
    say: Callable[[str], None] = print
    profile_phase: str | None = None
    profile_dir: Path | None = None
    artefacts: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> str:
        return self.dataset.spec.db

    def children(self, phase: str, func: Callable[..., Any], kwargs_list: list[dict[str, Any]], *,
                 name: str) -> GroupOutcome:
        profile_dir = self.profile_dir if self.profile_phase == phase else None
        return run_children(func, kwargs_list, server_pids=self.server_pids, profile_dir=profile_dir, name=name)

    def child(self, phase: str, func: Callable[..., Any], *, name: str, **kwargs: Any) -> ChildOutcome:
        return self.children(phase, func, [kwargs], name=name).children[0]

    def drop_target_databases(self, names: Sequence[str]) -> None:
        # Later phases should meet a target holding only what they need, as the ceiling did.
        with pymongo.MongoClient(self.target_uri) as client:
            for name in names:
                client.drop_database(name)

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        return path


# ----------------------------------------------------------------------------------------------- helpers
def cpu_percent(client_cpu: float, server_cpu: dict[str, float], seconds: float) -> dict[str, float]:
    """CPU seconds over wall seconds, in percent of one core, for the client and each server."""
    if seconds <= 0:
        return {}
    return {"client": 100 * client_cpu / seconds, **{k: 100 * v / seconds for k, v in server_cpu.items()}}


def figure_from(key: str, group: str, label: str, sections: Sequence[Section], outcomes: Sequence[ChildOutcome],
                **extra: Any) -> Figure:
    """A figure summing ``sections`` (time, documents, bytes, CPU); memory is the largest of ``outcomes``."""
    seconds = sum(s.seconds for s in sections)
    servers: dict[str, float] = {}
    for section in sections:
        for name, value in section.cpu_servers.items():
            servers[name] = servers.get(name, 0.0) + value
    return Figure(
        key=key, group=group, label=label,
        documents=sum(s.documents for s in sections), bytes=sum(s.bytes for s in sections), seconds=seconds,
        peak_rss_mb=max(o.peak_rss_mb for o in outcomes), baseline_rss_mb=max(o.baseline_rss_mb for o in outcomes),
        cpu_percent=cpu_percent(sum(s.cpu_self for s in sections), servers, seconds), **extra,
    )


def _check_documents(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise BenchError(f"{what} handled {got:,} documents where the dataset has {expected:,}")


def _memory_figure(kind: str, units: int, coll: str, outcome: ChildOutcome) -> Figure:
    section = outcome.sections[0]
    return figure_from(
        f"memory.{kind}.{units}x", "memory", f"peak RSS: {kind} of a {units}x collection ({coll})", [section],
        [outcome], note=f"baseline {outcome.baseline_rss_mb:.0f} MB, +{outcome.peak_rss_mb - outcome.baseline_rss_mb:.0f}"
                        " MB during the task",
    )


def _speed(section: Section) -> float:
    return section.documents / section.seconds if section.seconds > 0 else 0.0


def _same_shape(ctx: BenchContext, figure: Figure, threads: int) -> Figure:
    """Add to the note the ratio to the ceiling trial with the engine's own batch size and thread count.

    The ceiling is the best of several trials, which noise on a shared machine inflates; the same-shape
    trial separates "the engine's insert shape is slower" from "the engine does more than insert".
    """
    trials: dict[tuple[int, int], float] = ctx.artefacts.get("insert_trials", {})
    trial = trials.get((ctx.config.batch_docs, threads))
    if trial:
        ratio = figure.docs_per_s / trial
        figure.details["same_shape_trial"] = {"batch_docs": ctx.config.batch_docs, "threads": threads,
                                              "docs_per_s": round(trial), "ratio": round(ratio, 3)}
        shape = f"{ratio:.2f} of the batch-{ctx.config.batch_docs} x {threads}-thread trial"
        figure.note = f"{figure.note}; {shape}" if figure.note else shape
    return figure


# ------------------------------------------------------------------------------------------------ phases
def run_ceilings(ctx: BenchContext) -> list[Figure]:
    """The target's raw insert ceiling (grid of batch sizes x threads) and the source's raw read ceiling."""
    cfg, spec = ctx.config, ctx.dataset.spec
    inserted = ctx.child(
        "ceiling", workers.insert_ceiling, name="insert-ceiling", target_uri=ctx.target_uri, db=CEILING_DB,
        doc_bytes=spec.doc_bytes, seed=spec.seed, documents=cfg.ceiling_docs, batch_sizes=cfg.insert_batch_sizes,
        thread_counts=cfg.insert_threads,
    )
    ctx.drop_target_databases([CEILING_DB])
    best = max(inserted.sections, key=_speed)
    ctx.artefacts["insert_trials"] = {
        (s.extra["batch_docs"], s.extra["threads"]): _speed(s) for s in inserted.sections
    }
    insert = figure_from(
        INSERT_CEILING, "ceiling", "ceiling: target raw insert_many (best trial)", [best], [inserted],
        note=f"batch {best.extra['batch_docs']}, {best.extra['threads']} thread(s); best of "
             f"{len(inserted.sections)} trials of {cfg.ceiling_docs:,} docs",
        details={"trials": [{**s.extra, "docs_per_s": round(_speed(s)), "seconds": round(s.seconds, 3)}
                            for s in inserted.sections]},
    )
    sorted_coll = spec.by_units(max(VALIDATION_SIZES)).name
    read = ctx.child(
        "ceiling", workers.read_ceiling, name="read-ceiling", source_uri=ctx.source_uri, db=ctx.db,
        collections=spec.names, batch_sizes=cfg.read_batch_sizes, sorted_collection=sorted_coll,
    )
    trials, sorted_read = read.sections[:-1], read.sections[-1]
    for section in trials:
        _check_documents("the read ceiling", section.documents, spec.documents)
    best_read = max(trials, key=_speed)
    batch = best_read.extra["batch_size"] or "server default"
    return [
        insert,
        figure_from(
            READ_CEILING, "ceiling", "ceiling: source raw find, whole collections", [best_read], [read],
            note=f"cursor batch {batch}; best of {len(trials)}",
            details={"trials": [{**s.extra, "docs_per_s": round(_speed(s)), "seconds": round(s.seconds, 3)}
                                for s in trials]},
        ),
        figure_from(
            "ceiling.read_sorted", "ceiling", f"ceiling: source raw find sorted by _id ({sorted_coll})",
            [sorted_read], [read], ratio_to=READ_CEILING, note="diagnostic: the read of the _id merge, when full validation's digests differ",
        ),
    ]


def run_dump(ctx: BenchContext) -> list[Figure]:
    """The native dump, one process per collection as the DAG's tasks; then once more without gzip."""
    cfg, spec = ctx.config, ctx.dataset.spec
    root = ctx.scratch("dump")
    outcomes: dict[str, ChildOutcome] = {}
    for coll in spec.collections:
        outcomes[coll.name] = ctx.child(
            "dump", workers.dump, name=f"dump-{coll.name}", source_uri=ctx.source_uri, db=ctx.db,
            collections=[coll.name], out_root=str(root), gzip=True, batch_size=cfg.batch_docs,
            average_document_bytes=spec.doc_bytes,
        )
        _check_documents(f"the dump of {coll.name}", outcomes[coll.name].sections[0].documents, coll.documents)
    ctx.artefacts["dump_root"] = root
    sections = [o.sections[0] for o in outcomes.values()]
    file_bytes = sum(s.extra["file_bytes"] for s in sections)
    figures = [figure_from(
        "dump.native", "dump", "dump: native engine, gzip (1 task per collection)", sections,
        list(outcomes.values()), ratio_to=READ_CEILING,
        note=f"gzip {sum(s.bytes for s in sections) / max(1, file_bytes):.2f}x; batch {cfg.batch_docs}",
    )]
    plain_root = ctx.scratch("dump-plain")
    plain = ctx.child(
        "dump", workers.dump, name="dump-plain", source_uri=ctx.source_uri, db=ctx.db, collections=spec.names,
        out_root=str(plain_root), gzip=False, batch_size=cfg.batch_docs, average_document_bytes=spec.doc_bytes,
    )
    shutil.rmtree(plain_root, ignore_errors=True)
    figures.append(figure_from(
        "dump.native_plain", "dump", "dump: native engine, gzip off (diagnostic)", plain.sections, [plain],
        ratio_to=READ_CEILING, note="isolates the cost of gzip",
    ))
    for units in MEMORY_SIZES:
        coll = spec.by_units(units).name
        figures.append(_memory_figure("dump", units, coll, outcomes[coll]))
    return figures


def _index_share(sections) -> str:
    """The share of restore time spent building secondary indexes, e.g. ``"48%"``."""
    total = sum(s.seconds for s in sections)
    indexes = sum(float((s.extra or {}).get("index_seconds") or 0) for s in sections)
    return f"{indexes / total:.0%}" if total else "?"


def run_restore(ctx: BenchContext) -> list[Figure]:
    """The native restore of the dump, one process per collection; then with one insert thread."""
    cfg, spec = ctx.config, ctx.dataset.spec
    dump_root = str(ctx.artefacts["dump_root"])
    outcomes: dict[str, ChildOutcome] = {}
    for coll in spec.collections:
        outcomes[coll.name] = ctx.child(
            "restore", workers.restore, name=f"restore-{coll.name}", target_uri=ctx.target_uri,
            dump_root=dump_root, db=ctx.db, collections=[coll.name], target_db=ctx.db,
            workers=cfg.restore_workers, batch_docs=cfg.batch_docs,
        )
        _check_documents(f"the restore of {coll.name}", outcomes[coll.name].sections[0].documents, coll.documents)
    ctx.artefacts["restored_db"] = ctx.db
    index_note = f"incl. the {'/'.join(k for k, _ in SECONDARY_INDEX)} index builds"
    sections = [o.sections[0] for o in outcomes.values()]
    figures = [_same_shape(ctx, figure_from(
        "restore.native", "restore", f"restore: native, {cfg.restore_workers} insert threads (1 task/coll)",
        sections, list(outcomes.values()), ratio_to=INSERT_CEILING,
        note=f"{index_note} ({_index_share(sections)} of the time)",
    ), cfg.restore_workers)]
    if cfg.restore_workers != 1:
        single_db = f"{ctx.db}_1thread"
        single = ctx.child(
            "restore", workers.restore, name="restore-1thread", target_uri=ctx.target_uri, dump_root=dump_root,
            db=ctx.db, collections=spec.names, target_db=single_db, workers=1, batch_docs=cfg.batch_docs,
        )
        ctx.drop_target_databases([single_db])
        figures.append(_same_shape(ctx, figure_from(
            "restore.native_1thread", "restore", "restore: native, 1 insert thread (diagnostic)", single.sections,
            [single], ratio_to=INSERT_CEILING, note=index_note,
        ), 1))
    for units in MEMORY_SIZES:
        coll = spec.by_units(units).name
        figures.append(_memory_figure("restore", units, coll, outcomes[coll]))
    return figures


def run_copy(ctx: BenchContext) -> list[Figure]:
    """End to end in one process, dump and restore pipelined per collection as the DAG does (wall time)."""
    cfg, spec = ctx.config, ctx.dataset.spec
    root, target_db = ctx.scratch("copy"), f"{ctx.db}_copy"
    outcome = ctx.child(
        "copy", workers.copy, name="copy", source_uri=ctx.source_uri, target_uri=ctx.target_uri, db=ctx.db,
        collections=spec.names, dump_root=str(root), target_db=target_db, workers=cfg.restore_workers,
        batch_docs=cfg.batch_docs, average_document_bytes=spec.doc_bytes,
    )
    ctx.drop_target_databases([target_db])
    shutil.rmtree(root, ignore_errors=True)
    section = outcome.sections[0]
    _check_documents("the end-to-end copy", section.documents, spec.documents)
    return [figure_from(
        "copy.native", "copy", "end-to-end copy: dump -> restore pipelined per collection", [section], [outcome],
        ratio_to=INSERT_CEILING,
        note=(f"dump {section.extra['dump_seconds']:.1f}s, restore {section.extra['restore_seconds']:.1f}s "
              f"(index builds {section.extra['index_seconds']:.1f}s), overlapped"),
    )]


def run_tools(ctx: BenchContext) -> list[Figure]:
    """The same copy through mongodump/mongorestore, when both are on PATH."""
    from atlas_migration.engines import mongotools

    if not mongotools.tools_available():
        return [Figure("tools", "tools", "mongodump + mongorestore", status="skipped",
                       note="skipped: tools not on PATH")]
    cfg, spec = ctx.config, ctx.dataset.spec
    root, target_db = ctx.scratch("tools"), f"{ctx.db}_tools"
    outcome = ctx.child(
        "tools", workers.tools_copy, name="tools", source_uri=ctx.source_uri, target_uri=ctx.target_uri,
        db=ctx.db, collections=spec.names, out_dir=str(root), target_db=target_db, workers=cfg.restore_workers,
    )
    ctx.drop_target_databases([target_db])
    shutil.rmtree(root, ignore_errors=True)
    dumped, restored = outcome.sections
    _check_documents("mongorestore", restored.documents, spec.documents)
    dumped.documents, dumped.bytes, restored.bytes = spec.documents, ctx.dataset.bytes, ctx.dataset.bytes
    figures = [
        figure_from("tools.mongodump", "tools", "mongodump (gzip)", [dumped], [outcome], ratio_to=READ_CEILING),
        figure_from("tools.mongorestore", "tools", f"mongorestore ({cfg.restore_workers} insertion workers)",
                    [restored], [outcome], ratio_to=INSERT_CEILING),
    ]
    copied = figure_from("tools.copy", "tools", "end-to-end copy: mongodump, then mongorestore", [dumped, restored],
                         [outcome], ratio_to=INSERT_CEILING)
    copied.documents, copied.bytes = spec.documents, ctx.dataset.bytes  # counted once, not once per tool
    for figure in [*figures, copied]:
        # The tools are child processes of the measuring child: their own high-water mark is what counts.
        figure.peak_rss_mb = outcome.tool_peak_rss_mb
    return [*figures, copied]


IMPORT_DB = "bench_import"


def run_file_import(ctx: BenchContext) -> list[Figure]:
    """The native file import of a generated CSV and JSON Lines file, each cut into ``import_ranges`` ranges;
    then mongoimport of the same files when it is on PATH."""
    from bench.datagen import write_import_file

    cfg = ctx.config
    root = ctx.scratch("import")
    root.mkdir(parents=True)
    target_bytes = max(4096, int(cfg.import_mb * 1_000_000))
    files: list[tuple[str, str, str, int, int]] = []  # path, format, collection, records, bytes
    for fmt, suffix in ((f, IMPORT_SUFFIXES[f]) for f in cfg.import_formats):
        path = root / f"people.{suffix}"
        rows, size = write_import_file(path, fmt, target_bytes, cfg.seed)
        files.append((str(path), fmt, f"people_{fmt}", rows, size))
    figures: list[Figure] = []
    outcomes: list[ChildOutcome] = []
    for path, fmt, coll, rows, size in files:
        split = max(4096, size // cfg.import_ranges + 1)
        outcome = ctx.child(
            "file_import", workers.file_import, name=f"import-{fmt}", target_uri=ctx.target_uri, path=path,
            fmt=fmt, db=IMPORT_DB, coll=coll, batch_docs=cfg.batch_docs, split_bytes=split, expected_rows=rows,
        )
        outcomes.append(outcome)
        sections = outcome.sections
        figures.append(figure_from(
            f"file_import.{fmt}", "file_import",
            f"file import: native, {IMPORT_NAMES[fmt]} in {len(sections)} ranges",
            sections, [outcome], ratio_to=INSERT_CEILING,
            note=(f"{size / 1e6:.1f} MB file, {rows:,} records; plan (range scan) "
                  f"{sections[0].extra['plan_seconds']:.2f}s not counted; RSS: ranges one after another in one "
                  "process (as many tasks)"),
        ))
        ctx.drop_target_databases([IMPORT_DB])
    total = figure_from("file_import.native", "file_import",
                        f"file import: native, {' and '.join(IMPORT_NAMES[f] for f in cfg.import_formats)}",
                        [s for o in outcomes for s in o.sections], outcomes, ratio_to=INSERT_CEILING,
                        note="the file-import throughput row")
    figures.insert(0, total)
    if shutil.which("mongoimport") is None:
        figures.append(Figure("file_import.mongoimport", "file_import", "file import: mongoimport", status="skipped",
                              note="skipped: mongoimport not on PATH"))
    else:
        outcome = ctx.child(
            "file_import", workers.mongoimport_files, name="mongoimport", target_uri=ctx.target_uri,
            files=[(path, fmt, coll) for path, fmt, coll, _, _ in files], db=IMPORT_DB,
        )
        ctx.drop_target_databases([IMPORT_DB])
        for section, (_, fmt, _, rows, _) in zip(outcome.sections, files, strict=True):
            _check_documents(f"mongoimport of the {fmt} file", section.documents, rows)
        figure = figure_from("file_import.mongoimport", "file_import",
                             f"file import: mongoimport, {' and '.join(IMPORT_NAMES[f] for f in cfg.import_formats)}",
                             outcome.sections, [outcome], ratio_to=INSERT_CEILING)
        figure.peak_rss_mb = outcome.tool_peak_rss_mb  # the tool's own high-water mark, as for mongorestore
        figures.append(figure)
    shutil.rmtree(root, ignore_errors=True)
    return figures


def run_validation(ctx: BenchContext) -> list[Figure]:
    """Counts and full validation of single collections at 1x, 2x and 4x the base size."""
    spec = ctx.dataset.spec
    figures: list[Figure] = []
    for mode in VALIDATION_MODES:
        base_seconds = 0.0
        for units in VALIDATION_SIZES:
            coll = spec.by_units(units)
            outcome = ctx.child(
                "validation", workers.validate, name=f"validate-{mode}-{units}x", source_uri=ctx.source_uri,
                target_uri=ctx.target_uri, db=ctx.db, collections=[coll.name], target_db=ctx.artefacts["restored_db"],
                mode=mode,
            )
            section = outcome.sections[0]
            _check_documents(f"{mode} validation of {coll.name}", section.documents, coll.documents)
            section.bytes = ctx.dataset.bytes_by_collection[coll.name]
            base_seconds = base_seconds or section.seconds
            growth = f"{section.seconds / base_seconds:.1f}x the 1x time" if units > 1 and base_seconds else ""
            figures.append(figure_from(
                f"validation.{mode}.{units}x", "validation", f"validation {mode}: {units}x ({coll.name})", [section],
                [outcome], ratio_to=READ_CEILING if mode == "full" else None,
                note="; ".join(x for x in (growth, "source and target read in parallel" if mode == "full" else "") if x),
            ))
    return figures


def run_scaling(ctx: BenchContext) -> list[Figure]:
    """N one-unit collections copied by N worker processes at once (N = 1, 2, 4): where the servers saturate."""
    cfg, spec = ctx.config, ctx.dataset.spec
    units = spec.unit_collections
    figures: list[Figure] = []
    single = 0.0
    for n in cfg.worker_counts:
        # With fewer one-unit collections than workers, workers share a source collection; each still
        # writes to its own target database, so the work per worker is the same.
        plan = [(units[i % len(units)].name, f"{ctx.db}_scale{n}_{i}", ctx.scratch(f"scale{n}-{i}")) for i in range(n)]
        group = ctx.children("scaling", workers.copy, [
            dict(source_uri=ctx.source_uri, target_uri=ctx.target_uri, db=ctx.db, collections=[coll],
                 dump_root=str(root), target_db=target_db, workers=cfg.restore_workers, batch_docs=cfg.batch_docs,
                 average_document_bytes=spec.doc_bytes)
            for coll, target_db, root in plan
        ], name=f"scale{n}")
        ctx.drop_target_databases([target_db for _, target_db, _ in plan])
        for _, _, root in plan:
            shutil.rmtree(root, ignore_errors=True)
        sections = [child.sections[0] for child in group.children]
        _check_documents(f"the {n}-worker copy", sum(s.documents for s in sections), n * spec.unit_documents)
        figure = Figure(
            key=f"scaling.{n}", group="scaling", label=f"scaling: {n} worker process(es), 1 collection each",
            documents=sum(s.documents for s in sections), bytes=sum(s.bytes for s in sections),
            seconds=group.wall_seconds, peak_rss_mb=max(c.peak_rss_mb for c in group.children),
            baseline_rss_mb=max(c.baseline_rss_mb for c in group.children),
            cpu_percent=cpu_percent(sum(s.cpu_self for s in sections), group.cpu_servers, group.wall_seconds),
            ratio_to=INSERT_CEILING,
        )
        single = single or figure.docs_per_s
        figure.note = f"{figure.docs_per_s / single:.2f}x the 1-worker throughput" if single else ""
        figures.append(figure)
    return figures


def run_live(ctx: BenchContext) -> list[Figure]:
    """The live-sync engine: initial copy, steady-state lag under a fixed write rate, catch-up rate, cutover.

    Everything goes to ``live_<db>`` on the target; writers write to a separate source collection
    (``live_writes``, part of the sync), so the dataset the other phases read is never changed. The target
    database, the engine's state database and the writers' collection are dropped afterwards.
    """
    cfg, spec = ctx.config, ctx.dataset.spec
    # Several partitions: the largest (4x) collection in four, the 2x one in two, one-unit ones whole.
    partition_docs = max(1, math.ceil(spec.by_units(4).documents / 4))
    common = dict(source_uri=ctx.source_uri, target_uri=ctx.target_uri, db=ctx.db, sync_id=LIVE_SYNC_ID,
                  target_db_prefix=LIVE_PREFIX, batch_docs=cfg.batch_docs, partition_docs=partition_docs)
    writer = dict(source_uri=ctx.source_uri, db=ctx.db, collection=LIVE_COLLECTION, doc_bytes=spec.doc_bytes,
                  seed=spec.seed)
    with pymongo.MongoClient(ctx.source_uri) as client:
        client[ctx.db].drop_collection(LIVE_COLLECTION)
        client[ctx.db].create_collection(LIVE_COLLECTION)  # before start(): planned with the rest, empty
    try:
        return _live_figures(ctx, common, writer, partition_docs)
    finally:
        ctx.drop_target_databases([f"{LIVE_PREFIX}{ctx.db}", workers.LIVE_STATE_DB])
        with pymongo.MongoClient(ctx.source_uri) as client:
            client[ctx.db].drop_collection(LIVE_COLLECTION)


def _share(part: float | None, whole: float | None) -> str:
    """``part`` as a percentage of ``whole`` ("?" when either is unknown)."""
    return f"{100 * part / whole:.0f}%" if part is not None and whole else "?"


def _live_figures(ctx: BenchContext, common: dict[str, Any], writer: dict[str, Any],
                  partition_docs: int) -> list[Figure]:
    cfg, spec = ctx.config, ctx.dataset.spec
    copied = ctx.child("live", workers.live_initial_copy, name="live-copy", **common,
                       copy_order=cfg.live_copy_order)
    section = copied.sections[0]
    _check_documents("the live initial copy", section.documents, spec.documents)
    partitions, natural = section.extra["partitions"], section.extra.get("natural_partitions", 0)
    reads = (f"{natural} collection(s) read once in natural order, the rest by _id range"
             if natural else "_id-range reads (a collection scan each on SecantusDB)")
    figures = [figure_from(
        "live.initial_copy", "live", "live: initial copy (start..finish_initial_copy)", [section], [copied],
        ratio_to=INSERT_CEILING,
        note=f"{partitions} partitions of <= {partition_docs:,} docs, 1 process; incl. index builds "
             f"({_share(section.extra.get('index_seconds'), section.seconds)} of the time, collections in "
             f"parallel); copy_order={cfg.live_copy_order}: {reads}",
        details={"partitions": partitions, "partition_docs": partition_docs, "natural_partitions": natural,
                 "copy_order": cfg.live_copy_order,
                 "index_seconds": section.extra.get("index_seconds")},
    )]

    # The verifier's generation 0: every partition of the copy compared (nothing writing).
    compared = ctx.child("live", workers.live_verify_compare, name="live-verify-compare", **common)
    verify = compared.sections[0]
    _check_documents("the verifier's compare", verify.documents, spec.documents)
    figures.append(figure_from(
        "live.verify_compare", "live", "live: verifier compare of every partition", [verify], [compared],
        ratio_to=READ_CEILING,
        note=f"{verify.extra['partitions']} partitions; source pass (docs + target $in) beside target pass "
             f"(_ids + source $in); <= {verify.extra['max_documents_held']} docs held; each partition read sorted "
             "by _id (a collection scan and a sort each on SecantusDB)",
        details=verify.extra,
    ))

    # Steady state: a writer at a fixed rate, catch-up in short rounds and the verifier's rechecks, together.
    seconds, rate = cfg.live_duration, cfg.live_write_rate
    verify_common = {k: v for k, v in common.items() if k != "partition_docs"}
    group = ctx.children("live", workers.live_role, [
        dict(role="writer", **writer, stream=LIVE_STREAMS[0], ops=max(1, round(rate * seconds)), rate=rate),
        dict(role="steady", **common, seconds=seconds, round_seconds=LIVE_ROUND_SECONDS,
             sample_seconds=LIVE_SAMPLE_SECONDS, drain_quiet_seconds=LIVE_QUIET_SECONDS),
        dict(role="verify", **verify_common, seconds=seconds, round_seconds=LIVE_ROUND_SECONDS,
             settle_seconds=VERIFY_SETTLE_SECONDS),
    ], name="live-steady")
    wrote, followed, verifying = group.children
    written, steady = wrote.sections[0], followed.sections[0]
    applied_total = steady.documents + steady.extra["events_after_section"]
    if applied_total != written.documents:
        raise BenchError(f"live steady state: {applied_total:,} events applied where {written.documents:,} "
                         "operations were written")
    lag = steady.extra
    # Bytes: the documents the applied events carried (inserted, or looked up after an update), pro rata.
    steady.bytes = round(written.bytes * steady.documents / max(1, written.documents))
    figures.append(figure_from(
        "live.steady", "live", f"live: steady state, writer at {rate:g} ops/s ({seconds:g}s)", [steady], [followed],
        note=f"lag median {lag['lag_median_s']:.1f}s, p95 {lag['lag_p95_s']:.1f}s ({lag['lag_samples']} samples, "
             f"1 s resolution); writer {written.documents / written.seconds:.0f} ops/s achieved; "
             f"{lag['events_after_section']:,} events left when it stopped, applied in {lag['drain_seconds']:.0f}s",
        details={key: lag[key] for key in ("lag_median_s", "lag_p95_s", "lag_max_s", "lag_samples", "rounds",
                                           "lag_samples_saved", "lag_samples_catch_up", "lag_after_drain",
                                           "events_after_section", "drain_seconds")}
        | {"writer_ops": written.documents, "writer_ops_per_s": round(written.documents / written.seconds, 1),
           "writer_peak_rss_mb": round(wrote.peak_rss_mb, 1),
           "writer_mix": {kind: written.extra.get(kind, 0) for kind in ("inserts", "updates", "deletes")}},
    ))

    rechecked = verifying.sections[0]
    vx = rechecked.extra
    kept_up = vx["unverified_at_end"] == 0 and vx["pending_end"] == 0
    figures.append(figure_from(
        "live.verify_recheck", "live", f"live: verifier rechecks, writer at {rate:g} ops/s", [rechecked], [verifying],
        note=f"event -> verified equal: median {vx['lag_median_s']:.1f}s, p95 {vx['lag_p95_s']:.1f}s (cluster times: "
             f"1 s resolution); pending max {vx['pending_max']}, at end {vx['pending_end']}; "
             + ("kept up with the writer" if kept_up else f"DID NOT keep up: {vx['unverified_at_end']} unverified"),
        details=vx,
    ))
    if vx["open_mismatches_end"]:
        raise BenchError(f"verifier rechecks: {vx['open_mismatches_end']} mismatch(es) open after the writer stopped")

    # Catch-up rate: a backlog written while nothing follows the stream, then catch_up until drained.
    backlog = ctx.child("live", workers.live_writer, name="live-backlog-writer", **writer, stream=LIVE_STREAMS[1],
                        ops=cfg.live_backlog, rate=None)
    written = backlog.sections[0]
    caught = ctx.child("live", workers.live_backlog_catch_up, name="live-catch-up", **common,
                       expected_events=written.documents)
    drained = caught.sections[0]
    drained.bytes = written.bytes

    # Cutover with writes stopped; the target must then hold exactly the source's documents.
    cut = ctx.child("live", workers.live_cutover, name="live-cutover", **common, quiet_seconds=LIVE_QUIET_SECONDS)
    counts: dict[str, tuple[int, int]] = cut.value["counts"]
    wrong = {name: pair for name, pair in counts.items() if pair[0] != pair[1]}
    if wrong or not counts:
        raise BenchError("live cutover: target document counts differ from the source's: "
                         + ", ".join(f"{name} source {s:,} target {t:,}" for name, (s, t) in sorted(wrong.items())))
    total = sum(s for s, _ in counts.values())
    cut_section = cut.sections[0]
    figures.append(figure_from(
        "live.catch_up", "live", f"live: catch-up of a {written.documents:,}-op backlog", [drained], [caught],
        ratio_to=INSERT_CEILING,
        note=f"backlog written at {written.documents / written.seconds:.0f} ops/s; cutover {cut_section.seconds:.1f}s "
             f"(quiet {LIVE_QUIET_SECONDS:g}s), then target = source: {total:,} docs in {len(counts)} collections",
        details={"backlog_ops": written.documents, "backlog_write_seconds": round(written.seconds, 3),
                 **drained.extra, "cutover_seconds": round(cut_section.seconds, 3),
                 "cutover_events": cut.value["events_applied"], "cutover_peak_rss_mb": round(cut.peak_rss_mb, 1),
                 "counts": {name: list(pair) for name, pair in counts.items()}},
    ))
    return figures


@dataclass(frozen=True)
class Phase:
    """A named step of the benchmark; ``needs`` are phases whose artefacts it uses."""

    name: str
    summary: str
    run: Callable[[BenchContext], list[Figure]]
    needs: tuple[str, ...] = ()


PHASES: tuple[Phase, ...] = (
    Phase("ceiling", "raw insert and read ceilings", run_ceilings),
    Phase("dump", "native dump per collection", run_dump),
    Phase("restore", "native restore per collection", run_restore, needs=("dump",)),
    Phase("copy", "end-to-end copy", run_copy),
    Phase("tools", "mongodump/mongorestore", run_tools),
    Phase("file_import", "CSV and JSON Lines import (native; mongoimport when on PATH)", run_file_import),
    Phase("validation", "counts and full validation at 1x/2x/4x", run_validation, needs=("restore",)),
    Phase("scaling", "copy over 1/2/4 worker processes", run_scaling),
    Phase("live", "live sync: initial copy, steady-state lag, catch-up, cutover", run_live),
)


def select_phases(names: Sequence[str] | None) -> list[Phase]:
    """The phases to run, in ``PHASES`` order, with the phases they need added."""
    by_name = {phase.name: phase for phase in PHASES}
    if not names:
        return list(PHASES)
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    wanted: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].needs)
    return [phase for phase in PHASES if phase.name in wanted]


def run_phases(ctx: BenchContext, phases: Sequence[Phase]) -> list[Figure]:
    figures: list[Figure] = []
    started = time.perf_counter()
    for phase in phases:
        ctx.say(f"[{time.perf_counter() - started:7.1f}s] {phase.name}: {phase.summary}")
        figures.extend(phase.run(ctx))
    ctx.say(f"[{time.perf_counter() - started:7.1f}s] done")
    return sorted(figures, key=lambda f: GROUP_ORDER.index(f.group) if f.group in GROUP_ORDER else len(GROUP_ORDER))


__all__ = ["PHASES", "BenchConfig", "BenchContext", "Phase", "figure_from", "run_phases", "select_phases"]
