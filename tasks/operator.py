"""Operator tasks, for Flower's HTTP API or `celery call`.

Flower has no retry button for our jobs: a failed row is re-run by sending
`tasks.requeue_failed` with the row id (Flower: POST /api/task/send-task/
tasks.requeue_failed, body {"args": ["<task id>"]}). It puts the row back to
pending with fresh attempts; the bridge claims it again, fenced like any attempt.
"""

from __future__ import annotations

import logging

from bridge.celery_app import REQUEUE_FAILED
from tasks.app import app
from tasks.runtime import process_runtime

log = logging.getLogger(__name__)


@app.task(name=REQUEUE_FAILED)
def requeue_failed(task_id: str, more_attempts: int = 3) -> list[str]:
    """Requeue one failed row; returns the ids requeued (empty if it was not failed)."""
    store = process_runtime.get().store
    requeued = store.requeue(ids=[task_id], more_attempts=more_attempts)
    log.info("🔁 Requeued %d failed task(s) on operator request", len(requeued),
             extra={"action": "requeued", "task_id": task_id})
    return requeued
