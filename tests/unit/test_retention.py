"""Retention (issue 20): finished rows older than an age are deleted with what is tied to
them, in bounded batches that never hold up a claim; through both transports, the
`prune` command, the bridge's own timer, and the statement a pg_cron job runs."""

from __future__ import annotations

from datetime import timedelta

from bridge.retention import describe_age

DAYS_30 = timedelta(days=30)






































def test_ages_are_described_in_words() -> None:
    assert [describe_age(t) for t in (DAYS_30, timedelta(days=1), timedelta(hours=36),
                                      timedelta(minutes=90), timedelta(seconds=45.5))] == [
        "30 days", "1 day", "36 hours", "90 minutes", "45.5 seconds"]




