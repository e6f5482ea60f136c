"""The package as an Airflow provider: ``get_provider_info()`` against the schema shipped with the installed
Airflow, the connection forms against what the hooks read, and discovery by Airflow's ``ProvidersManager``
through the installed distribution's entry point (in a fresh interpreter, as an Airflow component does it).

The discovery test needs the distribution installed (``scripts/bootstrap.sh`` installs it editable) and
fails, never skips, without it. About 6 s, most of it the subprocess importing Airflow.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import airflow
import jsonschema
import pytest
from airflow.triggers.base import BaseTrigger

from atlas_migration import __version__
from atlas_migration.connection_forms import EXTRA_FIELDS, FIELD_BEHAVIOURS, form_widgets, read_extra
from atlas_migration.hooks.atlas import AtlasAdminHook, CloudManagerHook
from atlas_migration.hooks.mongosync import MongosyncHook
from atlas_migration.provider_info import PACKAGE_NAME, get_provider_info
from tests.helpers import PROVIDER_ENTRY_POINT, require_provider_distribution

REPO = Path(__file__).resolve().parent.parent
AIRFLOW_DIR = Path(airflow.__file__).parent
HOOKS = {"mongodb_atlas": AtlasAdminHook, "mongodb_cloud_manager": CloudManagerHook, "mongosync": MongosyncHook}
EXPECTED_FIELDS = {
    "mongodb_atlas": ["org_id", "project_id", "client_id", "client_secret"],
    "mongodb_cloud_manager": ["org_id"],
    "mongosync": ["version", "write_blocking"],
}


def connection_types() -> dict[str, dict[str, Any]]:
    return {entry["connection-type"]: entry for entry in get_provider_info()["connection-types"]}


def test_provider_info_is_valid_against_the_installed_airflows_schemas() -> None:
    info = get_provider_info()
    jsonschema.validate(info, json.loads((AIRFLOW_DIR / "provider_info.schema.json").read_text()))
    # Airflow validates each form's field behaviour (in its Python spelling) against a second schema, and
    # drops a behaviour that fails with only a log warning: check it here instead.
    behaviour_schema = json.loads((AIRFLOW_DIR / "customized_form_field_behaviours.schema.json").read_text())
    for entry in info["connection-types"]:
        kebab = entry["ui-field-behaviour"]
        jsonschema.validate({"hidden_fields": kebab["hidden-fields"], "relabeling": kebab["relabeling"],
                             "placeholders": kebab["placeholders"]}, behaviour_schema)
    assert info["package-name"] == PACKAGE_NAME and info["versions"] == [__version__]
    assert "extra-links" not in info  # the project has no BaseOperatorLink


def test_package_name_and_entry_point_match_pyproject() -> None:
    # Airflow refuses a provider whose package-name differs from its distribution's name.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == PACKAGE_NAME
    assert project["entry-points"]["apache_airflow_provider"] == {"provider_info": PROVIDER_ENTRY_POINT}
    module, _, function = PROVIDER_ENTRY_POINT.partition(":")
    assert getattr(importlib.import_module(module), function) is get_provider_info


def test_named_hooks_and_triggers_exist_and_agree_with_the_provider_info() -> None:
    info = get_provider_info()
    declared = connection_types()
    assert set(declared) == set(HOOKS)
    hook_modules = {m for entry in info["hooks"] for m in entry["python-modules"]}
    for conn_type, entry in declared.items():
        module_name, _, class_name = entry["hook-class-name"].rpartition(".")
        hook = getattr(importlib.import_module(module_name), class_name)
        assert hook is HOOKS[conn_type] and hook.conn_type == conn_type and hook.hook_name == entry["hook-name"]
        assert module_name in hook_modules
    integrations = {entry["integration-name"] for entry in info["integrations"]}
    assert {e["integration-name"] for e in info["hooks"] + info["triggers"]} <= integrations
    trigger_modules = [m for entry in info["triggers"] for m in entry["python-modules"]]
    assert sorted(trigger_modules) == ["atlas_migration.triggers.live_migration", "atlas_migration.triggers.mongosync"]
    for name in trigger_modules:
        module = importlib.import_module(name)
        defined = [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, BaseTrigger)
                   and obj.__module__ == name]
        assert defined, f"{name} defines no trigger"


def test_declared_forms_list_exactly_the_extras_the_hooks_read() -> None:
    for conn_type, entry in connection_types().items():
        assert list(entry["conn-fields"]) == EXPECTED_FIELDS[conn_type]
        secret = {name for name, field in entry["conn-fields"].items() if field["schema"].get("format") == "password"}
        assert secret == ({"client_secret"} if conn_type == "mongodb_atlas" else set())
        assert entry["ui-field-behaviour"]["hidden-fields"] == HOOKS[conn_type].get_ui_field_behaviour()["hidden_fields"]
    assert connection_types()["mongosync"]["conn-fields"]["write_blocking"]["schema"]["enum"] == [
        "sourceAndDestination", "destinationOnly", "none", None]


@pytest.mark.parametrize("prefixed", [False, True], ids=["airflow3-form", "airflow2-form"])
def test_atlas_hooks_read_the_extras_as_either_form_stores_them(monkeypatch, prefixed: bool) -> None:
    def key(conn_type: str, name: str) -> str:
        return f"extra__{conn_type}__{name}" if prefixed else name

    monkeypatch.setenv("AIRFLOW_CONN_FORM_ATLAS", json.dumps({
        "conn_type": "mongodb_atlas", "host": "https://cloud.example.test",
        "extra": {key("mongodb_atlas", "org_id"): "a" * 24, key("mongodb_atlas", "project_id"): "b" * 24,
                  key("mongodb_atlas", "client_id"): "mdb_sa_id_form", key("mongodb_atlas", "client_secret"): "s3cr3t-form",
                  # a field the new form cleared is stored empty: it must not hide the other spelling
                  **({"org_id": ""} if prefixed else {})}}))
    config = AtlasAdminHook("form_atlas").config
    assert (config.org_id, config.project_id, config.client_id, config.client_secret) == (
        "a" * 24, "b" * 24, "mdb_sa_id_form", "s3cr3t-form")
    assert config.uses_service_account and "s3cr3t-form" not in repr(config)

    monkeypatch.setenv("AIRFLOW_CONN_FORM_CM", json.dumps({
        "conn_type": "mongodb_cloud_manager", "login": "pub", "password": "priv",
        "extra": {key("mongodb_cloud_manager", "org_id"): "c" * 24}}))
    assert CloudManagerHook("form_cm").config.org_id == "c" * 24


def test_mongosync_extras_are_read_in_either_spelling(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_FORM_SYNC", json.dumps({
        "conn_type": "mongosync", "host": "sync.example.test", "port": 27182,
        "extra": {"extra__mongosync__version": "1.22", "write_blocking": "sourceAndDestination"}}))
    hook = MongosyncHook("form_sync")
    assert hook.base_url == "http://sync.example.test:27182/api/v1"
    assert read_extra(hook.extras, "mongosync", "version") == "1.22"
    assert read_extra(hook.extras, "mongosync", "write_blocking") == "sourceAndDestination"
    assert read_extra({"version": "", "extra__mongosync__version": ""}, "mongosync", "version") is None


def _fake_form_modules() -> dict[str, types.ModuleType]:
    """Stand-ins for wtforms / Flask-AppBuilder / flask_babel (not installed with Airflow 3 core) that
    record how the fields were built."""

    class Field:
        def __init__(self, label: str, *, widget: Any = None, validators: Any = (), description: str = "") -> None:
            self.label, self.widget, self.validators, self.description = label, widget, list(validators), description

    class AnyOf:
        def __init__(self, values: list[str]) -> None:
            self.values = values

    def module(name: str, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        vars(mod).update(attrs)
        return mod

    return {
        "wtforms": module("wtforms", StringField=type("StringField", (Field,), {}),
                          PasswordField=type("PasswordField", (Field,), {})),
        "wtforms.validators": module("wtforms.validators", AnyOf=AnyOf, Optional=type("Optional", (), {})),
        "flask_babel": module("flask_babel", lazy_gettext=lambda text: f"i18n:{text}"),
        "flask_appbuilder": module("flask_appbuilder"),
        "flask_appbuilder.fieldwidgets": module("flask_appbuilder.fieldwidgets",
                                                BS3TextFieldWidget=type("BS3TextFieldWidget", (), {}),
                                                BS3PasswordFieldWidget=type("BS3PasswordFieldWidget", (), {})),
    }


def test_hook_form_methods_build_the_declared_fields(monkeypatch) -> None:
    for name, fake in _fake_form_modules().items():
        monkeypatch.setitem(sys.modules, name, fake)
    for conn_type, hook in HOOKS.items():
        widgets = hook.get_connection_form_widgets()
        assert list(widgets) == EXPECTED_FIELDS[conn_type] == [f.name for f in EXTRA_FIELDS[conn_type]]
        for extra in EXTRA_FIELDS[conn_type]:
            field = widgets[extra.name]
            assert field.label == f"i18n:{extra.label}" and field.description == extra.description
            kinds = (type(field).__name__, type(field.widget).__name__)
            assert kinds == (("PasswordField", "BS3PasswordFieldWidget") if extra.secret
                             else ("StringField", "BS3TextFieldWidget"))
        assert hook.get_ui_field_behaviour() == FIELD_BEHAVIOURS[conn_type]
    choices = form_widgets("mongosync")["write_blocking"].validators
    assert [type(v).__name__ for v in choices] == ["Optional", "AnyOf"]
    assert choices[1].values == ["sourceAndDestination", "destinationOnly", "none"]


def test_hook_form_methods_import_nothing_at_module_import() -> None:
    # Provider discovery imports provider_info in every component, and DAG files import the hook modules:
    # neither may pull in the Flask UI stack.
    probe = ("import sys, atlas_migration.provider_info, atlas_migration.hooks.atlas, atlas_migration.hooks.mongosync; "
             "print(sorted(m for m in ('wtforms', 'flask_appbuilder', 'flask_babel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env=_env_with_repo_on_path(), check=True).stdout
    assert out.strip() == "[]"


def _env_with_repo_on_path() -> dict[str, str]:
    """This checkout's code first on the path (an editable install elsewhere must not win)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "include"), str(REPO), env.get("PYTHONPATH")) if p)
    return env


