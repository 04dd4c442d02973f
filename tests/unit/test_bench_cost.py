"""bench/cost.py's arithmetic: commits per streamed piece, and issue 23's targets; the table of
bench/group_commit.py."""

from __future__ import annotations

from typing import Any

from bench import cost


def run(system: str, pool: str, seconds: float, db: dict[str, float] | None = None,
        **extra: Any) -> dict[str, Any]:
    return {"system": system, "pool": pool, "n": 1000, "seconds": seconds,
            "tasks_per_s": 1000 / seconds, "db": db, **extra}


def db(commits: float, top: float = 2.0, nested: float = 10.0, wal: float = 2500.0
       ) -> dict[str, float]:
    return {"commits_beyond_insert": commits, "wal_commits_beyond_insert": commits - 1,
            "statements_top": top,
            "statements_nested": nested, "wal_bytes": wal}


def test_a_piece_costs_the_streaming_run_minus_the_plain_one() -> None:
    burst = [run("agent-bridge", "p", 2.9, db(2.0)),
             run("agent-bridge", "p", 3.5, db(7.0, 7.0, 25.0, 5000.0), chunks=5)]
    assert cost.chunk_cost(burst) == [5, 1.0, 1.0, 1.0, 3.0, 500.0]


def test_targets_compare_with_the_same_run() -> None:
    burst = [run("agent-bridge", "2 x threads", 2.0, db(1.4)),
             run("plain Celery (no database)", "2 x threads", 1.7),
             run("procrastinate", "1 x async", 5.0, db(4.0))]
    rows = cost.targets({"burst": burst})
    assert [r[2] for r in rows] == ["✅"] * 5  # time; all and write commits, each vs the peer
    assert "1.18×" in rows[0][1]


def test_group_commit_table_has_a_row_per_workload_and_wait() -> None:
    from bench import group_commit

    runs = [{"workload": w, "wait": wait, "seconds": 2.0, "tasks_per_s": 500.0, "commits": 0.5,
             "postgres_ms": 0.4, "worker_ms": 1.5}
            for w in ("no-op", "burst") for wait in ("0", "0.005")]
    text = group_commit.render(runs, [1.6, 1.7], 1)
    assert "| no-op    | 5 ms | 500 tasks/s" in text
    assert "2.00 s (1.21× plain Celery)" in text
