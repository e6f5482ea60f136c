"""The connection forms of the three connection types this package registers with Airflow.

One plain-data description per connection type (``mongodb_atlas``, ``mongodb_cloud_manager``,
``mongosync``) feeds both ways Airflow learns about a form, so the two can never disagree:

- ``provider_connection_types()``: the declarative ``conn-fields`` / ``ui-field-behaviour`` entries of
  ``get_provider_info()``. Airflow 3.2+ builds the connection form (``GET /ui/connections/hook_meta``) from
  these alone, without importing the hooks; when they are present it skips the hooks' methods below;
- ``form_widgets(conn_type)`` / ``field_behaviour(conn_type)``: what the hooks'
  ``get_connection_form_widgets()`` / ``get_ui_field_behaviour()`` return, for Airflow releases (and tools)
  that still ask the hook classes. ``form_widgets`` imports wtforms and Flask-AppBuilder inside the
  function, as the official providers do: neither is installed with Airflow 3 core, and nothing here may
  cost an import at DAG-parse time.

Airflow 3's React UI stores each extra field under its plain name (``org_id``); the Airflow 2 form stored
``extra__<conn_type>__org_id``. ``read_extra`` reads either, and the hooks read every extra through it.

Only fields a hook reads are listed; this module imports nothing from the project or third parties so that
``provider_info`` (loaded by every Airflow component at provider discovery) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATLAS_CONN_TYPE = "mongodb_atlas"
CLOUD_MANAGER_CONN_TYPE = "mongodb_cloud_manager"
MONGOSYNC_CONN_TYPE = "mongosync"

# Hook class paths as the provider info names them (the hooks' modules are imported only when used).
HOOK_CLASSES: dict[str, str] = {
    ATLAS_CONN_TYPE: "atlas_migration.hooks.atlas.AtlasAdminHook",
    CLOUD_MANAGER_CONN_TYPE: "atlas_migration.hooks.atlas.CloudManagerHook",
    MONGOSYNC_CONN_TYPE: "atlas_migration.hooks.mongosync.MongosyncHook",
}
HOOK_NAMES: dict[str, str] = {
    ATLAS_CONN_TYPE: "MongoDB Atlas Administration API",
    CLOUD_MANAGER_CONN_TYPE: "MongoDB Cloud Manager API",
    MONGOSYNC_CONN_TYPE: "mongosync",
}

DEFAULT_CLOUD_BASE_URL = "https://cloud.mongodb.com"
MONGOSYNC_DEFAULT_PORT = 27182
# mongosync's --enableUserWriteBlocking values (1.20+ startup configuration); the mongosync hook checks them too.
WRITE_BLOCKING_VALUES = ("sourceAndDestination", "destinationOnly", "none")


@dataclass(frozen=True)
class ExtraField:
    """One extra field of a connection form, stored in the connection's extras under ``name``."""

    name: str
    label: str
    description: str
    secret: bool = False  # a password widget, and masked by Airflow (``is_sensitive``)
    choices: tuple[str, ...] = ()  # a closed list (rendered as a select); empty means free text

    def json_schema(self) -> dict[str, Any]:
        """The field's JSON schema as ``conn-fields`` declares it (every extra is optional: null allowed)."""
        schema: dict[str, Any] = {"type": ["string", "null"]}
        if self.secret:
            schema["format"] = "password"
        if self.choices:
            # None in the enum keeps an empty field valid, as Airflow's Param documentation prescribes.
            schema["enum"] = [*self.choices, None]
        return schema


_ORG_ID_HELP = "24 hexadecimal characters; shown in the organization's settings"

EXTRA_FIELDS: dict[str, tuple[ExtraField, ...]] = {
    ATLAS_CONN_TYPE: (
        ExtraField("org_id", "Organization ID",
                   f"Atlas organization of the live-migration link-token and available projects ({_ORG_ID_HELP})"),
        ExtraField("project_id", "Project ID",
                   "Destination Atlas project (group): clusters, live migrations, peering, access list "
                   "(24 hexadecimal characters)"),
        ExtraField("client_id", "Service account client ID",
                   "Service account (OAuth 2.0 client credentials) instead of an API key pair: leave the "
                   "public and private key empty; e.g. mdb_sa_id_..."),
        ExtraField("client_secret", "Service account client secret",
                   "Secret of the service account above (mdb_sa_sk_...)", secret=True),
    ),
    CLOUD_MANAGER_CONN_TYPE: (
        ExtraField("org_id", "Organization ID",
                   f"Cloud Manager organization of the source deployment ({_ORG_ID_HELP})"),
    ),
    MONGOSYNC_CONN_TYPE: (
        ExtraField("version", "mongosync release",
                   "Release of the mongosync process, e.g. 1.22 (its API has no version endpoint; without "
                   "this it is inferred from /progress, which cannot tell 1.19 from 1.20)"),
        ExtraField("write_blocking", "Write blocking (1.20+)",
                   "The --enableUserWriteBlocking value mongosync was started with (1.20 and later; "
                   "default destinationOnly). Leave empty for releases up to 1.19",
                   choices=WRITE_BLOCKING_VALUES),
    ),
}

