"""`make demo`: a full migration between local servers, end to end, through Airflow.

1. starts a source and a target server on 127.0.0.1 (the source is a standalone server: no oplog, so
   MongoDB's guidance routes it to mongorestore);
2. seeds the source with the sample dataset (3 databases, 10 namespaces, 100,000 documents);
3. runs ``airflow dags test mongo_to_atlas`` with ``strategy=auto`` in a fresh Airflow home;
4. prints what happened (profile, decision, progress, validation report) and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from devtools.airflow_env import REPO, AirflowHome, conn_env_name, mongo_connection_json
from devtools.mongo_servers import start_server
from devtools.sample_data import seed_sample_dataset

# Log lines worth showing a newcomer, in the order the DAG produces them.
HIGHLIGHTS = ("Source profile", "Routing decision", "Copy plan", "mongorestore strategy", "dumped ", "restored ",
              "Validation summary", "Migration finished", "ERROR", "Error", "DagRun Finished")


def _highlights(output: str) -> str:
    lines, keep = [], 0
    for line in output.splitlines():
        if any(h in line for h in HIGHLIGHTS):
            keep = 1
            lines.append(line)
        elif keep and line.startswith("    "):
            lines.append(line)  # the indented body of a block
        else:
            keep = 0
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size (1.0 = 100,000 documents)")
    parser.add_argument("--conf", default="{}", help="extra DAG params as JSON, e.g. '{\"validation_mode\": \"full\"}'")
    parser.add_argument("--workdir", default=str(REPO / ".run" / "demo"))
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    servers = []
    try:
        print("== starting a source (standalone) and a target server on 127.0.0.1", flush=True)
        source = start_server(workdir / "source", standalone=True)
        servers.append(source)
        target = start_server(workdir / "target")
        servers.append(target)
        print(f"   source {source.host}   target (stands in for Atlas) {target.host}")

        import pymongo

        started = time.monotonic()
        with pymongo.MongoClient(source.uri) as client:
            summary = seed_sample_dataset(client, scale=args.scale)
        print(f"== seeded the source: {summary.documents:,} documents in {summary.collections} collections and "
              f"{summary.views} view over {summary.databases} databases ({time.monotonic() - started:.1f}s)")

        home = AirflowHome(workdir / "airflow")
        print("== preparing a fresh Airflow home (airflow db migrate)", flush=True)
        home.migrate()
        env = {
            conn_env_name("mongo_source"): mongo_connection_json(source.uri),
            conn_env_name("atlas_target"): mongo_connection_json(target.uri),
        }
        conf = {"strategy": "auto", "validation_mode": "full", **json.loads(args.conf)}
        print(f"== airflow dags test mongo_to_atlas -c '{json.dumps(conf)}'", flush=True)
        started = time.monotonic()
        run = home.dags_test("mongo_to_atlas", conf, env=env)
        log_file = workdir / "dags_test.log"
        log_file.write_text(run.output)
        print(f"   finished in {time.monotonic() - started:.0f}s; full log: {log_file}\n")
        print(_highlights(run.output))

        reports = sorted((workdir / "airflow" / "migration-work").glob("mongo_to_atlas/*/report/validation.md"))
        if reports:
            print(f"\n== validation report ({reports[-1]})\n")
            print(reports[-1].read_text())
        print(f"== DAG run state: {run.state}")
        return 0 if run.succeeded else 1
    finally:
        for server in servers:
            server.destroy()
        print("== stopped every server this demo started")


if __name__ == "__main__":
    sys.exit(main())
