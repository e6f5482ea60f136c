"""Mapped task lists within Airflow's max_map_length, read from the worker's own configuration."""

from __future__ import annotations

import logging

import pytest

from atlas_migration.mapping import batches_for_mapping, flatten_batches, max_map_length


def test_the_limit_is_airflows_setting(monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW__CORE__MAX_MAP_LENGTH", raising=False)
    assert max_map_length() == 1024  # Airflow's default
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "16")
    assert max_map_length() == 16


def test_batches_follow_the_setting_and_say_so(monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "16")
    with caplog.at_level(logging.INFO, logger="atlas_migration"):
        assert batches_for_mapping(list(range(10)), "partitions") == [[i] for i in range(10)]
        assert "max_map_length" not in caplog.text
        batches = batches_for_mapping(list(range(40)), "partitions")
    assert len(batches) == 16 and sum(map(len, batches)) == 40
    assert "40 partitions exceed Airflow's max_map_length (16): 16 mapped task instances of 2-3 partitions each" \
        in caplog.text


def test_flatten_batches_takes_what_xcom_returns() -> None:
    assert flatten_batches(None) == [] and flatten_batches([]) == []
    assert flatten_batches({"a": 1}) == [{"a": 1}]
    assert flatten_batches([{"a": 1}, None, {"b": 2}]) == [{"a": 1}, {"b": 2}]  # results of unbatched tasks
    assert flatten_batches([[{"a": 1}, {"b": 2}], [], [{"c": 3}]]) == [{"a": 1}, {"b": 2}, {"c": 3}]
