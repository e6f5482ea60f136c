"""The report plugin as Airflow loads it: every Airflow process (each task's too) imports ``plugins/``, so
loading it must not pull in the web stack; the api-server builds the app on its first request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WEB_STACK = ("fastapi", "starlette", "airflow.api_fastapi", "atlas_migration.report_app")


def test_loading_the_plugin_imports_no_web_stack() -> None:
    probe = ("import json, sys; import migration_report; "
             f"print(json.dumps([m for m in {WEB_STACK!r} if m in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "include")])}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_lazy_app_builds_the_report_app_on_its_first_request(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    import migration_report

    app = migration_report.LazyReportApp()
    assert app._app is None
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    # An unknown path: the real FastAPI app answers 404 (its routes are behind authentication otherwise).
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/no-such-page", "raw_path": b"/no-such-page", "root_path": "", "query_string": b"",
             "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    from atlas_migration.report_app import app as real_app

    assert app._app is real_app
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 404
