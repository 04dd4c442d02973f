"""Child processes: start, watch, log, stop. Shared by `agent-bridge dev`, tests/ and bench/.

Every child runs in its own session, so its process group is the child and whatever it
forks (a prefork worker's pool children): a signal sent to the group reaches all of them,
and the parent's Ctrl-C (which the terminal sends to *its* group) does not, so the parent
decides the order things stop in. Stopping is SIGTERM to the group, SIGKILL after a grace
period, then SIGKILL to whatever of the group is left, so nothing outlives a stop.

Output goes to a log file (tests, bench: read back with `output`) or, with no log file,
to stdout line by line behind the child's name (`[worker] ...`, for `dev`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Generic, TypeVar

from bridge.errors import AgentBridgeError

BIN = Path(sys.executable).parent  # this venv's `celery` and `agent-bridge`

# How long a child gets between SIGTERM and SIGKILL: a Celery worker finishes or
# requeues what it runs (late acks), the bridge closes its connections.
GRACE_SECONDS = 20.0


class ProcessError(AgentBridgeError, RuntimeError):
    """A child exited, or did not say it was ready in time; the message has its log."""


class Proc:
    """One child process in its own process group, its output logged or echoed."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 log_path: Path | None = None, *, cwd: Path | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self._log: IO[bytes] | None = log_path.open("ab") if log_path is not None else None
        self.popen = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            stdout=self._log if self._log is not None else subprocess.PIPE,
            start_new_session=True)
        self.pid = self.popen.pid
        self._echo_thread: threading.Thread | None = None
        if self._log is None:
            assert self.popen.stdout is not None
            self._echo_thread = threading.Thread(target=self._echo, args=(self.popen.stdout,),
                                                 daemon=True)
            self._echo_thread.start()

    def _echo(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                print(f"[{self.name:6}] {line}", flush=True)

    @property
    def output(self) -> str:
        """Everything the child wrote so far ("" when it is echoed, not logged)."""
        if self.log_path is None:
            return ""
        return self.log_path.read_text(errors="replace")

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        """Readiness: wait until the log shows `text`; ProcessError if it exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if not self.alive():
                raise self._error(f"exited ({self.popen.returncode})")
            if time.monotonic() > deadline:
                raise self._error(f"no {text!r} within {timeout}s")
            time.sleep(0.05)

    def _error(self, what: str) -> ProcessError:
        return ProcessError(f"{self.name} {what}; log {self.log_path}:\n{self.output[-8000:]}")

    def kill9(self) -> None:
        """SIGKILL the whole process group (chaos, failure tests): no cleanup runs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait()
        self._reap_group()

    def stop(self, timeout: float = GRACE_SECONDS) -> int:
        """SIGTERM the group, SIGKILL it after `timeout`; the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._reap_group()
        if self._log is not None:
            self._log.close()
        if self._echo_thread is not None:
            # The child's last lines are printed before the caller says it stopped.
            self._echo_thread.join(5)
        return int(self.popen.returncode)

    def _reap_group(self) -> None:
        """Leftovers of the group (a pool child outliving its parent) get SIGKILL."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


P = TypeVar("P", bound=Proc)


class ProcGroup(Generic[P]):
    """The children of one run, each a `proc_type`; `stop_all` (in a finally block)
    stops every one.

    With `log_dir`, children are numbered per name (`worker0`, `worker1`) and log to
    `<log_dir>/<name>.log`; without, they keep their name and are echoed to stdout.
    """

    def __init__(self, env: dict[str, str], proc_type: type[P], *,
                 log_dir: Path | None = None, cwd: Path | None = None) -> None:
        self.env = env
        self.proc_type = proc_type
        self.log_dir = log_dir
        self.cwd = cwd
        self.procs: list[P] = []

    def count(self, name: str) -> int:
        """How many children so far have a name starting with `name`."""
        return sum(p.name.startswith(name) for p in self.procs)

    def start(self, name: str, args: list[str], **env: str) -> P:
        """Start a child with the group's environment plus `env`."""
        log_path = None
        if self.log_dir is not None:
            name = f"{name}{self.count(name)}"
            log_path = self.log_dir / f"{name}.log"
        return self.add(self.proc_type(name, args, {**self.env, **env}, log_path, cwd=self.cwd))

    def start_worker(self, app: str, *, pool: str, concurrency: int, node: str,
                     loglevel: str = "INFO", queues: str | None = None,
                     ready_within: float | None = 60, name: str = "worker", **env: str) -> P:
        """`celery -A <app> worker` as the tests and the bench run it (no mingle or gossip:
        they only slow the start); waits for its ` ready.` line unless `ready_within` is
        None."""
        proc = self.start(name, [
            str(BIN / "celery"), "-A", app, "worker", "-P", pool, "-c", str(concurrency),
            "-n", f"{node}-{os.getpid()}@%h", "--without-mingle", "--without-gossip",
            "--loglevel", loglevel, *(["-Q", queues] if queues else [])], **env)
        if ready_within is not None:
            proc.wait_for_output(" ready.", ready_within)
        return proc

    def start_bridge(self, *, ready_within: float | None = 60, **env: str) -> P:
        """`agent-bridge run`; waits for its ONLINE line unless `ready_within` is None."""
        proc = self.start("bridge", [str(BIN / "agent-bridge"), "run"], **env)
        if ready_within is not None:
            proc.wait_for_output("ONLINE", ready_within)
        return proc

    def add(self, proc: P) -> P:
        """Track a child started elsewhere, so `stop_all` stops it too."""
        self.procs.append(proc)
        return proc

    def exited(self) -> P | None:
        """The first child that is no longer running, if any."""
        return next((p for p in self.procs if not p.alive()), None)

    def stop_all(self, timeout: float = GRACE_SECONDS) -> None:
        """Stop every child, the last started first (workers before the bridge)."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.output}" for p in self.procs)

    def count_in_logs(self, text: str) -> int:
        return sum(p.output.count(text) for p in self.procs)
