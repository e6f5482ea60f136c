"""MongoDB Database Tools: config file, argv builders, the runner, and interop with the native engine."""

from __future__ import annotations

import logging
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from atlas_migration.engines import mongotools
from atlas_migration.engines.mongotools import (
    escape_namespace_pattern,
    mongodump_argv,
    mongorestore_argv,
    run_tool,
    tool_config_file,
    tools_available,
)
from atlas_migration.errors import ConfigurationError, ToolFailed
from atlas_migration.namespaces import NamespaceFilter

PASSWORD = 's3cr3t"pa\\ss:w@rd#'
URI = "mongodb://migrator:s3cr3t%22pa%5Css%3Aw%40rd%23@db1.example.com:27017/?authSource=admin&tls=true"
needs_tools = pytest.mark.skipif(
    not tools_available(), reason="mongodump/mongorestore (MongoDB Database Tools) are not on PATH"
)


# ------------------------------------------------------------------------------------------- config file
def test_config_file_is_private_holds_the_uri_and_is_removed(tmp_path):
    with tool_config_file(URI, directory=tmp_path) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert yaml.safe_load(path.read_text()) == {"uri": URI}
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_config_file_is_removed_when_the_tool_fails(tmp_path):
    with pytest.raises(RuntimeError), tool_config_file(URI, directory=tmp_path) as path:
        raise RuntimeError("tool crashed")
    assert not path.exists()


@pytest.mark.parametrize(
    "uri",
    [
        'mongodb://u:p"a\\ss@h/',  # quote and backslash
        "mongodb://u:p'#: {x} [y] &*!|>%@h/?a=b",  # YAML indicators that break a plain scalar
        "mongodb://u:tab\there\nnewline\x7fdel@h/",  # control characters
        "mongodb://ü:пароль✓\u2028@h/",  # non-ASCII and a YAML line separator
        "mongodb://u:\\u0041not-an-escape@h/",  # a literal backslash-u sequence
    ],
)
def test_config_file_quotes_odd_passwords(tmp_path, uri):
    with tool_config_file(uri, directory=tmp_path) as path:
        text = path.read_text(encoding="utf-8")
        assert text.count("\n") == 1  # a single line, whatever the password holds
        assert yaml.safe_load(text) == {"uri": uri}


def test_config_file_requires_a_uri():
    with pytest.raises(ConfigurationError), tool_config_file(""):
        pass


# ---------------------------------------------------------------------------------------------------- argv
def test_mongodump_argv_has_no_secret(tmp_path):
    with tool_config_file(URI, directory=tmp_path) as config:
        argv = mongodump_argv(config, tmp_path / "dump", "analytics", "daily.rollups")
    assert argv == [
        "mongodump", f"--config={config}", f"--out={tmp_path / 'dump'}", "--db=analytics",
        "--collection=daily.rollups", "--gzip",
    ]
    joined = " ".join(argv)
    assert "s3cr3t" not in joined and "migrator" not in joined and "mongodb://" not in joined


def test_mongodump_argv_without_gzip_and_with_extra_arguments():
    argv = mongodump_argv("/c.yaml", "/out", "shop", "orders", gzip=False, extra=["--numParallelCollections=2"])
    assert argv[-1] == "--numParallelCollections=2" and "--gzip" not in argv


def test_mongorestore_argv_restores_exactly_the_given_namespaces():
    argv = mongorestore_argv("/c.yaml", "/dump", ["shop.orders", ("shop", "daily.rollups")], drop=True, workers=4)
    assert argv == [
        "mongorestore", "--config=/c.yaml", "--dir=/dump", "--nsInclude=shop.orders",
        "--nsInclude=shop.daily.rollups", "--numInsertionWorkersPerCollection=4", "--gzip", "--drop",
        "--bypassDocumentValidation", "--stopOnError",
    ]


