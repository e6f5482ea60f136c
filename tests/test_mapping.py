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


def test_max_parallel_copies_bounds_the_task_instances_and_says_why(monkeypatch, caplog) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "16")
    with caplog.at_level(logging.INFO, logger="atlas_migration"):
        batches = batches_for_mapping(list(range(10)), "collections", max_parallel=3)
    assert batches == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # every item once, largest-first lists dealt round
    assert "10 collections exceed max_parallel_copies=3: 3 mapped task instances of 3-4 collections each" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atlas_migration"):
        # A bound above Airflow's own limit changes nothing, and the log names the limit that applied.
        assert len(batches_for_mapping(list(range(40)), "partitions", max_parallel=100)) == 16
        assert batches_for_mapping([1, 2], "partitions", max_parallel=3) == [[1], [2]]
    assert "exceed Airflow's max_map_length (16)" in caplog.text and "max_parallel_copies" not in caplog.text


def test_max_parallel_copies_is_read_from_the_run_params() -> None:
    from atlas_migration.errors import ConfigurationError
    from atlas_migration.mapping import max_parallel_copies

    assert max_parallel_copies({}) == 0
    assert max_parallel_copies({"max_parallel_copies": 4}) == 4
    for bad in (-1, 1025, "4", True):
        with pytest.raises(ConfigurationError, match="max_parallel_copies must be an integer from 0 to 1024"):
            max_parallel_copies({"max_parallel_copies": bad})
