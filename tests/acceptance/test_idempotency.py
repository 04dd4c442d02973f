"""Idempotency keys end to end (issue 26): 20 `agent-bridge submit --idempotency-key K
--wait` at once, a real bridge and a real worker, over each transport: one row, one run of
the handler, and every caller follows that task to its answer. (The JS client's retries:
clients/js/test/idempotency.test.ts, run by test_frontend.py.)"""

from __future__ import annotations

import subprocess
from typing import Any

from bridge.store import TaskStore
from tests.stack import BIN, Stack


def test_twenty_concurrent_submits_with_one_key_run_one_task(
        store: TaskStore, stack: Stack, env: dict[str, Any]) -> None:
    stack.worker(pool="threads", concurrency=2, **env)
    stack.bridge(**env)
    args = [str(BIN / "agent-bridge"), "submit", "just once", "--context", '{"sleep": 0.5}',
            "--idempotency-key", "order-42", "--wait", "--timeout", "120"]
    procs = [subprocess.Popen(args, env={**stack.env, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(20)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 20, results
    ids = {out.splitlines()[0] for _, out, _ in results}
    assert len(ids) == 1, results
    [task_id] = ids
    assert all(out.splitlines()[-1] == "Agent processed: just once" for _, out, _ in results)
    told = [err for _, _, err in results if "already has idempotency key 'order-42'" in err]
    assert len(told) == 19, results
    assert f"task {task_id} already has idempotency key 'order-42' (agent default)" in told[0]
    [row] = stack.rows()
    assert (str(row["id"]), row["status"], row["attempts"], row["idempotency_key"]) == (
        task_id, "completed", 1, "order-42")
    assert len(stack.runs(task_id)) == 1, stack.logs()

    # Finished, the task keeps its key: one more submit prints it and its answer again.
    again = subprocess.run(args, env={**stack.env, **env}, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == task_id
    assert len(stack.rows()) == 1 and len(stack.runs(task_id)) == 1
