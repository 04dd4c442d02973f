"""`agent-bridge dev` as a user runs it: the whole stack starts, the demo tasks finish,
Ctrl-C leaves nothing running (no server of the data dir, and none of the processes dev
started: bridge, worker and its pool, Flower), and a restart keeps the tasks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bridge.localstack import free_port
from tests.commands import interrupt, leftovers, wait_for
from tests.stack import REPO

AGENT_BRIDGE = str(Path(sys.executable).parent / "agent-bridge")


def start_dev(data_dir: Path, log: Path, *extra: str, flower_port: int = 0
              ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGENT_SIMULATED_SECONDS": "0.2", "PYTHONUNBUFFERED": "1"}
    for name in ("DATABASE_URL", "REDIS_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY"):
        env.pop(name, None)
    return subprocess.Popen([AGENT_BRIDGE, "dev", "--data-dir", str(data_dir),
                             "--flower-port", str(flower_port), *extra],
                            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def family(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process `proc` started, and theirs (a server that daemonized itself, as
    PostgreSQL does, is found by its data dir instead)."""
    children: list[psutil.Process] = psutil.Process(proc.pid).children(recursive=True)
    return children


def role(process: psutil.Process) -> str:
    try:
        cmd = " ".join(process.cmdline())
    except psutil.Error:
        return "gone"
    for name, marker in (("bridge", "bridge.cli run"), ("worker", "tasks worker"),
                         ("flower", "tasks flower"), ("redis", "redis")):
        if marker in cmd:
            return name
    return cmd


def still_running(processes: list[psutil.Process]) -> list[str]:
    """Those of `processes` still alive (is_running() also rules out a reused pid)."""
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {role(p)}")
        except psutil.NoSuchProcess:
            pass
    return alive


def test_dev_runs_the_demo_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    log = tmp_path / "dev.log"
    proc = start_dev(data_dir, log, "--demo", flower_port=free_port())
    try:
        out = wait_for(log, "demo finished", proc)
        started = family(proc)
        roles = [role(p) for p in started]
    finally:
        code = interrupt(proc)
    out = log.read_text()
    assert code == 0, out
    assert out.count("→ completed") == 3
    assert "Everything stopped" in out
    # The bridge, the worker (with its pool) and Flower were running, and none is now.
    assert {"bridge", "worker", "flower"} <= set(roles), roles
    assert roles.count("worker") >= 2, roles  # the worker and its pool children
    assert still_running(started) == []
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


def test_dev_gives_a_second_shell_its_variables_keeps_ports_and_stops_when_redis_dies(
        tmp_path: Path) -> None:
    """`dev` printed only DATABASE_URL and chose a new Redis port each run, so `status` in a
    second shell talked to another Redis; its Flower had no password; and it kept going
    when its own Redis died. Now: <data-dir>/env to `source`, stable ports and password,
    Flower behind them, and a dead Redis stops dev with a clear line."""
    import base64
    import json
    import urllib.error
    import urllib.request

    data_dir = tmp_path / "stack"
    log = tmp_path / "dev.log"
    flower = free_port()
    proc = start_dev(data_dir, log, flower_port=flower)
    try:
        out = wait_for(log, "Ctrl-C stops everything", proc)
        env_file = data_dir / "env"
        exported = dict(re.findall(r"^export (\w+)=(\S+)$", env_file.read_text(), re.M))
        assert set(exported) == {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL",
                                 "BRIDGE_TRANSPORT", "FLOWER_BASIC_AUTH", "PATH"}
        assert f"source {env_file}" in out and f"export REDIS_URL={exported['REDIS_URL']}" in out
        auth = exported["FLOWER_BASIC_AUTH"].strip("'")
        user, _, password = auth.partition(":")
        assert f"(user {user}, password {password})" in out

        # A second shell: only what the file sets (no variable inherited from this one).
        shell = subprocess.run(
            ["bash", "-c", f"source {env_file} && {AGENT_BRIDGE} status --json"],
            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        report = json.loads(shell.stdout)
        assert report["database"]["reachable"] and report["broker"]["reachable"], shell.stderr

        url = f"http://127.0.0.1:{flower}/api/workers"
        deadline = time.monotonic() + 60
        while True:  # Flower answers once it is up: 401 without the password
            try:
                urllib.request.urlopen(url, timeout=5)
                raise AssertionError("Flower answered without credentials")
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "Flower never answered"
                time.sleep(0.2)
        request = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:
        assert interrupt(proc) == 0

    with running_dev(data_dir, log, flower_port=flower) as (proc, again):
        assert dict(re.findall(r"^export (\w+)=(\S+)$", env_file.read_text(), re.M)) == exported
        assert f"export REDIS_URL={exported['REDIS_URL']}" in again  # the same port
        port = exported["REDIS_URL"].rsplit(":", 1)[1].split("/")[0]
        # redis-server rewrites its title to `redis-server 127.0.0.1:<port>`.
        redis_server = next(p for p in psutil.process_iter(["cmdline"])
                            if "redis-server" in " ".join(p.info["cmdline"] or [])
                            and f":{port}" in " ".join(p.info["cmdline"] or []))
        redis_server.kill()
        assert proc.wait(60) == 1
    said_and_stopped(log, data_dir, r"❌ Redis \(port \d+\) died with code -9; see "
                                    r".*redis\.log; stopping everything")


def test_dev_stops_when_its_postgres_dies(tmp_path: Path) -> None:
    """Its own PostgreSQL killed under it: dev says so and stops everything, exit 1."""
    data_dir = tmp_path / "stack"
    log = tmp_path / "dev.log"
    with running_dev(data_dir, log) as (proc, _):
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(60) == 1
    said_and_stopped(log, data_dir, r"❌ PostgreSQL \(.*postgres\) is no longer running; see "
                                    r"its log in .*; stopping everything")


@contextmanager
def running_dev(data_dir: Path, log: Path, **options: Any
                ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """dev, started and ready (its log so far), for a test to kill one of its servers;
    interrupted afterwards if it is still running."""
    proc = start_dev(data_dir, log, **options)
    try:
        yield proc, wait_for(log, "Ctrl-C stops everything", proc)
    finally:
        if proc.poll() is None:
            interrupt(proc)


def said_and_stopped(log: Path, data_dir: Path, message: str) -> None:
    """dev, one of whose servers died, said so (`message`, a pattern) and then stopped
    everything it had started, leaving nothing of its data dir running."""
    out = log.read_text()
    assert re.search(message, out), out
    assert "Everything stopped" in out.rsplit("Ctrl-C stops everything", 1)[1]
    assert leftovers(data_dir) == []

