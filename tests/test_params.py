"""MigrationParams.parse and the trigger-form definitions."""

import pytest

from atlas_migration.dag_params import JSON_SCHEMA_DRAFT, dag_params, rehearsal_params
from atlas_migration.errors import ConfigurationError
from atlas_migration.params import MigrationParams


def defaults() -> dict:
    return {name: param.value for name, param in dag_params().items()}


def test_defaults_parse(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATION_WORK_DIR", str(tmp_path))
    p = MigrationParams.parse(defaults())
    assert (p.source_conn_id, p.target_conn_id, p.strategy) == ("mongo_source", "atlas_target", "auto")
    assert p.work_dir == tmp_path and not p.dry_run and not p.drop_target
    assert p.namespaces.include == () and p.validation_mode == "counts"


def test_every_param_explains_itself():
    for name, param in dag_params().items():
        schema = param.schema
        assert schema.get("type"), name
        assert schema.get("section"), name
        assert schema.get("title") and param.description, name
        assert param.value is not None, name  # a scheduled DAG may not have a required param without a default


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"strategy": "sideways"}, "strategy='sideways'"),
        ({"include_namespaces": ["shop"]}, "namespace pattern 'shop'"),
        ({"exclude_namespaces": "not-a-namespace"}, "namespace pattern"),
        ({"restore_workers": 0}, "restore_workers"),
        ({"batch_size": "many"}, "batch_size"),
        ({"staging_s3_uri": "https://bucket/x"}, "staging_s3_uri"),
        ({"source_conn_id": ""}, "must name Airflow connections"),
        ({"target_conn_id": "mongo_source"}, "same connection"),
        ({"validation_mode": "vibes"}, "validation_mode"),
    ],
)
def test_bad_values_are_refused(override, fragment):
    with pytest.raises(ConfigurationError) as excinfo:
        MigrationParams.parse({**defaults(), **override})
    assert fragment in str(excinfo.value)


def test_single_pattern_string_is_accepted():
    p = MigrationParams.parse({**defaults(), "include_namespaces": "shop.*"})
    assert p.namespaces.include == ("shop.*",)


@pytest.mark.parametrize("builder", [dag_params, rehearsal_params])
def test_every_param_schema_is_a_valid_draft_07_schema(builder):
    """Each Param names draft-07 (cheap for Airflow to check at every serialization), so each schema must be
    one: a keyword that only a later draft knows would be ignored silently, not enforced."""
    from jsonschema import Draft7Validator

    later_drafts_only = {"prefixItems", "$defs", "dependentRequired", "dependentSchemas", "unevaluatedItems",
                         "unevaluatedProperties", "minContains", "maxContains", "$dynamicRef", "$anchor"}
    for name, param in builder().items():
        assert param.schema["$schema"] == JSON_SCHEMA_DRAFT, name
        Draft7Validator.check_schema(param.schema)
        assert not later_drafts_only & set(param.schema), name
        assert param.resolve() == param.value  # each default is valid under its own schema
