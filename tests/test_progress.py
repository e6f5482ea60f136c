"""Progress lines: throttled, with counts, rate and ETA."""

import logging

from atlas_migration.progress import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_logs_at_most_once_per_interval_with_rate_and_eta(caplog):
    clock = FakeClock()
    log = logging.getLogger("test.progress")
    progress = Progress("dump shop.orders", 1000, log, interval=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        clock.now += 5
        progress.add(100, 50_000)  # under the interval: silent
        assert caplog.records == []
        clock.now += 5
        progress.add(100, 50_000)
        assert len(caplog.records) == 1
        line = caplog.records[0].getMessage()
        assert line == "dump shop.orders: 200/1,000 docs (20%), 20 docs/s, 0.1 MB in 10s, ETA 40s"
        clock.now += 1
        progress.add(800, 0)
        assert len(caplog.records) == 1
        assert progress.finish().endswith("1,000/1,000 docs (100%), 91 docs/s, 0.1 MB in 11s (done)")


def test_unknown_total_has_no_eta():
    clock = FakeClock()
    progress = Progress("restore x.y", None, logging.getLogger("t"), clock=clock)
    clock.now += 3725
    progress.add(10)
    assert progress.line() == "restore x.y: 10 docs, 0 docs/s, 0.0 MB in 1h02m"
