"""The first hour after the demo (issue 22), each step as a new user types it, in a project
folder of their own: a second shell that `source`s .agent-bridge/env without the venv on
PATH; a second `dev` in the same folder (refused with one line), and one after a kill -9
(not blocked); a handler in the project folder found by the README's worker command as by
`dev`; Flower after `dev --demo` (the demo's jobs listed, named by agent, no inspector
warnings); `status` with the env of a stopped `dev`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bridge.dev_lock import running_dev
from bridge.localstack import free_port
from tests.commands import interrupt, leftovers, wait_for
from tests.db import insert_task
from tests.stack import BIN, Proc, Stack

AGENT_BRIDGE = str(Path(sys.executable).parent / "agent-bridge")
READY = "Ctrl-C stops everything"
STOPPED_HINT = "agent-bridge dev is not running in this folder: start it with agent-bridge dev"
REVERSE = '''from typing import Any


def run(task: dict[str, Any]) -> dict[str, Any]:
    return {"answer": task["request_payload"]["prompt"][::-1]}
'''


def project(tmp_path: Path) -> Path:
    """A user's folder with their handler in it: myagent/reverse.py."""
    folder = tmp_path / "proj"
    (folder / "myagent").mkdir(parents=True)
    (folder / "myagent" / "reverse.py").write_text(REVERSE)
    return folder


