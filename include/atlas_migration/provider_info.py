"""Provider metadata: what this package registers with Airflow when it is installed.

Airflow's ``ProvidersManager`` finds installed distributions through the ``apache_airflow_provider`` entry
point (``pyproject.toml``: ``provider_info = "atlas_migration.provider_info:get_provider_info"``), calls
``get_provider_info()`` in every component (api-server, scheduler, workers, triggerer) and validates the
dict against ``airflow/provider_info.schema.json``. With it, Admin > Connections offers the three
connection types of the hooks below with their own forms.

Cheap on purpose: it imports only ``connection_forms`` (plain data). The hook and trigger modules are named,
not imported; Airflow imports a hook only when a connection of its type is used or tested.

``package-name`` must be the distribution's name (Airflow compares the two) and must not start with
``apache-airflow``: Airflow requires class paths under ``airflow.providers.`` from packages named so.
There are no ``extra-links``: the project has no ``BaseOperatorLink``.
"""

from __future__ import annotations

from typing import Any

from atlas_migration import __version__
from atlas_migration.connection_forms import provider_connection_types

PACKAGE_NAME = "mongo-to-atlas"

# Integration names tie the hooks and triggers sections to the integrations listed.
ATLAS_INTEGRATION = "MongoDB Atlas"
CLOUD_MANAGER_INTEGRATION = "MongoDB Cloud Manager"
MONGOSYNC_INTEGRATION = "mongosync"


def get_provider_info() -> dict[str, Any]:
    """The provider info dict (``airflow/provider_info.schema.json``)."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "MongoDB to Atlas migration",
        # Plain text: `airflow providers list` renders underscores and backquotes as markup.
        "description": "Migrates MongoDB deployments into MongoDB Atlas: hooks for the Atlas Administration API, "
                       "the Cloud Manager API and mongosync, and the triggers that wait on live migrations.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": ATLAS_INTEGRATION, "external-doc-url":
                "https://www.mongodb.com/docs/atlas/reference/api-resources-spec/v2/", "tags": ["service"]},
            {"integration-name": CLOUD_MANAGER_INTEGRATION, "external-doc-url":
                "https://www.mongodb.com/docs/cloud-manager/reference/api/", "tags": ["service"]},
            {"integration-name": MONGOSYNC_INTEGRATION, "external-doc-url":
                "https://www.mongodb.com/docs/cluster-to-cluster-sync/current/reference/api/", "tags": ["software"]},
        ],
        "hooks": [
            # AtlasAdminHook and CloudManagerHook share one module.
            {"integration-name": ATLAS_INTEGRATION, "python-modules": ["atlas_migration.hooks.atlas"]},
            {"integration-name": CLOUD_MANAGER_INTEGRATION, "python-modules": ["atlas_migration.hooks.atlas"]},
            {"integration-name": MONGOSYNC_INTEGRATION, "python-modules": ["atlas_migration.hooks.mongosync"]},
        ],
        "triggers": [
            # LiveMigrationTrigger polls an Atlas live migration (push).
            {"integration-name": ATLAS_INTEGRATION, "python-modules": ["atlas_migration.triggers.live_migration"]},
            # MongosyncProgressTrigger polls mongosync's /progress.
            {"integration-name": MONGOSYNC_INTEGRATION, "python-modules": ["atlas_migration.triggers.mongosync"]},
        ],
        "connection-types": provider_connection_types(),
    }
