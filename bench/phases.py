"""The benchmark's phases: each runs its work in child processes and turns the measurements into figures.

Phases run in ``PHASES`` order and may leave artefacts for later ones (the dump directory, the restored
database). A phase is a ``Phase(name, summary, run, needs)``; ``run(ctx)`` returns its figures. To add
one (the live-pull engine, once it exists): write its child work in ``workers``, a ``run_...`` function
here that calls ``ctx.child``/``ctx.children`` and builds figures with ``figure_from``, append it to
``PHASES``, and, if the issue sets a goal for it, add a row to ``report.TARGETS``.

Every engine figure is compared with a ceiling measured in the same run: the dump with the source's raw
read, restores and copies with the target's raw bulk insert, full validation with the raw read.
"""

from __future__ import annotations

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
GROUP_ORDER = ("ceiling", "dump", "restore", "copy", "tools", "validation", "scaling", "memory")
VALIDATION_MODES = ("counts", "full")
VALIDATION_SIZES = (1, 2, 4)  # multiples of the base (one-unit) collection size
MEMORY_SIZES = (1, 4)
CEILING_DB = "bench_ceiling"


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
            [sorted_read], [read], ratio_to=READ_CEILING, note="diagnostic: the read full validation does",
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
        out_root=str(plain_root), gzip=False, batch_size=cfg.batch_docs,
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
    figures = [_same_shape(ctx, figure_from(
        "restore.native", "restore", f"restore: native, {cfg.restore_workers} insert threads (1 task/coll)",
        [o.sections[0] for o in outcomes.values()], list(outcomes.values()), ratio_to=INSERT_CEILING,
        note=index_note,
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
    """End to end in one process: dump every collection, then restore every one (wall time)."""
    cfg, spec = ctx.config, ctx.dataset.spec
    root, target_db = ctx.scratch("copy"), f"{ctx.db}_copy"
    outcome = ctx.child(
        "copy", workers.copy, name="copy", source_uri=ctx.source_uri, target_uri=ctx.target_uri, db=ctx.db,
        collections=spec.names, dump_root=str(root), target_db=target_db, workers=cfg.restore_workers,
        batch_docs=cfg.batch_docs,
    )
    ctx.drop_target_databases([target_db])
    shutil.rmtree(root, ignore_errors=True)
    section = outcome.sections[0]
    _check_documents("the end-to-end copy", section.documents, spec.documents)
    return [figure_from(
        "copy.native", "copy", "end-to-end copy: dump all, then restore all", [section], [outcome],
        ratio_to=INSERT_CEILING,
        note=f"dump {section.extra['dump_seconds']:.1f}s + restore {section.extra['restore_seconds']:.1f}s",
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
                 dump_root=str(root), target_db=target_db, workers=cfg.restore_workers, batch_docs=cfg.batch_docs)
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
    Phase("validation", "counts and full validation at 1x/2x/4x", run_validation, needs=("restore",)),
    Phase("scaling", "copy over 1/2/4 worker processes", run_scaling),
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
