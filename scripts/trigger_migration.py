#!/usr/bin/env python3
"""Trigger a ``mongo_to_atlas`` run through Airflow's REST API and follow it to its end.

    export AIRFLOW_PASSWORD=...        # or --password-file FILE
    python scripts/trigger_migration.py --api http://127.0.0.1:8080 --username admin \\
        --conf '{"strategy": "mongorestore"}'

Steps: ``POST /auth/token`` for a bearer token; check the DAG exists; create the run
(``POST /api/v2/dags/{dag_id}/dagRuns`` with ``logical_date: null`` and the conf: Airflow validates the
conf against the DAG's params and refuses invalid values with HTTP 400); unpause the DAG if it is paused
(after the run was accepted, so a refused conf changes nothing); poll the run and print every task-instance
state change; print the final state and, from the ``report`` (else ``validate``) task's XCom, where the
validation reports are. On a failed run it prints the error lines of the failed tasks' logs.

``--password-file`` holds the password on its first line, or is the simple auth manager's JSON file
(``{"admin": "..."}``, e.g. ``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``). The
password and the token are never printed.

Exit codes: 0 the run succeeded; 1 the run failed; 2 an API or usage error (the API's detail is printed);
3 the run did not finish within ``--timeout`` (it keeps running in Airflow).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

EXIT_SUCCESS, EXIT_RUN_FAILED, EXIT_API_ERROR, EXIT_TIMEOUT = 0, 1, 2, 3
FINISHED = {"success", "failed"}
REPORT_TASKS = ("report", "validate")  # both return {"verdict", "files", "namespaces"}
REQUEST_TIMEOUT = 30.0
# validate logs "Validation report (<path of validation.md>)" before the Markdown table.
REPORT_LOG_LINE = re.compile(r"Validation report \((/[^)\n]+)\)")


class ApiError(Exception):
    """An HTTP error from the API (or no answer at all), with the API's own detail."""

    def __init__(self, action: str, status: int | None, detail: str) -> None:
        super().__init__(f"{action}: HTTP {status}: {detail}" if status else f"{action}: {detail}")
        self.status = status


def _detail(response: requests.Response) -> str:
    """The ``detail`` of a FastAPI error body (a string, or a list of validation errors), else the text."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text.strip()[:2000]
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": ..., "input": ...}]
        # Keep location and message only: "input" echoes the request body.
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return detail if isinstance(detail, str) else json.dumps(detail)


class AirflowClient:
    """The handful of REST calls this script needs; re-authenticates once when the token expires."""

    def __init__(self, api: str, username: str, password: str) -> None:
        self.api = api.rstrip("/")
        self._username, self._password = username, password
        self.http = requests.Session()

    def authenticate(self) -> None:
        try:
            response = self.http.post(f"{self.api}/auth/token", timeout=REQUEST_TIMEOUT,
                                      json={"username": self._username, "password": self._password})
        except requests.RequestException as exc:
            raise ApiError(f"cannot reach {self.api}", None, type(exc).__name__) from None
        if response.status_code not in (200, 201):
            raise ApiError("authentication (POST /auth/token)", response.status_code, _detail(response))
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, action: str, *, ok: tuple[int, ...] = (200,), retry_auth: bool = True,
             **kwargs: Any) -> requests.Response:
        try:
            response = self.http.request(method, f"{self.api}{path}", timeout=REQUEST_TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            # Only the exception's type: its text can hold the full URL and, for some errors, headers.
            raise ApiError(action, None, f"no answer from {self.api} ({type(exc).__name__})") from None
        if response.status_code == 401 and retry_auth:  # the token expired during a long run
            self.authenticate()
            return self.call(method, path, action, ok=ok, retry_auth=False, **kwargs)
        if response.status_code not in ok:
            raise ApiError(action, response.status_code, _detail(response))
        return response

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run (the API pages at 100)."""
        items: list[dict[str, Any]] = []
        while True:
            page = self.call("GET", f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances",
                             "listing task instances", params={"limit": 100, "offset": len(items)}).json()
            items += page["task_instances"]
            if not page["task_instances"] or len(items) >= page["total_entries"]:
                return items


