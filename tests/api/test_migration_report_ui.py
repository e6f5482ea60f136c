"""The migration report in the UI, end to end: a real run, a real api-server, a real browser.

1. ``airflow dags test mongo_to_atlas`` (mongorestore, full validation) from the session's standalone
   source into a target that requires SCRAM authentication (its password is in the target connection);
2. an api-server alone (``api_only=True``) on the same Airflow home, which loads ``plugins/`` and reads
   the run from the metadata DB only: the report file on disk is moved away first, so the pages can only
   come from the XCom the validate task published;
3. the run page and the migrations page with a JWT from ``POST /auth/token``: verdict, namespaces and
   counts are there, the target's password is not; without a token, or with a forged one, 401/403;
4. headless Chromium loads the run page authenticated the way the UI is, with the JWT in the ``_token``
   cookie (set through the DevTools protocol's ``Network.setCookie``: nothing in the URL, no weaker auth),
   and takes a screenshot. Skips (this step only) when ``/usr/bin/chromium`` is absent; ``.ci/run``
   installs it on a fresh CI machine. ``MIGRATION_SCREENSHOT=path`` keeps the screenshot (README's
   ``docs/report-page.png`` is made so).

One DAG run (about 40-90 s of CPU) and one api-server (about 15-25 s to start).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from atlas_migration.report_view import URL_PREFIX
from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json
from devtools.airflow_services import AirflowServices, api_server_only
from devtools.mongo_servers import start_server

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
CHROMIUM = Path("/usr/bin/chromium")
# A password no page may show; generated so that it cannot appear by chance.
TARGET_PASSWORD = "Rpt-" + base64.urlsafe_b64encode(os.urandom(12)).decode().rstrip("=")


@pytest.fixture(scope="module")
def secured_target(tmp_path_factory) -> Iterator[str]:
    """A target that requires SCRAM authentication; yields its URI with the user's password."""
    server = start_server(tmp_path_factory.mktemp("report-target"),
                          users=[{"user": "migrator", "pwd": TARGET_PASSWORD, "roles": ["root"]}])
    try:
        yield server.uri_for("migrator", TARGET_PASSWORD)
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def migrated(tmp_path_factory, standalone_server, secured_target) -> Iterator[tuple[AirflowHome, str]]:
    """One finished mongorestore run; yields the home and the run's output (task logs included)."""
    standalone_server.drop_user_databases()
    with standalone_server.client() as src:
        src.shop.orders.insert_many([{"_id": i, "total": i * 3, "status": "paid" if i % 2 else "open"}
                                     for i in range(300)])
        src.shop.customers.insert_many([{"_id": f"c{i}", "name": f"customer {i}"} for i in range(40)])
        src.crm.notes.insert_many([{"_id": i, "text": "x" * 50} for i in range(12)])
    home = AirflowHome(tmp_path_factory.mktemp("report-airflow-home"))
    home.migrate()
    conns = {conn_env_name("mongo_source"): mongo_connection_json(standalone_server.uri),
             conn_env_name("atlas_target"): mongo_connection_json(secured_target)}
    run = home.dags_test(DAG_ID, {"strategy": "mongorestore", "validation_mode": "full"}, env=conns)
    assert run.succeeded, f"state={run.state}\n{run.output[-6000:]}"
    # The pages must not need the worker's disk: move the report files out of the api-server's reach.
    for report_dir in (home.path / "migration-work" / DAG_ID).glob("*/report"):
        shutil.rmtree(report_dir)
    yield home, run.output
    standalone_server.drop_user_databases()


@pytest.fixture(scope="module")
def api(migrated) -> Iterator[AirflowServices]:
    home, _ = migrated
    with api_server_only(home) as services:
        yield services


def _token(api: AirflowServices) -> str:
    response = requests.post(f"{api.base_url}/auth/token", json={"username": api.username, "password": api.password},
                             timeout=30)
    response.raise_for_status()
    return response.json()["access_token"]


