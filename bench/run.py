"""Command line: ``python -m bench.run [--small | --docs N --doc-bytes B --collections C] [...]``.

Starts a source and a target server (SecantusDB, on free loopback ports, storage in a scratch directory),
seeds the source, runs the phases, prints one table row per figure plus the issue's targets as PASS/MISS,
and writes everything to ``bench/results/<UTC timestamp>.json``. Both servers and the scratch directory
are removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The package lives under include/ (the DAGs' PYTHONPATH); pytest adds it through its pythonpath setting.
for _path in (REPO_ROOT / "include", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pymongo  # noqa: E402

from bench.datagen import DatasetSpec, seed_source  # noqa: E402
from bench.measure import LoadMonitor, psutil  # noqa: E402
from bench.phases import IMPORT_FORMATS, PHASES, BenchConfig, BenchContext, run_phases, select_phases  # noqa: E402
from bench.report import evaluate_targets, fill_ratios, render_table, write_json  # noqa: E402
from devtools.mongo_servers import LocalMongoServer, start_server  # noqa: E402

DEFAULT_RESULTS = REPO_ROOT / "bench" / "results"
SMALL_DOCS = 50_000
_PROFILE_TOP = 25
# Other processes using more than this many cores on average make a run's figures unreliable.
_BUSY_MACHINE_CORES = 0.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help=f"quick run: {SMALL_DOCS:,} documents")
    parser.add_argument("--docs", type=int, help=f"documents in all (default {defaults.docs:,})")
    parser.add_argument("--doc-bytes", type=int, default=defaults.doc_bytes, help="mean document size in bytes")
    parser.add_argument("--collections", type=int, default=defaults.collections,
                        help="collections, weighted 4:2:1:1:... (at least 3)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_docs,
                        help="engine cursor/insert batch in documents (the DAG's batch_size)")
    parser.add_argument("--restore-workers", type=int, default=defaults.restore_workers,
                        help="insert threads per collection (the DAG's restore_workers)")
    parser.add_argument("--live-write-rate", type=float, default=defaults.live_write_rate,
                        help="live phase: the writer's fixed rate in ops/s during the steady-state lag figure")
    parser.add_argument("--live-copy-order", choices=["auto", "id_range", "natural"], default=defaults.live_copy_order,
                        help="live phase: how the initial copy reads a collection of several partitions "
                             "(the DAG's copy_order)")
    parser.add_argument("--import-mb", type=float, default=defaults.import_mb,
                        help="file_import phase: size in MB of each generated file (one CSV, one JSON Lines)")
    parser.add_argument("--import-ranges", type=int, default=defaults.import_ranges,
                        help="file_import phase: byte ranges (import tasks) each file is cut into")
    parser.add_argument("--import-formats", default=",".join(defaults.import_formats),
                        help=f"file_import phase: which generated files to import, comma-separated subset of "
                             f"{', '.join(IMPORT_FORMATS)} (a 1 GB run of one format takes half the time)")
    parser.add_argument("--phases", help=f"comma-separated subset of: {', '.join(p.name for p in PHASES)}")
    parser.add_argument("--profile", metavar="PHASE", help="run that phase's child processes under cProfile")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--workdir", type=Path, help="where server storage and dumps go (default: system temp)")
    args = parser.parse_args(argv)
    args.import_formats = tuple(f.strip() for f in args.import_formats.split(",") if f.strip())
    if not args.import_formats or set(args.import_formats) - set(IMPORT_FORMATS):
        parser.error(f"--import-formats takes a comma-separated subset of {', '.join(IMPORT_FORMATS)}")
    if args.docs is None:
        args.docs = SMALL_DOCS if args.small else defaults.docs
    if (args.docs < 1 or args.doc_bytes < 1 or args.batch_size < 1 or args.restore_workers < 1
            or args.live_write_rate <= 0 or args.import_mb <= 0 or args.import_ranges < 1):
        parser.error("--docs, --doc-bytes, --batch-size, --restore-workers, --live-write-rate, --import-mb and "
                     "--import-ranges must be positive")
    return args


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _start_servers(workdir: Path) -> tuple[LocalMongoServer, LocalMongoServer]:
    # Started side by side: each takes a couple of seconds to answer its first ping.
    with ThreadPoolExecutor(max_workers=2) as pool:
        source = pool.submit(start_server, workdir / "source")
        target = pool.submit(start_server, workdir / "target")
        servers = []
        for future in (source, target):
            try:
                servers.append(future.result())
            except Exception:
                for started in servers:
                    started.destroy()
                raise
    return servers[0], servers[1]


def _stop_servers(servers: list[LocalMongoServer]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        list(pool.map(lambda server: server.destroy(), servers))


def _load_line(load: dict[str, Any]) -> str:
    if not load.get("available"):
        return "other load: not measured (psutil is not installed)"
    top = ", ".join(load["top_other_processes"]) or "none"
    line = (f"other processes used {load['other_processes_cpu_seconds']:.0f} CPU-s during the run "
            f"({load['other_processes_cores']:.2f} cores on average; machine busy {load['machine_busy_percent']}%); "
            f"top: {top}")
    if (load["other_processes_cores"] or 0) > _BUSY_MACHINE_CORES:
        line += "\nWARNING: the machine was shared; figures are depressed and ratios unreliable (re-run when idle)"
    return line


def _print_profile(profile_dir: Path) -> None:
    files = sorted(profile_dir.glob("*.prof"))
    if not files:
        return
    print(f"\ncProfile of {len(files)} child process(es), main threads only ({profile_dir}):")
    stats = pstats.Stats(*(str(f) for f in files), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(_PROFILE_TOP)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = BenchConfig(
        docs=args.docs, doc_bytes=args.doc_bytes, collections=args.collections, seed=args.seed,
        batch_docs=args.batch_size, restore_workers=args.restore_workers, live_write_rate=args.live_write_rate,
        live_copy_order=args.live_copy_order,
        import_mb=args.import_mb, import_ranges=args.import_ranges, import_formats=args.import_formats,
    )
    spec = DatasetSpec.plan(config.docs, config.doc_bytes, config.collections, config.seed)
    phases = select_phases([p.strip() for p in args.phases.split(",") if p.strip()] if args.phases else None)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    profile_dir = None
    if args.profile:
        if args.profile not in {p.name for p in phases}:
            raise SystemExit(f"--profile {args.profile}: not one of the phases run ({', '.join(p.name for p in phases)})")
        profile_dir = args.results_dir / f"{stamp}-profile-{args.profile}"
        profile_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=args.workdir))
    print(f"bench: {spec.documents:,} documents of ~{spec.doc_bytes} B in {len(spec.collections)} collections; "
          f"phases {', '.join(p.name for p in phases)}; scratch {workdir}", flush=True)
    loadavg_before = os.getloadavg()
    monitor = LoadMonitor().start()
    servers: list[LocalMongoServer] = []
    try:
        servers = list(_start_servers(workdir))
        source, target = servers
        with pymongo.MongoClient(source.uri) as client:
            dataset = seed_source(client, spec)
        print(f"seeded {dataset.spec.documents:,} documents ({dataset.bytes / 1e6:,.0f} MB, mean "
              f"{dataset.mean_doc_bytes:.0f} B) in {dataset.seconds:.1f}s", flush=True)
        server_pids = {"source": source.process.pid, "target": target.process.pid}
        context = BenchContext(
            config=config, dataset=dataset, source_uri=source.uri, target_uri=target.uri, server_pids=server_pids,
            workdir=workdir, say=lambda line: print(line, flush=True), profile_phase=args.profile,
            profile_dir=profile_dir,
        )
        figures = run_phases(context, phases)
    finally:
        _stop_servers(servers)
        shutil.rmtree(workdir, ignore_errors=True)
        load = monitor.stop()
    load["loadavg_before"] = [round(x, 2) for x in loadavg_before]
    load["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]

    fill_ratios(figures)
    targets = evaluate_targets(figures)
    meta = {
        "timestamp": stamp,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": {**asdict(config), "ceiling_docs": config.ceiling_docs},
        "phases": [p.name for p in phases],
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"pymongo": pymongo.version, "SecantusDB": _version("SecantusDB")},
        "load": load,
        "memory_method": "peak RSS = ru_maxrss (RUSAGE_SELF) reported by each child process; external tools: "
                         "RUSAGE_CHILDREN of the child that ran them",
        "cpu_method": "percent of one core over the measured time: client = the child's rusage, servers = psutil"
                      if psutil is not None else "client only (psutil not installed)",
    }
    header = [
        "",
        f"{spec.documents:,} docs (~{dataset.mean_doc_bytes:.0f} B, {dataset.bytes / 1e6:,.0f} MB) in "
        f"{len(spec.collections)} collections; 1x = {spec.unit_documents:,} docs; {os.cpu_count()} CPUs; "
        f"load avg {load['loadavg_before'][0]:.2f} -> {load['loadavg_after'][0]:.2f}",
        _load_line(load),
        "ratio: docs/s over the ceiling it is judged against; CPU: % of one core (client process / source / target)",
        "",
    ]
    print(render_table(figures, targets, header))
    path = write_json(args.results_dir / f"{stamp}.json", meta, dataset.to_dict(), figures, targets)
    print(f"\nresults: {path} ({meta['seconds']:.0f}s in all)")
    if profile_dir is not None:
        _print_profile(profile_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