def q(part: str) -> str:
    return quote(part, safe="")


def read_password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            text = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read --password-file: {exc.strerror}: {args.password_file}") from None
        if text.startswith("{"):  # the simple auth manager's {"user": "password"} file
            passwords = json.loads(text)
            if args.username not in passwords:
                raise SystemExit(f"error: no password for user {args.username!r} in {args.password_file}")
            return passwords[args.username]
        return text.splitlines()[0].strip() if text else ""
    password = os.environ.get("AIRFLOW_PASSWORD", "")
    if not password:
        raise SystemExit("error: give --password-file FILE or set AIRFLOW_PASSWORD")
    return password


def parse_conf(raw: str) -> dict[str, Any]:
    try:
        text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
    except OSError as exc:
        raise SystemExit(f"error: cannot read --conf file: {exc.strerror}: {raw[1:]}") from None
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --conf is not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise SystemExit("error: --conf must be a JSON object, e.g. '{\"strategy\": \"mongorestore\"}'")
    return conf


def ti_label(ti: dict[str, Any]) -> str:
    return ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"


class Follower:
    """Prints task-instance state changes as the polls discover them."""

    def __init__(self, client: AirflowClient, dag_id: str, run_id: str) -> None:
        self.client, self.dag_id, self.run_id = client, dag_id, run_id
        self.seen: dict[tuple[str, int], tuple[str | None, int]] = {}
        self.started = time.monotonic()

    def poll(self) -> list[dict[str, Any]]:
        tis = self.client.task_instances(self.dag_id, self.run_id)
        for ti in sorted(tis, key=lambda t: (t.get("start_date") or "~", t["task_id"], t["map_index"])):
            key, now = (ti["task_id"], ti["map_index"]), (ti["state"], ti["try_number"])
            if self.seen.get(key) != now and ti["state"] is not None:
                attempt = f" (try {ti['try_number']})" if ti["try_number"] > 1 else ""
                print(f"[{time.monotonic() - self.started:6.1f}s] {ti_label(ti)}: {ti['state']}{attempt}", flush=True)
            self.seen[key] = now
        return tis


def failed_task_errors(client: AirflowClient, dag_id: str, run_id: str, tis: list[dict[str, Any]],
                       lines: int = 8) -> dict[str, str]:
    """Print the error lines of each failed task's log, so a refused migration says why.

    Returns report paths found in those logs: a ``validate`` that found mismatches has written its
    reports and logged where ("Validation report (<path>)"), but returns nothing to XCom.
    """
    reports: dict[str, str] = {}
    for ti in (t for t in tis if t["state"] == "failed"):
        path = (f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(ti['task_id'])}"
                f"/logs/{ti['try_number']}")
        try:
            content = client.call("GET", path, "reading a task log", headers={"Accept": "application/json"},
                                  params={"map_index": ti["map_index"], "full_content": "true"}).json()["content"]
        except (ApiError, ValueError, KeyError):
            print(f"  {ti_label(ti)} failed (its log could not be read through the API)")
            continue
        events = [e for e in content if isinstance(e, dict)]
        for event in events:
            if match := REPORT_LOG_LINE.match(str(event.get("event", ""))):
                reports["markdown" if match[1].endswith(".md") else "json"] = match[1]
        errors = [e for e in events if e.get("level") in ("error", "critical")]
        print(f"  {ti_label(ti)} failed:")
        for event in errors[-lines:]:
            text = str(event.get("event", "")).strip()
            for detail in event.get("error_detail") or []:
                if isinstance(detail, dict) and detail.get("exc_value"):
                    text += f" -- {detail.get('exc_type', '')}: {detail['exc_value']}"
            print(f"    {text[:1000]}")
    return reports