def test_mongorestore_argv_without_drop_or_gzip():
    argv = mongorestore_argv("/c.yaml", "/dump", ["shop.orders"], drop=False, gzip=False,
                             bypass_document_validation=False, stop_on_error=False)
    assert argv == [
        "mongorestore", "--config=/c.yaml", "--dir=/dump", "--nsInclude=shop.orders",
        "--numInsertionWorkersPerCollection=1",
    ]


@pytest.mark.parametrize(
    ("coll", "pattern"),
    [("a*b", "shop.a\\*b"), ("back\\slash", "shop.back\\\\slash"), ("star\\*", "shop.star\\\\\\*")],
)
def test_literal_namespaces_are_escaped_for_ns_include(coll, pattern):
    argv = mongorestore_argv("/c.yaml", "/dump", [("shop", coll)], drop=False)
    assert f"--nsInclude={pattern}" in argv
    # The escaped pattern selects that namespace and nothing else (mongorestore's pattern semantics).
    selected = NamespaceFilter.from_patterns([pattern], None)
    assert selected.matches("shop", coll)
    assert not selected.matches("shop", coll.replace("*", "X").replace("\\", "Y") + "Z")
    assert not selected.matches("shop", "aXb")


def test_escape_namespace_pattern():
    assert escape_namespace_pattern("plain.name") == "plain.name"
    assert escape_namespace_pattern("a*\\") == "a\\*\\\\"


def test_mongorestore_argv_renames_into_the_target_database():
    argv = mongorestore_argv("/c.yaml", "/dump", ["analytics.daily.rollups", "analytics.sessions"], drop=True,
                             target_db="rehearsal_analytics")
    assert argv[3:7] == [
        "--nsInclude=analytics.daily.rollups", "--nsInclude=analytics.sessions",
        "--nsFrom=analytics.*", "--nsTo=rehearsal_analytics.*",
    ]
    same = mongorestore_argv("/c.yaml", "/dump", ["analytics.sessions"], drop=True, target_db="analytics")
    assert not any(a.startswith(("--nsFrom", "--nsTo")) for a in same)


def test_mongorestore_refuses_to_merge_databases_into_one_target():
    with pytest.raises(ConfigurationError, match="would merge databases"):
        mongorestore_argv("/c.yaml", "/dump", ["a.x", "b.y"], drop=True, target_db="rehearsal")


@pytest.mark.parametrize("target_db", ["admin", "local", "config", "a.b"])
def test_mongorestore_refuses_system_target_databases(target_db):
    with pytest.raises(ConfigurationError, match="cannot be a target database"):
        mongorestore_argv("/c.yaml", "/dump", ["shop.orders"], drop=True, target_db=target_db)


@pytest.mark.parametrize("namespace", ["admin.system.users", "local.oplog.rs", "config.chunks", "shop.system.js"])
def test_builders_refuse_system_namespaces(namespace):
    db, coll = namespace.split(".", 1)
    with pytest.raises(ConfigurationError, match="never migrated"):
        mongodump_argv("/c.yaml", "/out", db, coll)
    with pytest.raises(ConfigurationError, match="never migrated"):
        mongorestore_argv("/c.yaml", "/dump", [namespace], drop=False)


@pytest.mark.parametrize(
    "flag",
    ["--restoreDbUsersAndRoles", "--oplogReplay", "--oplog", "--password=hunter2", "-p", f"--uri={URI}"],
)
def test_builders_never_pass_forbidden_flags(flag):
    with pytest.raises(ConfigurationError, match="not allowed"):
        mongorestore_argv("/c.yaml", "/dump", ["shop.orders"], drop=False, extra=[flag])
    with pytest.raises(ConfigurationError, match="not allowed"):
        mongodump_argv("/c.yaml", "/out", "shop", "orders", extra=[flag])


