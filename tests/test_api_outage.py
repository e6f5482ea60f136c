"""The outage rule of the live-push watchers (``atlas_migration.api_outage``): which failures are transient,
when to retry and how long to wait, when to give up, and the blocking helper with a fake clock."""

from __future__ import annotations

import logging

import pytest

from atlas_migration.api_outage import (
    Outage,
    OutagePolicy,
    WatchInterrupted,
    call_through_outage,
    is_transient,
    next_step,
)
from atlas_migration.errors import ConfigurationError
from atlas_migration.hooks.atlas import AtlasApiError

POLICY = OutagePolicy(tolerance_seconds=900, first_delay=2, max_delay=60)


@pytest.mark.parametrize("exc, transient", [
    (AtlasApiError("cannot reach Atlas: ConnectionError", status=None), True),
    (AtlasApiError("read timeout", status=None, never_sent=False), True),
    (AtlasApiError("HTTP 429", status=429, retry_after=5), True),
    (AtlasApiError("HTTP 500", status=500), True),
    (AtlasApiError("HTTP 502", status=502), True),
    (AtlasApiError("HTTP 503", status=503), True),
    (AtlasApiError("HTTP 401", status=401), False),
    (AtlasApiError("HTTP 403", status=403), False),
    (AtlasApiError("HTTP 404", status=404), False),
    (AtlasApiError("HTTP 400", status=400), False),
    (AtlasApiError("HTTP 200 with a body that is not JSON", status=200), False),  # a contract error
    (ConfigurationError("connection 'atlas_api' is not defined"), False),
    (ValueError("a bug"), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def step(outage=None, *, transient=True, started=1000.0, now=1000.5, policy=POLICY, retry_after=None):
    return next_step(outage, error="HTTP 503 SERVICE_UNAVAILABLE", transient=transient, call_started=started,
                     now=now, policy=policy, what="the Atlas API", retry_after=retry_after)


def test_first_failure_starts_the_outage_and_retries_soon():
    first = step()
    assert first.retry and first.delay == 2
    assert first.outage == Outage(since=1000.0, failures=1)
    assert "the Atlas API failed: HTTP 503 SERVICE_UNAVAILABLE" in first.message
    assert "failing for 0 s (1 attempt)" in first.message and "retrying in 2 s" in first.message
    assert "giving up after 15 min 00 s" in first.message


def test_delays_double_up_to_the_cap_and_the_outage_keeps_its_start():
    outage, delays = None, []
    now = 1000.0
    for _ in range(8):
        s = step(outage, started=now, now=now)
        delays.append(s.delay)
        outage = s.outage
        now += s.delay
    assert delays == [2, 4, 8, 16, 32, 60, 60, 60]
    assert outage.since == 1000.0 and outage.failures == 8
    assert "failing for 3 min 02 s (8 attempts)" in s.message  # 2+4+8+16+32+60+60 s before the eighth


def test_retry_after_is_honoured_and_no_wait_reaches_past_the_bound():
    assert step(retry_after=45).delay == 45
    late = step(Outage(since=100.0, failures=3), started=990, now=995, policy=OutagePolicy(tolerance_seconds=900))
    assert late.retry and late.delay == 5  # 895 s gone: the last try lands on the bound, not 16 s later
    assert step(Outage(since=100.0, failures=3), now=995, retry_after=120).delay == 5


def test_gives_up_past_the_tolerance_with_what_failed_and_how_long():
    gave_up = step(Outage(since=0.0, failures=20), now=901.0)
    assert not gave_up.retry
    assert gave_up.message.startswith("the Atlas API has failed for 15 min 01 s (21 attempts), longer than "
                                      "api_outage_tolerance_seconds (15 min 00 s); last error: HTTP 503")


def test_a_failure_that_retrying_cannot_mend_ends_at_once():
    result = step(transient=False)
    assert not result.retry and "not a transient failure" in result.message


def test_zero_tolerance_means_no_outer_retry():
    assert not step(policy=OutagePolicy(tolerance_seconds=0)).retry


class FakeTime:
    def __init__(self) -> None:
        self.now = 5000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_call_through_outage_recovers_and_logs_each_retry(caplog):
    fake = FakeTime()
    answers: list = [AtlasApiError("HTTP 503", status=503), AtlasApiError("cannot reach", status=None),
                     {"status": "WORKING"}]

    def call():
        fake.now += 1  # each call takes a second
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with caplog.at_level(logging.INFO, logger="test-outage"):
        result = call_through_outage(call, policy=POLICY, what="the Atlas API", still_running="still running",
                                     log=logging.getLogger("test-outage"), clock=fake.clock, sleep=fake.sleep)
    assert result == {"status": "WORKING"} and fake.slept == [2, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "HTTP 503" in warnings[0] and "cannot reach" in warnings[1]
    assert "failing for 4 s (2 attempts)" in warnings[1]  # 1 s call + 2 s wait + 1 s call
    assert any("the Atlas API answers again after 9 s (2 failed attempts)" in r.getMessage() for r in caplog.records)


def test_call_through_outage_gives_up_at_the_bound_with_the_way_out():
    fake = FakeTime()
    calls = []

    def call():
        calls.append(fake.now)
        raise AtlasApiError("HTTP 503 SERVICE_UNAVAILABLE", status=503)

    with pytest.raises(WatchInterrupted) as stopped:
        call_through_outage(call, policy=OutagePolicy(tolerance_seconds=100), what="the Atlas API",
                            still_running="The migration is still running in Atlas; clear the task",
                            log=logging.getLogger("test-outage"), clock=fake.clock, sleep=fake.sleep)
    assert fake.now - 5000.0 == 100  # 2+4+8+16+32+38: the last wait stops at the bound
    assert len(calls) == 7
    assert "longer than api_outage_tolerance_seconds (1 min 40 s)" in str(stopped.value)
    assert str(stopped.value).endswith("The migration is still running in Atlas; clear the task")


def test_call_through_outage_does_not_retry_a_404():
    calls = []

    def call():
        calls.append(1)
        raise AtlasApiError("HTTP 404 RESOURCE_NOT_FOUND", status=404)

    with pytest.raises(WatchInterrupted, match="HTTP 404 RESOURCE_NOT_FOUND .*not a transient failure"):
        call_through_outage(call, policy=POLICY, what="the Atlas API", still_running="x",
                            log=logging.getLogger("test-outage"), sleep=lambda s: pytest.fail("slept"))
    assert calls == [1]