def print_report(client: AirflowClient, dag_id: str, run_id: str, from_logs: dict[str, str]) -> None:
    """The report locations: the ``report`` task's return value (``validate``'s when ``report`` did not run),
    else the paths a failed ``validate`` logged."""
    for task_id in REPORT_TASKS:
        path = f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(task_id)}/xcomEntries/return_value"
        response = client.call("GET", path, "reading the report XCom", ok=(200, 404))
        if response.status_code == 404:
            continue
        value = response.json().get("value")
        if isinstance(value, str):  # stored JSON text in some versions
            value = json.loads(value)
        if not isinstance(value, dict) or "files" not in value:
            continue
        print(f"verdict: {value.get('verdict')} over {value.get('namespaces')} namespaces")
        for kind, where in value["files"].items():
            print(f"report ({kind}): {where}")
        return
    if from_logs:
        print("verdict: FAIL (validation found mismatches)")
        for kind, where in sorted(from_logs.items()):
            print(f"report ({kind}): {where}")
        return
    print("report: none (dry run, or a task failed before validation)")


def run(args: argparse.Namespace) -> int:
    conf, password = parse_conf(args.conf), read_password(args)
    client = AirflowClient(args.api, args.username, password)
    dag_id = args.dag_id
    client.authenticate()
    print(f"authenticated to {client.api} as {args.username}")
    dag = client.call("GET", f"/api/v2/dags/{q(dag_id)}", f"looking up DAG {dag_id!r}").json()

    body = {"logical_date": None, "conf": conf}
    if args.note:
        body["note"] = args.note
    dag_run = client.call("POST", f"/api/v2/dags/{q(dag_id)}/dagRuns", f"triggering {dag_id}",
                          ok=(200, 201), json=body).json()
    run_id = dag_run["dag_run_id"]
    print(f"triggered {dag_id} run {run_id} with conf {json.dumps(conf, sort_keys=True)}")
    print(f"in the UI: {client.api}/dags/{q(dag_id)}/runs/{q(run_id)}")
    if dag.get("is_paused"):
        client.call("PATCH", f"/api/v2/dags/{q(dag_id)}", f"unpausing {dag_id}",
                    params={"update_mask": "is_paused"}, json={"is_paused": False})
        print(f"unpaused {dag_id} (it was paused; new DAGs are paused at creation)")

    follower = Follower(client, dag_id, run_id)
    deadline = time.monotonic() + args.timeout
    state = dag_run.get("state")
    while True:
        state = client.call("GET", f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}", "polling the run").json()["state"]
        tis = follower.poll()
        if state in FINISHED:
            break
        if time.monotonic() >= deadline:
            print(f"timeout: run {run_id} is still {state} after {args.timeout:.0f}s (it keeps running in Airflow)")
            return EXIT_TIMEOUT
        time.sleep(args.poll_interval)

    elapsed = time.monotonic() - follower.started
    print(f"final state: {state} (run {run_id}, {elapsed:.1f}s)")
    from_logs = failed_task_errors(client, dag_id, run_id, tis) if state == "failed" else {}
    print_report(client, dag_id, run_id, from_logs)
    return EXIT_SUCCESS if state == "success" else EXIT_RUN_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", required=True, help="Airflow API server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--username", default="admin")
    parser.add_argument("--password-file", help="file with the password (default: $AIRFLOW_PASSWORD)")
    parser.add_argument("--conf", default="{}", help="DAG params as a JSON object, or @file.json")
    parser.add_argument("--dag-id", default="mongo_to_atlas")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to follow the run (default 6 h)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls (default 2)")
    parser.add_argument("--note", help="a note attached to the run (shown in the UI)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ApiError as exc:
        print(f"API error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except SystemExit as exc:  # usage errors from read_password / parse_conf
        print(exc, file=sys.stderr)
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        print("interrupted: the run keeps going in Airflow", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