DISCOVERY_SCRIPT = """
import json
from airflow.providers_manager import ProvidersManager
from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

wanted = ("mongodb_atlas", "mongodb_cloud_manager", "mongosync")
pm = ProvidersManager()
provider = pm.providers.get("mongo-to-atlas")
meta = {m.connection_type: m for m in pm.iter_connection_type_hook_ui_metadata() if m.connection_type in wanted}
widgets = pm.connection_form_widgets
hooks = ProvidersManagerTaskRuntime().hooks  # imports each hook class, as using a connection does
print(json.dumps({
    "provider": provider and {"version": provider.version, "package": provider.data["package-name"]},
    "types": {t: {"hook_class_name": m.hook_class_name, "hook_name": m.hook_name,
                  "behaviour": m.field_behaviour,
                  "package": hooks[t].package_name if hooks.get(t) else None,
                  "conn_id_attr": hooks[t].connection_id_attribute_name if hooks.get(t) else None,
                  "fields": {w.field_name: {"sensitive": w.is_sensitive, "package": w.package_name}
                             for k, w in widgets.items() if k.startswith(f"extra__{t}__")}}
              for t, m in meta.items()},
    "triggers": sorted(t.trigger_class_name for t in pm.trigger if t.package_name == "mongo-to-atlas"),
}))
"""


