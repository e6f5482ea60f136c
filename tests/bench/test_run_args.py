"""The benchmark's command line: options reach the configuration, bad values stop before any server starts."""

from __future__ import annotations

import pytest

from bench.run import parse_args


def test_import_formats_default_to_both_and_take_a_subset() -> None:
    assert parse_args([]).import_formats == ("csv", "json")
    assert parse_args(["--import-formats", "csv"]).import_formats == ("csv",)
    assert parse_args(["--import-formats", "json, csv"]).import_formats == ("json", "csv")


@pytest.mark.parametrize("value", ["xml", "csv,tsv", ","])
def test_unknown_import_formats_are_refused(value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--import-formats", value])
    assert "--import-formats takes a comma-separated subset of csv, json" in capsys.readouterr().err
