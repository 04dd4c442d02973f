"""Retention (issue 20): the parts that need no server. The SQL side is
tests/sql/test_retention.py."""

from __future__ import annotations

from datetime import timedelta

from bridge.retention import describe_age

DAYS_30 = timedelta(days=30)






































def test_ages_are_described_in_words() -> None:
    assert [describe_age(t) for t in (DAYS_30, timedelta(days=1), timedelta(hours=36),
                                      timedelta(minutes=90), timedelta(seconds=45.5))] == [
        "30 days", "1 day", "36 hours", "90 minutes", "45.5 seconds"]




