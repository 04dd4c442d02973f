"""`agent-bridge dev` as a user runs it: the whole stack starts, the demo tasks finish,
Ctrl-C leaves nothing running, and a restart keeps the tasks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg

from tests.stack import REPO

AGENT_BRIDGE = str(Path(sys.executable).parent / "agent-bridge")


def start_dev(data_dir: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENT_SIMULATED_SECONDS": "0.2", "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_URL", "REDIS_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY"):
        env.pop(name, None)
    return subprocess.Popen([AGENT_BRIDGE, "dev", "--data-dir", str(data_dir),
                             "--flower-port", "0", *extra],
                            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        assert proc.poll() is None, f"dev exited early:\n{out}"
        time.sleep(0.1)
    raise AssertionError(f"no {text!r}:\n{log.read_text(errors='replace')}")


def interrupt(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


def leftovers(data_dir: Path) -> list[str]:
    """Processes still running from this dev stack (its postgres, redis, children)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(data_dir) in cmd:
            found.append(cmd)
    return found


def test_dev_runs_the_demo_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    log = tmp_path / "dev.log"
    proc = start_dev(data_dir, log, "--demo")
    try:
        out = wait_for(log, "demo finished", proc)
    finally:
        code = interrupt(proc)
    out = log.read_text()
    assert code == 0, out
    assert out.count("→ completed") == 3
    assert "Everything stopped" in out
    assert leftovers(data_dir) == []

    # A restart keeps the tasks: they live in --data-dir.
    db_url = re.search(r"Database : (\S+)", out)
    assert db_url is not None
    proc = start_dev(data_dir, log)
    try:
        wait_for(log, "Ctrl-C stops everything", proc)
        with psycopg.connect(db_url.group(1)) as conn:
            row = conn.execute("select count(*) from public.agent_task_requests "
                               "where status = 'completed'").fetchone()
        assert row is not None and row[0] == 3
    finally:
        assert interrupt(proc) == 0
    assert leftovers(data_dir) == []