# Standard fields: hidden when the hook never reads them (or when the base URL already carries them),
# relabelled to say what they hold. Placeholders of extra fields use Airflow's ``extra__<type>__`` keys,
# which Airflow adds itself (``_ensure_prefix_for_placeholders``); plain names here.
FIELD_BEHAVIOURS: dict[str, dict[str, Any]] = {
    ATLAS_CONN_TYPE: {
        # The base URL carries scheme and port (https://cloud.mongodb.com); schema is never read.
        "hidden_fields": ["schema", "port"],
        "relabeling": {"host": "Base URL", "login": "Public API key", "password": "Private API key"},
        "placeholders": {
            "host": DEFAULT_CLOUD_BASE_URL,
            "login": "public key (HTTP Digest); empty when using a service account",
            "password": "private key",
            "org_id": "5f1d7f3a2b4c6d8e0f1a2b3c",
            "project_id": "32b6e34b3d91647abb20e7b8",
        },
    },
    CLOUD_MANAGER_CONN_TYPE: {
        "hidden_fields": ["schema", "port"],
        "relabeling": {"host": "Base URL", "login": "Public API key", "password": "Private API key"},
        "placeholders": {"host": DEFAULT_CLOUD_BASE_URL, "login": "public key (HTTP Digest)",
                         "password": "private key", "org_id": "5f1d7f3a2b4c6d8e0f1a2b3c"},
    },
    MONGOSYNC_CONN_TYPE: {
        # mongosync's API has no authentication: the hook never reads login or password.
        "hidden_fields": ["login", "password"],
        "relabeling": {"host": "Host (or base URL)", "schema": "Scheme (http or https)"},
        "placeholders": {"host": "mongosync-host", "port": str(MONGOSYNC_DEFAULT_PORT), "schema": "http",
                         "version": "1.22"},
    },
}


def read_extra(extras: dict[str, Any], conn_type: str, name: str) -> Any:
    """An extra as Airflow 3's form stores it (``name``) or as Airflow 2's did (``extra__<type>__name``);
    empty strings count as unset (a cleared form field is stored as ``""``)."""
    value = extras.get(name)
    if value in (None, ""):
        value = extras.get(f"extra__{conn_type}__{name}")
    return None if value in (None, "") else value


def field_behaviour(conn_type: str) -> dict[str, Any]:
    """``get_ui_field_behaviour()`` of the hook of ``conn_type`` (a copy: callers may not alter ours)."""
    behaviour = FIELD_BEHAVIOURS[conn_type]
    return {key: (list(value) if isinstance(value, list) else dict(value)) for key, value in behaviour.items()}


def form_widgets(conn_type: str) -> dict[str, Any]:
    """``get_connection_form_widgets()`` of the hook of ``conn_type``: wtforms fields (imported here, lazily:
    only the Airflow 2 / Flask-AppBuilder UI has them)."""
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import PasswordField, StringField
    from wtforms.validators import AnyOf, Optional

    widgets: dict[str, Any] = {}
    for extra in EXTRA_FIELDS[conn_type]:
        if extra.secret:
            widgets[extra.name] = PasswordField(lazy_gettext(extra.label), widget=BS3PasswordFieldWidget(),
                                                description=extra.description)
        else:
            validators = [Optional(), AnyOf(list(extra.choices))] if extra.choices else []
            widgets[extra.name] = StringField(lazy_gettext(extra.label), widget=BS3TextFieldWidget(),
                                              validators=validators, description=extra.description)
    return widgets


def provider_connection_types() -> list[dict[str, Any]]:
    """The ``connection-types`` list of ``get_provider_info()``, with the declarative form of each type."""
    entries = []
    for conn_type, hook_class in HOOK_CLASSES.items():
        behaviour = FIELD_BEHAVIOURS[conn_type]
        entries.append({
            "connection-type": conn_type,
            "hook-class-name": hook_class,
            "hook-name": HOOK_NAMES[conn_type],
            "conn-fields": {
                extra.name: {"label": extra.label, "description": extra.description, "schema": extra.json_schema()}
                for extra in EXTRA_FIELDS[conn_type]
            },
            # provider info spells the keys in kebab case; Airflow converts them back.
            "ui-field-behaviour": {
                "hidden-fields": list(behaviour["hidden_fields"]),
                "relabeling": dict(behaviour["relabeling"]),
                "placeholders": dict(behaviour["placeholders"]),
            },
        })
    return entries