def test_report_pages_come_from_the_metadata_db_behind_airflow_auth(api: AirflowServices, migrated) -> None:
    _, run_output = migrated
    assert TARGET_PASSWORD not in run_output
    headers = {"Authorization": f"Bearer {_token(api)}"}
    runs = requests.get(f"{api.base_url}/api/v2/dags/{DAG_ID}/dagRuns", headers=headers, timeout=60)
    runs.raise_for_status()
    (run,) = runs.json()["dag_runs"]
    run_url = f"{api.base_url}{URL_PREFIX}/runs/{DAG_ID}/{quote(run['dag_run_id'], safe='')}"

    # The "Migration report" extra link of validate, computed by the worker when the task ended, opens it.
    links = requests.get(f"{api.base_url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run['dag_run_id'], safe='')}"
                         "/taskInstances/validate/links", headers=headers, timeout=60)
    links.raise_for_status()
    assert links.json()["extra_links"] == {"Migration report": run_url.removeprefix(api.base_url)}, links.json()
    report_links = requests.get(f"{api.base_url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run['dag_run_id'], safe='')}"
                                "/taskInstances/report/links", headers=headers, timeout=60)
    assert not report_links.json()["extra_links"], report_links.json()  # only validate carries it

    page = requests.get(run_url, headers=headers, timeout=60)
    assert page.status_code == 200, page.text[:2000]
    html = page.text
    assert '<span class="verdict PASS">PASS</span>' in html
    assert "<strong>mongorestore</strong>" in html and "rule <code>override</code>" in html
    assert "3 of 3 namespaces match" in html and "source 352, target 352" in html
    for namespace, count in (("crm.notes", 12), ("shop.customers", 40), ("shop.orders", 300)):
        assert f"<code>{namespace}</code></td><td>collection</td><td class=\"num\">{count}</td>" \
               f"<td class=\"num\">{count}</td>" in html, namespace
    assert html.count("sum-sha256:") >= 6  # both digests of every namespace
    assert "None: every namespace matches." in html
    for phase in ("inspect_source", "route", "mongorestore", "validate"):
        assert f"<td>{phase}</td>" in html
    assert "Copied 352 documents" in html

    migrations = requests.get(f"{api.base_url}{URL_PREFIX}/migrations", headers=headers, timeout=60)
    assert migrations.status_code == 200, migrations.text[:2000]
    assert run["dag_run_id"] in migrations.text and 'class="verdict PASS"' in migrations.text
    assert "<td>mongorestore</td>" in migrations.text and "no rehearsal has been recorded yet" in migrations.text

    for text in (html, migrations.text):
        assert TARGET_PASSWORD not in text and "migrator:" not in text

    # The UI's entries: a tab on the DAG run page and a nav entry.
    plugins = requests.get(f"{api.base_url}/api/v2/plugins", headers=headers, timeout=60).json()["plugins"]
    views = {v["name"]: v for p in plugins if p["name"] == "migration_report" for v in p["external_views"]}
    assert views["Migration report"]["destination"] == "dag_run"
    assert views["Migration report"]["href"] == URL_PREFIX.lstrip("/") + "/runs/{DAG_ID}/{RUN_ID}"
    assert views["Migrations"]["destination"] == "nav"

    for url in (run_url, f"{api.base_url}{URL_PREFIX}/migrations"):
        anonymous = requests.get(url, timeout=60)
        assert anonymous.status_code == 401, anonymous.text[:500]
        forged = requests.get(url, headers={"Authorization": "Bearer not-a-token"}, timeout=60)
        assert forged.status_code in (401, 403), forged.text[:500]
        assert "crm.notes" not in anonymous.text + forged.text


def test_headless_chromium_renders_the_run_page_with_the_ui_cookie(api: AirflowServices, tmp_path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    token = _token(api)
    runs = requests.get(f"{api.base_url}/api/v2/dags/{DAG_ID}/dagRuns",
                        headers={"Authorization": f"Bearer {token}"}, timeout=60).json()["dag_runs"]
    run_url = f"{api.base_url}{URL_PREFIX}/runs/{DAG_ID}/{quote(runs[0]['dag_run_id'], safe='')}"
    shot = Path(os.environ.get("MIGRATION_SCREENSHOT") or tmp_path / "report-page.png")
    text = _chromium_screenshot(run_url, cookie=("_token", token, api.base_url), out=shot)
    assert "PASS" in text and "shop.orders" in text and "crm.notes" in text
    assert "Not authenticated" not in text and TARGET_PASSWORD not in text
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1400, 1000) and len(png) > 20_000  # a rendered page, not a blank one


def _chromium_screenshot(url: str, *, cookie: tuple[str, str, str], out: Path, timeout: float = 60) -> str:
    """Load ``url`` in headless Chromium with one cookie set first; save a 1400x1000 PNG; return the text.

    The DevTools protocol over a pipe-less websocket: Chromium picks a free port and writes it to
    ``DevToolsActivePort`` in its fresh profile, so parallel runs never collide.
    """
    from websockets.sync.client import connect

    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    argv = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "--window-size=1400,1000", "about:blank"]
    browser = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            assert browser.poll() is None and time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as ws:
            ids = iter(range(1, 1_000))

            def call(method: str, **params):
                ident = next(ids)
                ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=timeout))
                    if message.get("id") == ident:
                        assert "error" not in message, message
                        return message.get("result", {})
                    if message.get("method") == "Page.loadEventFired":
                        loaded.append(message)

            loaded: list[dict] = []
            name, value, origin = cookie
            call("Network.enable")
            call("Network.setCookie", name=name, value=value, url=origin, httpOnly=True, sameSite="Lax")
            call("Page.enable")
            call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            while not loaded:
                message = json.loads(ws.recv(timeout=timeout))
                if message.get("method") == "Page.loadEventFired":
                    loaded.append(message)
            text = call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)["result"]["value"]
            data = call("Page.captureScreenshot", format="png")["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))
        return text
    finally:
        # Its own session: the group holds the browser and the renderer, GPU and zygote processes it forked.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(browser.pid, sig)
                browser.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(profile, ignore_errors=True)