def start_dev(folder: Path, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """`agent-bridge dev` run in `folder` (its data in ./.agent-bridge), as typed there."""
    full = {**os.environ, "AGENT_SIMULATED_SECONDS": "0.2", "PYTHONUNBUFFERED": "1", **env}
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "SUPABASE_URL",
                 "SUPABASE_SERVICE_KEY"):
        full.pop(name, None)
    return subprocess.Popen([AGENT_BRIDGE, "dev", *args], cwd=folder, env=full,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def second_shell(folder: Path, command: str) -> subprocess.CompletedProcess[str]:
    """A new shell in `folder`: nothing inherited, a PATH without the venv."""
    path = "/usr/bin:/bin"
    assert str(BIN) not in path.split(":")
    return subprocess.run(["bash", "-c", f"source .agent-bridge/env && {command}"],
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp")},
                          cwd=folder, capture_output=True, text=True, timeout=90)


def processes_of(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return list(psutil.Process(proc.pid).children(recursive=True))


def kill_all(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(processes, timeout=30)


def test_the_second_shell_runs_the_documented_commands_and_a_stale_env_says_dev_stopped(
        tmp_path: Path) -> None:
    """README: in a second shell, `source .agent-bridge/env` and `agent-bridge submit`,
    `status` talk to the same stack (they said `command not found`: no venv on PATH).
    Once dev stops, `status` with that env says dev is not running, in one line."""
    folder = project(tmp_path)
    log = tmp_path / "dev.log"
    proc = start_dev(folder, log, "--flower-port", "0", AGENT_HANDLER="myagent.reverse:run")
    try:
        wait_for(log, READY, proc)
        submitted = second_shell(folder, 'agent-bridge submit "hello there" --wait')
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "ereht olleh" in submitted.stdout  # dev's worker found myagent/ in the folder
        status = second_shell(folder, "agent-bridge status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "Database        ✅" in status.stdout and STOPPED_HINT not in status.stdout
    finally:
        assert interrupt(proc) == 0, log.read_text()
    assert leftovers(folder / ".agent-bridge") == []

    stale = second_shell(folder, "agent-bridge status")
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert "Database" in stale.stdout and "❌" in stale.stdout
    assert stale.stdout.count(STOPPED_HINT) == 1, stale.stdout
    assert stale.stdout.rstrip().endswith(STOPPED_HINT)


def test_a_second_dev_in_the_same_folder_is_refused_and_a_killed_one_blocks_nothing(
        tmp_path: Path) -> None:
    """A second `dev` on the same data dir shared the first one's PostgreSQL, rewrote its
    env file and stopped its PostgreSQL on Ctrl-C. Now it is refused with one line before
    it touches anything; after a kill -9 of the first, the stale lock file blocks nothing."""
    folder = project(tmp_path)
    data_dir = folder / ".agent-bridge"
    log = tmp_path / "dev.log"
    first = start_dev(folder, log, "--flower-port", "0")
    orphans: list[psutil.Process] = []
    try:
        wait_for(log, READY, first)
        assert running_dev(data_dir) == first.pid
        env_before = (data_dir / "env").read_text()
        state_before = (data_dir / "dev.json").read_text()

        second = subprocess.run([AGENT_BRIDGE, "dev"], cwd=folder, capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert second.returncode != 0
        said = (second.stdout + second.stderr).strip().splitlines()
        assert len(said) == 1, said
        assert "already running" in said[0] and f"pid {first.pid}" in said[0], said
        assert "source .agent-bridge/env" in said[0], said
        assert (data_dir / "env").read_text() == env_before
        assert (data_dir / "dev.json").read_text() == state_before
        # The first one still runs, and still answers a second shell.
        assert first.poll() is None
        status = second_shell(folder, "agent-bridge status")
        assert status.returncode == 0, status.stdout + status.stderr

        # kill -9: no cleanup ran, its lock file stays behind, its children run on.
        orphans = processes_of(first)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        assert (data_dir / "dev.lock").exists()
        assert running_dev(data_dir) is None

        log2 = tmp_path / "dev2.log"
        third = start_dev(folder, log2, "--flower-port", "0")
        try:
            wait_for(log2, READY, third)
            assert running_dev(data_dir) == third.pid
            status = second_shell(folder, "agent-bridge status")
            assert status.returncode == 0, status.stdout + status.stderr
        finally:
            assert interrupt(third) == 0, log2.read_text()
    finally:
        if first.poll() is None:
            interrupt(first)
        kill_all(orphans)
    deadline = time.monotonic() + 30
    while leftovers(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(data_dir) == []


def test_the_readme_worker_finds_a_handler_in_the_folder_it_runs_in(
        stack: Stack, tmp_path: Path) -> None:
    """`celery -A tasks worker` run in the project folder imports myagent.reverse from it,
    as dev's worker does (it said `No module named 'myagent'`); a handler that is nowhere
    stops the worker with one line that names the folder."""
    folder = project(tmp_path)
    env = {**stack.env, "AGENT_HANDLER": "myagent.reverse:run"}
    # Not the repository (the stack's PYTHONPATH): what a user has, the installed package.
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    args = [str(BIN / "celery"), "-A", "tasks", "worker", "-P", "prefork", "-c", "1",
            "-n", f"proj-{os.getpid()}@%h", "--without-mingle", "--without-gossip",
            "--loglevel", "INFO"]
    worker = stack.add(Proc("worker-proj", args, env, tmp_path / "worker-proj.log",
                            cwd=folder))
    worker.wait_for_output(" ready.", 60)
    stack.bridge()
    task_id = insert_task(stack.db_url, {"prompt": "hello there"})
    stack.wait_for("the task", lambda: stack.row(task_id)["status"] == "completed")
    assert stack.row(task_id)["response_payload"]["answer"] == "ereht olleh"

    missing = stack.add(Proc("worker-missing", args, {**env, "AGENT_HANDLER": "nothere.x:run"},
                             tmp_path / "worker-missing.log", cwd=folder))
    assert missing.popen.wait(60) != 0
    line = (f"agent-bridge: AGENT_HANDLER='nothere.x:run': cannot import nothere.x: No module "
            f"named 'nothere' (handlers are imported from the folder the worker runs in, "
            f"{folder}, or from installed packages)")
    assert line in missing.output.splitlines(), missing.output


def test_flower_lists_the_demo_tasks_by_agent_and_dev_starts_it_without_warnings(
        tmp_path: Path) -> None:
    """Opened after `dev --demo`, Flower said "No tasks have been received" (the demo ran
    before it listened), every row read `(id, attempt)`, and each start logged four
    "Inspect method ... failed" warnings. Now: the demo's jobs, each naming its agent
    (never the payload), and no warning."""
    folder = project(tmp_path)
    log = tmp_path / "dev.log"
    port = free_port()
    proc = start_dev(folder, log, "--demo", "--flower-port", str(port))
    try:
        out = wait_for(log, "demo finished", proc)
        ids = re.findall(r"📝 submitted (\S+): ", out)
        assert len(ids) == 3, out
        password = re.search(r"FLOWER_BASIC_AUTH=dev:(\S+)",
                             (folder / ".agent-bridge" / "env").read_text())
        assert password is not None
        auth = ("dev", password.group(1).strip("'"))

        def jobs() -> dict[str, dict[str, object]]:
            response = httpx.get(f"http://127.0.0.1:{port}/api/tasks",
                                 params={"taskname": "tasks.run_agent"}, auth=auth, timeout=5)
            response.raise_for_status()
            found: dict[str, dict[str, object]] = response.json()
            return found

        deadline = time.monotonic() + 30
        while not all(jobs().get(f"{i}:1", {}).get("state") == "SUCCESS" for i in ids):
            assert time.monotonic() < deadline, f"{jobs()}\n{log.read_text()}"
            time.sleep(0.2)
        listed = jobs()
        for task_id in ids:
            job = listed[f"{task_id}:1"]
            assert job["args"] == f"agent=default task={task_id[:8]}… attempt=1", job
            assert not job["kwargs"], job
        shown = " ".join(f"{j['args']} {j['kwargs']}" for j in listed.values())
        assert "Hello Agent" not in shown and "6 x 7" not in shown
        assert "Inspect method" not in log.read_text()
        assert not re.search(r"^\[flower\] \[[WE] ", log.read_text(), re.M), log.read_text()
    finally:
        assert interrupt(proc) == 0, log.read_text()
    assert leftovers(folder / ".agent-bridge") == []
