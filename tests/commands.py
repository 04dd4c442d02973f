"""Running our commands as a user runs them: the installed `agent-bridge` entry point in a
subprocess, with an environment of its own; and the signals and checks `dev` tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bridge.config import variables
from tests.stack import REPO

AGENT_BRIDGE = Path(sys.executable).parent / "agent-bridge"


def env_with(**values: str) -> dict[str, str]:
    """os.environ with every agent-bridge variable blanked (so a .env cannot fill it
    in: dotenv never overrides a variable that is set), then `values`."""
    env = dict(os.environ)
    env.update({name: "" for name, _, _ in variables()})
    env.update(values)
    return env


def cli(*args: str, env: dict[str, str], timeout: float = 60, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGENT_BRIDGE), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None)



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

