"""The connection forms as Admin > Connections gets them: a real api-server (alone: no DAG runs here) with
the project installed as a distribution, read through the endpoint the UI's connection form calls,
``GET /ui/connections/hook_meta``, and the public ``GET /api/v2/providers``.

One api-server for the module (``devtools.airflow_services``, ``api_only=True``): about 15-25 s to migrate
the metadata DB and start; every process is stopped in the finalizer. Fails (never skips) when the
distribution is not installed: ``scripts/bootstrap.sh`` installs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from atlas_migration import __version__
from atlas_migration.connection_forms import EXTRA_FIELDS, FIELD_BEHAVIOURS, HOOK_CLASSES, HOOK_NAMES
from devtools.airflow_env import AirflowHome
from devtools.airflow_services import AirflowServices, api_server_only
from tests.helpers import PROVIDER_DISTRIBUTION, require_provider_distribution

pytestmark = pytest.mark.integration
HOOK_META = "/ui/connections/hook_meta"
# hook_meta names the standard fields as the UI does: the connection's ``schema`` is ``url_schema``.
STANDARD_FIELDS = {"schema": "url_schema", "host": "host", "port": "port", "login": "login", "password": "password"}


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[AirflowServices]:
    require_provider_distribution()
    with api_server_only(AirflowHome(tmp_path_factory.mktemp("airflow-provider-home"))) as services:
        yield services


def test_hook_meta_serves_the_three_connection_forms(api: AirflowServices) -> None:
    with api.session() as session:
        response = session.get(api.base_url + HOOK_META, timeout=120)
        assert response.status_code == 200, response.text[:2000]
        forms = {entry["connection_type"]: entry for entry in response.json()}
        providers = session.get(f"{api.base_url}/api/v2/providers", params={"limit": 100}, timeout=60)
        providers.raise_for_status()

    assert {"mongo", "aws"} <= set(forms)  # the other providers' types are still there
    for conn_type, hook_class in HOOK_CLASSES.items():
        form = forms.get(conn_type)
        assert form is not None, f"{conn_type} missing from {sorted(forms)}"
        assert (form["hook_class_name"], form["hook_name"]) == (hook_class, HOOK_NAMES[conn_type])
        extras = form["extra_fields"]
        assert list(extras) == [f.name for f in EXTRA_FIELDS[conn_type]]
        for field in EXTRA_FIELDS[conn_type]:
            schema = extras[field.name]["schema"]
            assert schema["title"] == field.label and extras[field.name]["description"] == field.description
            assert (schema.get("format") == "password") is field.secret
            assert extras[field.name]["value"] is None  # nothing pre-filled: an empty form stores nothing
        behaviour = FIELD_BEHAVIOURS[conn_type]
        standard = form["standard_fields"]
        for name, ui_name in STANDARD_FIELDS.items():
            shown = standard[ui_name] or {"hidden": False, "title": None, "placeholder": None}
            assert shown["hidden"] is (name in behaviour["hidden_fields"]), (conn_type, name)
            assert shown["title"] == behaviour["relabeling"].get(name), (conn_type, name)
            assert shown["placeholder"] == behaviour["placeholders"].get(name), (conn_type, name)

    assert forms["mongodb_atlas"]["extra_fields"]["client_secret"]["schema"]["format"] == "password"
    assert forms["mongosync"]["standard_fields"]["login"]["hidden"] is True
    listed = {p["package_name"]: p for p in providers.json()["providers"]}
    assert listed[PROVIDER_DISTRIBUTION]["version"] == __version__


def test_hook_meta_refuses_requests_without_a_valid_token(api: AirflowServices) -> None:
    anonymous = requests.get(api.base_url + HOOK_META, timeout=60)
    assert anonymous.status_code == 401, anonymous.text[:500]
    forged = requests.get(api.base_url + HOOK_META, headers={"Authorization": "Bearer not-a-token"}, timeout=60)
    assert forged.status_code in (401, 403), forged.text[:500]
    assert "mongodb_atlas" not in anonymous.text + forged.text
