"""`agent-bridge dev`: the whole stack on one machine, no Docker, no accounts.

An embedded PostgreSQL (data kept in --data-dir) and a Redis, migrated; then the
bridge, one Celery worker and Flower (with a password) as child processes, their
output prefixed. Ports and the Flower password are kept in <data-dir>/dev.json, so a
restart on the same data dir keeps them; <data-dir>/env holds the variables a second
shell needs, and this interpreter's bin directory first on PATH, so `agent-bridge` runs
there without activating the venv (`source` it). One dev per data dir: a second one is
refused before it touches anything (bridge/dev_lock.py). With Flower, the worker starts
first, then Flower, and dev waits until Flower sees the worker before it says where
things are and runs the demo, so Flower lists every task from the first. If its own
Redis or PostgreSQL dies, dev says so and stops. Ctrl-C stops the children, then Redis,
then PostgreSQL, and leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from celery import Celery
from kombu.exceptions import KombuError

from bridge import dev_lock
from bridge.config import Settings
from bridge.localstack import LocalPostgres, LocalRedis, free_port
from bridge.migrate import migrate
from bridge.processes import Proc, ProcGroup
from bridge.store import open_store, request_payload

DEMO_PROMPTS = [
    "Hello Agent, are you online?",
    "Summarise the integration guide in one line.",
    "What is 6 x 7?",
]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev", help="run the whole stack locally: Postgres, Redis, bridge, worker, Flower",
        description="Start an embedded PostgreSQL and a Redis, apply the migrations, and run "
                    "the bridge, one Celery worker and Flower until Ctrl-C.")
    p.add_argument("--data-dir", type=Path, default=Path(".agent-bridge"),
                   help="where PostgreSQL keeps its data (default: ./.agent-bridge)")
    p.add_argument("--demo", action="store_true",
                   help="submit a few sample tasks and show them finish")
    p.add_argument("--flower-port", type=int, default=5555,
                   help="0 = no Flower; taken: the port of the last run, else a free one")
    p.add_argument("--concurrency", type=int, default=2, help="worker processes/threads")
    p.set_defaults(func=run)


FLOWER_USER = "dev"


def load_state(data_dir: Path) -> dict[str, Any]:
    """What the last run on this data dir chose: ports and Flower's password."""
    try:
        state = json.loads((data_dir / "dev.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def pick_port(wanted: int | None, previous: Any) -> int:
    """`wanted` if free, else the last run's port if free, else any free port."""
    for port in (wanted, previous):
        if isinstance(port, int) and 0 < port < 65536 and _port_free(port):
            return port
    return free_port()


def write_env(data_dir: Path, variables: dict[str, str]) -> Path:
    """<data-dir>/env: `export` lines a second shell can `source`."""
    path = data_dir / "env"
    lines = ["# agent-bridge dev: `source` this file in another shell to reach this stack."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    path_line = _path_line()
    if path_line:
        lines.append(path_line)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds Flower's password
    return path


def _path_line() -> str | None:
    """The env file's PATH line: this interpreter's bin directory (the venv's, where
    `agent-bridge` and `celery` are) first, so a second shell needs no `activate`."""
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
    if not any((bin_dir / name).exists() for name in ("agent-bridge", "agent-bridge.exe")):
        return None
    return f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"'


def _env_hint(env_file: Path) -> str:
    """`source <env file>` as the user can type it: relative to here when it is below."""
    try:
        shown = env_file.relative_to(Path.cwd())
    except ValueError:
        shown = env_file
    return f"source {shlex.quote(str(shown))}"


def run(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    # Before anything else (PostgreSQL, Redis, dev.json, the env file): a second dev on
    # this data dir would share the first one's PostgreSQL and stop it on its Ctrl-C.
    try:
        lock = dev_lock.acquire(data_dir)
    except dev_lock.DevRunning as exc:
        pid = f"pid {exc.pid}" if exc.pid else "pid unknown"
        print(f"❌ agent-bridge dev is already running in {data_dir} ({pid}): use it from "
              f"another shell with `{_env_hint(data_dir / 'env')}`, or stop it (Ctrl-C in "
              "its shell) before starting another", file=sys.stderr, flush=True)
        return 1
    try:
        return _run(args, data_dir)
    finally:
        lock.release()


def _run(args: argparse.Namespace, data_dir: Path) -> int:
    state = load_state(data_dir)
    postgres = LocalPostgres(data_dir / "postgres")
    redis_port = pick_port(state.get("redis_port"), None)
    if state.get("redis_port") not in (None, redis_port):
        print(f"⚠️  Redis port {state['redis_port']} is taken now; using {redis_port} "
              f"(re-source {data_dir / 'env'} in other shells)", flush=True)
    redis = LocalRedis(data_dir / "redis", port=redis_port)
    flower_port = pick_port(args.flower_port, state.get("flower_port")) \
        if args.flower_port else 0
    flower_password = str(state.get("flower_password") or secrets.token_urlsafe(12))
    (data_dir / "dev.json").write_text(json.dumps(
        {"redis_port": redis_port, "flower_port": flower_port or state.get("flower_port"),
         "flower_password": flower_password}))
    (data_dir / "dev.json").chmod(0o600)
    children: ProcGroup[Proc] | None = None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("🐘 Starting PostgreSQL ...", flush=True)
        db_url = postgres.start()
        migrate(db_url)
        print("📮 Starting Redis ...", flush=True)
        redis.start()
        shared = {"DATABASE_URL": db_url, "REDIS_URL": redis.url,
                  "CELERY_BROKER_URL": redis.url, "BRIDGE_TRANSPORT": "postgres",
                  "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{flower_password}"}
        env_file = write_env(data_dir, shared)
        env = {**os.environ, **shared, "PYTHONUNBUFFERED": "1"}
        if flower_port:  # task events from the first task on, so Flower misses none
            env["CELERY_TASK_EVENTS"] = os.environ.get("CELERY_TASK_EVENTS") or "true"
        # `python -P`: the current directory is not put first on sys.path, so the worker
        # finds a handler in it the way `celery -A tasks worker` does (tasks/handlers).
        py = [sys.executable, "-P"]
        # No log_dir: each child's output is printed behind its name, `[worker] ...`.
        children = ProcGroup(env, Proc)
        children.start("bridge", [*py, "-m", "bridge.cli", "run"])
        pool = "threads" if os.name == "nt" else "prefork"  # prefork does not run on Windows
        children.start("worker", [
            *py, "-m", "celery", "-A", "tasks", "worker", "-P", pool,
            "-c", str(args.concurrency), "--loglevel", "INFO", "-n", "dev@%h"])
        if flower_port:
            _start_flower(children, py, redis.url, flower_port, flower_password, stop)
        if stop.is_set() or children.exited() is not None:
            return _watch(children, postgres, redis, stop)
        _print_where(shared, env_file, flower_port)
        if args.demo:
            threading.Thread(target=_demo, args=(db_url, stop), daemon=True).start()
        return _watch(children, postgres, redis, stop)
    finally:
        print("🛑 Stopping ...", flush=True)
        if children is not None:
            children.stop_all()
        redis.stop()
        postgres.stop()
        print("👋 Everything stopped.", flush=True)


def _watch(children: ProcGroup[Proc], postgres: LocalPostgres, redis: LocalRedis,
           stop: threading.Event) -> int:
    """Until Ctrl-C (0), or until a child or one of dev's own servers dies (1)."""
    while not stop.wait(0.5):
        died = _dead_service(postgres, redis)
        if died:
            print(f"❌ {died}; stopping everything", flush=True)
            return 1
        child = children.exited()
        if child is not None:
            print(f"❌ {child.name} exited with code {child.returncode}; "
                  "stopping everything", flush=True)
            return 1
    return 0


def _start_flower(children: ProcGroup[Proc], py: list[str], broker_url: str, port: int,
                  password: str, stop: threading.Event) -> None:
    """Flower once the worker answers, then wait until Flower hears the worker's events.

    Started before the worker answers, Flower's first inspection times out (four
    "Inspect method ... failed" warnings); and events sent before Flower listens are
    lost to it (the demo's tasks were missing from its list)."""
    app = Celery("agent_bridge_dev", broker=broker_url)
    try:
        answered = _until(lambda: bool(app.control.ping(timeout=0.5)), children, stop, 120)
        if not answered and not stop.is_set() and children.exited() is None:
            print("⚠️  the worker did not answer within 120 s; starting Flower anyway",
                  flush=True)
    finally:
        app.close()
    if stop.is_set() or children.exited() is not None:
        return
    children.start("flower", [
        *py, "-m", "celery", "-A", "tasks", "flower", f"--port={port}",
        "--address=127.0.0.1", "--max_tasks=10000", f"--basic-auth={FLOWER_USER}:{password}"])

    def sees_a_worker() -> bool:
        # /api/workers?status=1: the workers Flower knows from their events (heartbeats).
        response = httpx.get(f"http://127.0.0.1:{port}/api/workers", params={"status": 1},
                             auth=(FLOWER_USER, password), timeout=2)
        return response.status_code == 200 and any(response.json().values())

    if not _until(sees_a_worker, children, stop, 60) and not stop.is_set() \
            and children.exited() is None:
        print("⚠️  Flower did not hear from the worker within 60 s; it may miss the first "
              "tasks", flush=True)


def _until(check: Callable[[], bool], children: ProcGroup[Proc], stop: threading.Event,
           timeout: float) -> bool:
    """Poll `check` until it holds (True); False on Ctrl-C, a child's exit or timeout."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and children.exited() is None and time.monotonic() < deadline:
        try:
            if check():
                return True
        except (httpx.HTTPError, KombuError, OSError, ValueError):
            pass  # not listening yet
        stop.wait(0.2)
    return False


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _dead_service(postgres: LocalPostgres, redis: LocalRedis) -> str | None:
    """Which of dev's own servers died under it, said for a person; None if both run."""
    if redis.process is not None and not redis.process.alive():
        return (f"Redis (port {redis.port}) died with code {redis.process.returncode}; see "
                f"{redis.data_dir / 'redis.log'}")
    if postgres.pid() is None:
        return (f"PostgreSQL ({postgres.data_dir}) is no longer running; see its log in "
                f"{postgres.data_dir}")
    return None


def _print_where(shared: dict[str, str], env_file: Path, flower_port: int) -> None:
    line = "-" * 60
    db_url = shared["DATABASE_URL"]
    print(line)
    print(f"🗄️  Database : {db_url}")
    print(f"              psql \"{db_url}\"")
    print(f"📮 Redis    : {shared['REDIS_URL']}")
    if flower_port:
        user, _, password = shared["FLOWER_BASIC_AUTH"].partition(":")
        print(f"🌸 Flower   : http://127.0.0.1:{flower_port}  (user {user}, password {password})")
    print(f"🐚 Another shell: source {shlex.quote(str(env_file))}   (it sets:)")
    for name, value in shared.items():
        print(f"     export {name}={shlex.quote(value)}")
    path_line = _path_line()
    if path_line:
        print(f"     {path_line}")
    print("✍️  Then     : agent-bridge submit \"Hello\" --wait; agent-bridge status")
    print("   Ctrl-C stops everything.")
    print(line, flush=True)


def _demo(db_url: str, stop: threading.Event) -> None:
    """Insert the sample tasks the way the frontend does, then follow them."""
    rows = open_store(Settings(database_url=db_url, transport="postgres"), pool=False)
    try:
        ids = []
        for prompt in DEMO_PROMPTS:
            task_id = rows.insert(request_payload(prompt, {"source": "demo"}))
            ids.append(task_id)
            print(f"[demo  ] 📝 submitted {task_id}: {prompt!r}", flush=True)
        seen: dict[str, str] = {}
        while not stop.is_set() and sum(
                s in ("completed", "failed") for s in seen.values()) < len(ids):
            for task_id in ids:
                row = rows.get(task_id)
                if row is None or seen.get(task_id) == row["status"]:
                    continue
                seen[task_id] = row["status"]
                outcome = {"completed": row["response_payload"], "failed": row["error"]}
                extra = outcome.get(row["status"])
                print(f"[demo  ] {task_id[:8]} → {row['status']}"
                      + (f" {json.dumps(extra)}" if extra else ""), flush=True)
            stop.wait(0.2)
    finally:
        rows.close()
    if not stop.is_set():
        print("[demo  ] ✅ demo finished: all sample tasks are done. Ctrl-C to stop.", flush=True)