def test_builders_reject_malformed_input():
    with pytest.raises(ConfigurationError, match="at least one namespace"):
        mongorestore_argv("/c.yaml", "/dump", [], drop=False)
    with pytest.raises(ConfigurationError, match="not a namespace"):
        mongorestore_argv("/c.yaml", "/dump", ["orders"], drop=False)
    with pytest.raises(ConfigurationError, match=r"contains '\$'"):
        mongorestore_argv("/c.yaml", "/dump", ["shop.a$b"], drop=False)
    with pytest.raises(ConfigurationError, match="workers"):
        mongorestore_argv("/c.yaml", "/dump", ["shop.orders"], drop=False, workers=0)


def test_tools_available_needs_both_binaries(tmp_path, monkeypatch):
    for name in ("mongodump", "mongorestore"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tools_available()
    (tmp_path / "mongorestore").unlink()
    assert not tools_available()


# -------------------------------------------------------------------------------------------------- runner
def _fake_tool(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_tool.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_run_tool_failure_raises_with_redacted_output(tmp_path, caplog):
    argv = _fake_tool(tmp_path, f"""
        import sys
        print("2026-01-01T00:00:00.000+0000\\twriting shop.orders to dump/shop/orders.bson.gz", file=sys.stderr)
        print("connecting to {URI}", file=sys.stderr, flush=True)
        print("server said: password={PASSWORD[:6]}XYZ is wrong", flush=True)
        print("the password is " + {PASSWORD!r}, file=sys.stderr)
        sys.exit(3)
    """)
    log = logging.getLogger("test.mongotools")
    with caplog.at_level(logging.INFO, logger="test.mongotools"), pytest.raises(ToolFailed) as info:
        run_tool(argv, secrets=[PASSWORD], log=log)
    message = str(info.value)
    assert f"{Path(sys.executable).name} exited with code 3" in message
    assert "writing shop.orders" in message
    assert "mongodb://migrator:***@db1.example.com" in message
    assert "the password is ***" in message
    for text in (message, caplog.text):
        assert "s3cr3t" not in text and "pa%5Css" not in text
    assert "writing shop.orders" in caplog.text  # lines are streamed to the log as they come


def test_run_tool_success_returns_the_tail_and_restore_summary(tmp_path, caplog):
    argv = _fake_tool(tmp_path, """
        import sys
        for i in range(100):
            print(f"progress line {i}", file=sys.stderr)
        print("42 document(s) restored successfully. 0 document(s) failed to restore.", file=sys.stderr)
    """)
    with caplog.at_level(logging.INFO):
        result = run_tool(argv, secrets=[], log=logging.getLogger("test.mongotools"), tail_lines=5)
    assert result.returncode == 0
    assert result.output_tail == [f"progress line {i}" for i in range(96, 100)] + [
        "42 document(s) restored successfully. 0 document(s) failed to restore."
    ]
    assert (result.documents_restored, result.documents_failed) == (42, 0)
    assert result.to_dict()["argv"] == argv
    assert "progress line 0" in caplog.text


def test_run_tool_fails_when_documents_failed_despite_exit_zero(tmp_path):
    argv = _fake_tool(tmp_path, """
        import sys
        print("40 document(s) restored successfully. 2 document(s) failed to restore.", file=sys.stderr)
    """)
    with pytest.raises(ToolFailed, match=r"failed to restore 2 document\(s\)"):
        run_tool(argv, secrets=[], log=logging.getLogger("test.mongotools"))


def test_run_tool_missing_executable(tmp_path):
    with pytest.raises(ToolFailed, match="cannot start mongodump-not-installed"):
        run_tool([str(tmp_path / "mongodump-not-installed")], secrets=[], log=logging.getLogger("test"))


def test_run_tool_never_uses_a_shell(tmp_path, monkeypatch):
    seen = {}
    real_popen = mongotools.subprocess.Popen

    def spy(argv, **kwargs):
        seen.update(kwargs, argv=argv)
        return real_popen(argv, **kwargs)

    monkeypatch.setattr(mongotools.subprocess, "Popen", spy)
    run_tool([sys.executable, "-c", "pass", "; rm -rf /"], secrets=[], log=logging.getLogger("test"))
    assert seen["argv"] == [sys.executable, "-c", "pass", "; rm -rf /"]
    assert not seen.get("shell", False)


# ------------------------------------------------------------------------- interop with the real tools
@needs_tools
@pytest.mark.integration
def test_mongodump_output_is_restored_by_the_native_engine(source, target, tmp_path):
    from atlas_migration.engines.native import restore_collection

    with source.client() as src, target.client() as dst:
        src.shop["daily.rollups"].insert_many([{"_id": i, "v": i} for i in range(100)])
        src.shop["daily.rollups"].create_index("v", unique=True)
        with tool_config_file(source.uri) as config:
            run_tool(mongodump_argv(config, tmp_path, "shop", "daily.rollups"), secrets=[],
                     log=logging.getLogger("test"))
        result = restore_collection(dst, tmp_path, "shop", "daily.rollups")
        assert result.documents == 100
        assert list(dst.shop["daily.rollups"].find().sort("_id", 1)) == list(src.shop["daily.rollups"].find().sort("_id", 1))
        assert "v_1" in [ix["name"] for ix in dst.shop["daily.rollups"].list_indexes()]


@needs_tools
@pytest.mark.integration
def test_native_dump_is_restored_by_mongorestore(source, target, tmp_path):
    from atlas_migration.engines.native import dump_collection

    with source.client() as src, target.client() as dst:
        src.shop.orders.insert_many([{"_id": i, "v": i} for i in range(100)])
        src.shop.orders.create_index("v")
        dump_collection(src, "shop", "orders", tmp_path)
        with tool_config_file(target.uri) as config:
            result = run_tool(
                mongorestore_argv(config, tmp_path, ["shop.orders"], drop=True, target_db="rehearsal_shop"),
                secrets=[], log=logging.getLogger("test"),
            )
        assert result.documents_restored == 100
        assert dst.rehearsal_shop.orders.count_documents({}) == 100
        assert "v_1" in [ix["name"] for ix in dst.rehearsal_shop.orders.list_indexes()]



# Collection names mongodump escapes (QueryEscape) and one it truncates.
ESCAPED_NAMES = ["sp ace", "c++", "x&z:w=v@u", "données", "L" + "é" * 110]


@needs_tools
@pytest.mark.integration
def test_escaped_names_cross_between_the_engine_and_the_real_tools(source, target, tmp_path):
    from atlas_migration.engines.native import dump_collection, restore_collection

    with source.client() as src, target.client() as dst:
        for i, name in enumerate(ESCAPED_NAMES):
            src.peer[name].insert_many([{"_id": j, "n": i} for j in range(3 + i)])
        # The engine's dump, restored by mongorestore: every collection by its own name (not "sp+ace", "c  ").
        for name in ESCAPED_NAMES:
            dump_collection(src, "peer", name, tmp_path / "engine")
        with tool_config_file(target.uri) as config:
            run_tool(mongorestore_argv(config, tmp_path / "engine", [("peer", n) for n in ESCAPED_NAMES], drop=True),
                     secrets=[], log=logging.getLogger("test"))
        assert sorted(dst.peer.list_collection_names()) == sorted(ESCAPED_NAMES)
        assert [dst.peer[n].count_documents({}) for n in ESCAPED_NAMES] == [3, 4, 5, 6, 7]
        dst.drop_database("peer")
        # mongodump's dump, restored by the engine.
        with tool_config_file(source.uri) as config:
            for name in ESCAPED_NAMES:
                run_tool(mongodump_argv(config, tmp_path / "tools", "peer", name), secrets=[],
                         log=logging.getLogger("test"))
        for name in ESCAPED_NAMES:
            assert restore_collection(dst, tmp_path / "tools", "peer", name).target_namespace == f"peer.{name}"
        assert [dst.peer[n].count_documents({}) for n in ESCAPED_NAMES] == [3, 4, 5, 6, 7]
