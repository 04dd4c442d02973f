"""Explicit wiring: imports go one way, and the bridge process loads no worker code.

The bridge publishes jobs by task name with its own Celery app, built by the factory
the worker uses too (bridge/celery_app.py); only the worker imports `tasks`. No
services are needed: these read the source and import modules.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from bridge.celery_app import REQUEUE_FAILED, RUN_AGENT, celery_config, create_celery_app

REPO = Path(__file__).resolve().parents[2]

# Every module of the `bridge` package, imported in a fresh interpreter: which `tasks`
# modules (if any) came with them, and which tasks the bridge's app has (it sends by
# name: none).
IMPORT_ALL_OF_BRIDGE = """
import importlib, json, pkgutil, sys
import bridge
names = sorted(info.name for info in pkgutil.walk_packages(bridge.__path__, "bridge."))
for name in names:
    importlib.import_module(name)
from bridge.celery_app import create_celery_app
from bridge.config import Settings
app = create_celery_app(Settings.from_env({}, dotenv=False))
loaded = sorted(m for m in sys.modules if m == "tasks" or m.startswith("tasks."))
registered = sorted(t for t in app.tasks if not t.startswith("celery."))
print(json.dumps({"imported": names, "tasks": loaded, "registered": registered}))
"""


def python(code: str, env: Mapping[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter of this venv, from an empty directory (no `.env`
    is read), with the repository importable; its stdout."""
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env.update(env or {})
    run_env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd="/", env=run_env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------- the bridge


def test_the_bridge_process_loads_no_worker_code() -> None:
    """Importing every bridge module (the CLI, `run`, the engine, the publisher, the
    stores...) loads no `tasks` module: no handler, task or signal receiver."""
    found = json.loads(python(IMPORT_ALL_OF_BRIDGE))
    assert {"bridge.cli", "bridge.commands.run", "bridge.commands.status", "bridge.engine",
            "bridge.publisher", "bridge.celery_app", "bridge.store.postgres",
            "bridge.store.supabase"} <= set(found["imported"])
    assert found["tasks"] == []
    assert found["registered"] == []


def imports_of(path: Path) -> list[str]:
    """Every module an `import` statement of this file names, wherever the statement is
    (a function's lazy import and an `if TYPE_CHECKING:` one count too). `from p import
    x` names `p.x` when that is a module of ours, else `p`."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.append(sub if module_path(sub) is not None else node.module)
    return names


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (explicit statements only: a
    submodule's implicit import of its parent package is not an edge)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        name = module_name(path)
        graph[name] = {m for m in imports_of(path)
                       if (m == package or m.startswith(package + ".")) and m != name}
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    """So the check below cannot pass by missing one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_bridge_modules() -> None:
    """Counting lazy (in-function) and TYPE_CHECKING imports too: bridge/agents.py and
    bridge/config.py imported each other; now config imports agents, never the reverse."""
    graph = import_graph("bridge")
    assert "bridge.agents" in graph["bridge.config"]  # the graph is read, not empty
    assert "bridge.commands.status" in graph["bridge.commands.check"]  # `from p import mod`
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_import_cycle_between_tasks_modules() -> None:
    """The worker's side too: `tasks/__init__.py` wires the modules together, and none of
    them imports a module that imports it back."""
    graph = import_graph("tasks")
    assert "tasks.cancellation.watcher" in graph["tasks.runtime"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_bridge_module_imports_tasks() -> None:
    """Not even lazily inside a function (which the import test above cannot see)."""
    found = {module_name(path): [m for m in imports_of(path) if m.split(".")[0] == "tasks"]
             for path in sorted((REPO / "bridge").rglob("*.py"))}
    assert {name: mods for name, mods in found.items() if mods} == {}


# --------------------------------------------------------------------------- one factory


def test_the_worker_app_is_the_factorys_app_with_the_tasks_registered() -> None:
    """`celery -A tasks` resolves the app as celery.app.utils.find_app does: it finds
    the tasks by the names the bridge sends, on an app configured by the same factory."""
    found = json.loads(python(
        "import json\nfrom celery.app.utils import find_app\napp = find_app('tasks')\n"
        "print(json.dumps({'main': app.main, 'tasks': sorted(app.tasks),"
        " 'queues': sorted(q.name for q in app.conf.task_queues),"
        " 'acks_late': app.conf.task_acks_late, 'serializer': app.conf.task_serializer,"
        " 'broker': app.conf.broker_url}))",
        {"REDIS_URL": "redis://wiring.invalid:6379/3", "CELERY_QUEUE": "wired",
         "AGENTS": "chat=tasks.handlers.simulated:process_task"}))
    assert found["main"] == "agent_bridge"
    assert {RUN_AGENT, REQUEUE_FAILED} <= set(found["tasks"])
    assert found["queues"] == ["wired", "wired.chat"]
    assert found["acks_late"] is True and found["serializer"] == "json"
    assert found["broker"] == "redis://wiring.invalid:6379/3"


def test_bridge_and_worker_apps_share_one_configuration() -> None:
    import tasks
    from tasks.app import app, settings

    expected = celery_config(settings)
    for app_ in (app, create_celery_app(settings)):
        for key, value in expected.items():
            if key == "task_queues":
                assert [q.name for q in app_.conf.task_queues] == [q.name for q in value]
            else:
                assert app_.conf[key] == value, key
    assert tasks.app is app  # `from tasks import app`: the worker's app
    assert (tasks.run_agent.name, tasks.requeue_failed.name) == (RUN_AGENT, REQUEUE_FAILED)
    assert {RUN_AGENT, REQUEUE_FAILED} <= set(app.tasks)


@pytest.mark.parametrize("module, names", [
    ("tasks", ["AgentBridgeError", "Cancelled", "InvalidPayload", "RetryableError", "app",
               "cancelled", "current_agent", "report_progress", "report_progress_async",
               "requeue_failed", "run_agent", "revoke"]),
    ("tasks.app", ["RUN_AGENT", "app", "celery_config", "load_settings", "settings"]),
    ("tasks.cancellation", ["Cancelled", "CancelScope", "bind", "cancelled",
                            "cancels_current_task", "raise_if_cancelled", "unbind"]),
    ("tasks.cancellation.watcher", ["CancelWatcher"]),
    ("tasks.cancellation.revoke", ["RevokedScan", "cancel_job", "job_attempt"]),
    ("bridge.config", ["ConfigError", "Settings", "parse_bool", "parse_float"]),
])
def test_names_other_code_imports_are_still_there(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    assert [n for n in names if not hasattr(mod, n)] == []


def test_cancellation_lives_in_one_package() -> None:
    """tasks/cancellation/: the scope (its __init__), the watcher and the revoke hooks."""
    import tasks

    assert sorted(p.name for p in (REPO / "tasks" / "cancellation").glob("*.py")) == [
        "__init__.py", "revoke.py", "watcher.py"]
    assert not any((REPO / "tasks" / f).exists()
                   for f in ("cancel_watcher.py", "revoke.py", "cancel"))
    assert tasks.revoke is importlib.import_module("tasks.cancellation.revoke")
