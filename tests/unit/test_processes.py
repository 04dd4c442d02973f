"""bridge/processes.py, the child-process wrapper of `dev`, tests/ and bench/: output
logged or echoed behind the child's name, readiness, and stops that leave nothing of the
child's process group running (SIGTERM ignored: SIGKILL; a grandchild: killed too)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bridge.processes import Proc, ProcessError, ProcGroup

PY = sys.executable

# Ignores SIGTERM, forks a grandchild that sleeps, says both pids, then waits forever.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", os.getpid(), child.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """The process is dead: reaped, or a zombie (SIGKILL reaches another process
    asynchronously: wait a bit). A killed grandchild is reaped by init whenever init gets
    to it, so waiting for it to vanish would time init, not the stop."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def pids(proc: Proc) -> list[int]:
    proc.wait_for_output("ready", 30)
    line = next(x for x in proc.output.splitlines() if x.startswith("ready"))
    return [int(x) for x in line.split()[1:]]


def test_stop_escalates_to_sigkill_and_takes_the_whole_group(tmp_path: Path) -> None:
    proc = Proc("stubborn", [PY, "-c", STUBBORN], dict(os.environ), tmp_path / "s.log")
    parent, grandchild = pids(proc)
    assert proc.stop(timeout=0.5) == -9  # SIGTERM ignored: killed after the grace period
    assert gone(parent) and gone(grandchild)


def test_kill9_takes_the_grandchildren_too(tmp_path: Path) -> None:
    proc = Proc("stubborn", [PY, "-c", STUBBORN], dict(os.environ), tmp_path / "s.log")
    parent, grandchild = pids(proc)
    proc.kill9()
    assert proc.returncode == -9
    assert gone(parent) and gone(grandchild)


def test_a_graceful_child_exits_on_sigterm(tmp_path: Path) -> None:
    proc = Proc("sleeper", [PY, "-c", "print('ready', flush=True); import time; "
                                      "time.sleep(600)"], dict(os.environ), tmp_path / "g.log")
    proc.wait_for_output("ready", 30)
    assert proc.stop() == -15


def test_readiness_fails_with_the_log_when_the_child_exits(tmp_path: Path) -> None:
    proc = Proc("crash", [PY, "-c", "print('boom'); raise SystemExit(3)"], dict(os.environ),
                tmp_path / "c.log")
    with pytest.raises(ProcessError, match=r"crash exited \(3\)[\s\S]*boom"):
        proc.wait_for_output("ready", 30)


def test_group_numbers_logs_and_stops_everything(tmp_path: Path) -> None:
    group = ProcGroup(dict(os.environ), Proc, log_dir=tmp_path)
    try:
        a = group.start("worker", [PY, "-c", STUBBORN])
        b = group.start("worker", [PY, "-c", "print('ready', flush=True)"])
        assert (a.name, b.name) == ("worker0", "worker1")
        assert (tmp_path / "worker1.log").exists()
        family = pids(a)
        b.wait_for_output("ready", 30)
        b.popen.wait(30)
        assert group.exited() is b
        assert group.count_in_logs("ready") == 2
    finally:
        group.stop_all(timeout=0.5)
    assert all(gone(pid) for pid in family)


def test_without_a_log_dir_output_is_printed_behind_the_name() -> None:
    """`agent-bridge dev`'s view: `[worker] line`, one line per child line."""
    script = (
        "from bridge.processes import ProcGroup, Proc\n"
        "import os, sys\n"
        "g = ProcGroup(dict(os.environ), Proc)\n"
        "p = g.start('worker', [sys.executable, '-c', 'print(\"one\"); print(\"two\")'])\n"
        "p.popen.wait()\n"
        "g.stop_all()\n")
    # stop() waits for the echo of the child's last lines.
    out = subprocess.run([PY, "-c", script],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[worker] one", "[worker] two"]