def test_providers_manager_discovers_the_three_connection_types(tmp_path) -> None:
    require_provider_distribution()
    env = {**_env_with_repo_on_path(), "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run([sys.executable, "-c", DISCOVERY_SCRIPT], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["provider"] == {"version": __version__, "package": PACKAGE_NAME}
    assert set(found["types"]) == set(HOOKS)
    for conn_type, hook in HOOKS.items():
        seen = found["types"][conn_type]
        assert seen["hook_class_name"] == f"{hook.__module__}.{hook.__name__}"
        assert (seen["hook_name"], seen["package"], seen["conn_id_attr"]) == (
            hook.hook_name, PACKAGE_NAME, hook.conn_name_attr)
        assert list(seen["fields"]) == EXPECTED_FIELDS[conn_type]
        assert {name for name, f in seen["fields"].items() if f["sensitive"]} == (
            {"client_secret"} if conn_type == "mongodb_atlas" else set())
        assert {f["package"] for f in seen["fields"].values()} == {PACKAGE_NAME}
        assert seen["behaviour"]["hidden_fields"] == FIELD_BEHAVIOURS[conn_type]["hidden_fields"]
        assert seen["behaviour"]["relabeling"] == FIELD_BEHAVIOURS[conn_type]["relabeling"]
    assert found["triggers"] == ["atlas_migration.triggers.live_migration", "atlas_migration.triggers.mongosync"]
