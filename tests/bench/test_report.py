"""The benchmark's targets: how each value is picked from the figures (pure, no servers)."""

from __future__ import annotations

from bench.report import Figure, evaluate_targets


def _steady(writer_ops_per_s: float, lag_p95_s: float) -> Figure:
    figure = Figure(key="live.steady", group="live", label="live: steady state")
    figure.status = "ok"
    figure.details = {"writer_ops_per_s": writer_ops_per_s, "lag_p95_s": lag_p95_s}
    return figure


def _lag_target(figures: list[Figure]):
    return next(t for t in evaluate_targets(figures) if t.key == "target.steady_lag")


def test_the_lag_target_counts_only_at_the_rate_it_is_set_at():
    assert _lag_target([_steady(990.0, 1.0)]).status == "PASS"
    missed = _lag_target([_steady(1_010.0, 7.0)])
    assert (missed.status, missed.value) == ("MISS", 7.0)
    slow = _lag_target([_steady(200.0, 0.0)])
    assert slow.status == "n/a" and "writer at 200 ops/s" in slow.source


def test_targets_without_their_figures_are_not_measured():
    assert {t.key: t.status for t in evaluate_targets([])} == {
        key: "n/a" for key in ("target.copy", "target.dump", "target.validation", "target.verify", "target.memory",
                               "target.live_copy", "target.catch_up", "target.steady_lag")}
