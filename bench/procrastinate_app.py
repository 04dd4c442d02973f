"""The peer: procrastinate (PostgreSQL-only task queue), with the same three jobs.

Its worker runs with the official CLI:
`procrastinate --app=bench.procrastinate_app.app worker --concurrency N`, LISTEN/NOTIFY
on (its default). Tasks are async (procrastinate's native kind): a sync task would
run in a thread through asgiref, and sync tasks with concurrency > 1 are discouraged
by its docs. The connection string comes from BENCH_PROCRASTINATE_DSN; the pool
size from BENCH_PROCRASTINATE_POOL (default 10).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from procrastinate import App, JobContext, PsycopgConnector

from bench.handlers import record_start

QUEUE = "bench"
JOBS_TABLE = "procrastinate_jobs"


def make_connector(dsn: str, pool_size: int) -> PsycopgConnector:
    return PsycopgConnector(conninfo=dsn, min_size=min(2, pool_size), max_size=pool_size)


app = App(connector=make_connector(os.environ.get("BENCH_PROCRASTINATE_DSN", ""),
                                   int(os.environ.get("BENCH_PROCRASTINATE_POOL", "10"))))


@app.task(name="bench.noop", queue=QUEUE, pass_context=True)
async def noop(context: JobContext) -> dict[str, Any]:
    job_id = context.job.id
    record_start(str(job_id), 1)
    return {"answer": "ok"}


@app.task(name="bench.sleep_1s", queue=QUEUE, pass_context=True)
async def sleep_1s(context: JobContext) -> dict[str, Any]:
    record_start(str(context.job.id), 1)
    await asyncio.sleep(1.0)
    return {"answer": "slept 1s"}
