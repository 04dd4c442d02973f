"""A Celery revoke of a `run_agent` job (Flower's Revoke / Terminate, `celery control
revoke`) ends its row as a cancel does, instead of the row being rescued and run again.

- Terminate in the prefork pool: Celery kills the pool process running the job and
  fires `task_revoked(terminated=True)` in the worker's main process. The holder is
  gone, so the row ends `failed` / Cancelled at once, its partial answer kept.
- A job revoked before it ran (`task_revoked`, not terminated): its attempt is
  cancelled; the row (claimed but not started, or waiting for a retry) ends at once.
- Revoke without terminate of a running job, or terminate in the threads pool (a
  thread cannot be killed): Celery only marks the id revoked. A thread of the
  worker's main process sees the running job in that set and asks for cancellation
  through the database, so the handler stops as on any cancel.

Every call names the attempt, so revoking an old job never cancels a newer attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import task_revoked, worker_ready
from celery.worker import state as worker_state

from bridge.celery_app import RUN_AGENT
from bridge.errors import StoreError
from bridge.store import open_store
from tasks.app import settings

log = logging.getLogger(__name__)

SCAN_INTERVAL = 0.2  # seconds; an in-memory look at the running jobs


def job_attempt(celery_id: str | None, args: Any = None) -> tuple[str, int] | None:
    """(task id, attempt) of a run_agent job: its args, else its Celery id `id:attempt`."""
    if isinstance(args, list | tuple) and len(args) == 2 and isinstance(args[1], int):
        return str(args[0]), int(args[1])
    task_id, _, attempt = (celery_id or "").rpartition(":")
    if task_id and attempt.isdigit():
        return task_id, int(attempt)
    return None


def cancel_job(task_id: str, attempt: int, *, holder_gone: bool, how: str) -> str | None:
    """Cancel that attempt through the database; the row's status afterwards."""
    store = open_store(settings, pool=False)
    try:
        status = store.request_cancel(task_id, attempt, holder_gone=holder_gone)
    except StoreError as exc:
        log.error("❌ Task %s: %s, but the cancel could not be recorded: %s", task_id, how, exc,
                  extra={"action": "revoke_failed", "task_id": task_id, "attempt": attempt})
        return None
    finally:
        store.close()
    log.warning("🛑 Task %s: %s; the row is now %s", task_id, how, status,
                extra={"action": "revoked", "task_id": task_id, "attempt": attempt})
    return status


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                expired: bool = False, **_: Any) -> None:
    if getattr(sender, "name", None) != RUN_AGENT or expired:
        return
    found = job_attempt(getattr(request, "id", None), getattr(request, "args", None))
    if found is not None:
        how = "its job was terminated" if terminated else "its job was revoked"
        cancel_job(*found, holder_gone=bool(terminated), how=how)


class RevokedScan:
    """Running run_agent jobs whose id Celery marked revoked: cancel each once."""

    def __init__(self) -> None:
        self._done: set[str] = set()

    def run_forever(self) -> None:
        while True:
            time.sleep(SCAN_INTERVAL)
            try:
                self.scan()
            except Exception:  # never let the scan die
                log.exception("revoked-job scan failed", extra={"action": "revoke_scan_failed"})

    def scan(self) -> None:
        try:  # (the consumer thread changes the set meanwhile: then look again next time)
            active = [r for r in list(worker_state.active_requests) if r.name == RUN_AGENT]
        except RuntimeError:
            return
        self._done &= {r.id for r in active}
        for request in active:
            if request.id in self._done or request.id not in worker_state.revoked:
                continue
            self._done.add(request.id)
            found = job_attempt(request.id, request.args)
            if found is not None:
                cancel_job(*found, holder_gone=False, how="its running job was revoked")


@worker_ready.connect
def _start_scan(**_: Any) -> None:
    threading.Thread(target=RevokedScan().run_forever, name="revoked-scan", daemon=True).start()
