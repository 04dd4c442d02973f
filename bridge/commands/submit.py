"""`agent-bridge submit`: insert a task request (as the frontend does); --wait or
--follow follows it.

Insert a pending row {prompt, context} into agent_task_requests and print its id. With
--wait, print each status change until the task ends, then the answer; with --follow,
print the answer as it streams in. Exit codes with --wait or --follow: 0 completed, 1
failed, 2 timed out; without it: 0, or 1 when the task was stored failed (a payload over
the size or depth limit).

With --idempotency-key, a second submit with the same key (and agent) stores nothing: it
prints the id of the task that has the key, says so on stderr, and --wait or --follow
follow that task. The CLI inserts as the service, without a user: its keys are unique per
agent among the rows without user_id (a user's keys are their own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bridge.commands.parsers import Subparsers, add_command
from bridge.config import ConfigError, Settings
from bridge.errors import StoreRejected, StoreUnavailable
from bridge.store import TaskStore, open_store, request_payload

EXIT_COMPLETED, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2
POSTGRES_POLL = 0.2  # seconds between two reads of the row while waiting (Postgres mode)
ICONS = {"pending": "⏳", "processing": "⚙️ ", "completed": "✅", "failed": "❌"}


def register(sub: Subparsers) -> None:
    p = add_command(sub, "submit", run, __doc__)
    p.add_argument("prompt", nargs="?",
                   help="the request_payload.prompt; `-` reads it from stdin")
    p.add_argument("--file", "-f", type=Path, metavar="PATH",
                   help="read the prompt from this file (UTF-8), e.g. one too long for "
                        "the command line")
    p.add_argument("--context", metavar="JSON", default="{}",
                   help="request_payload.context, a JSON object (default: {})")
    p.add_argument("--priority", type=int, default=0, metavar="N",
                   help="higher runs first (default: 0)")
    p.add_argument("--agent", default="default", metavar="NAME",
                   help="the agent that runs it, one of AGENTS (default: default)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="submit at most once per KEY and agent (1 to 200 characters): "
                        "with a key in use, follow the task that has it")
    p.add_argument("--wait", action="store_true",
                   help="follow the row until it completes or fails")
    p.add_argument("--follow", action="store_true",
                   help="print the answer as it streams in, then the final answer (status "
                        "changes go to stderr); exit codes as with --wait")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --wait or --follow: give up after S seconds (default: 300)")


def parse_context(raw: str) -> dict[str, Any]:
    try:
        context = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--context is not valid JSON: {exc}") from None
    if not isinstance(context, dict):
        raise ConfigError(f"--context must be a JSON object such as '{{\"k\": 1}}', "
                          f"got {type(context).__name__}")
    return context


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the argument, stdin (`-`) or --file."""
    if args.file is not None and args.prompt is not None:
        raise ConfigError("give the prompt as an argument or with --file, not both")
    if args.file is not None:
        try:
            prompt = str(args.file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --file {args.file}: {exc}") from None
    elif args.prompt == "-":
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"stdin is not UTF-8 text: {exc}") from None
    elif args.prompt is None:
        raise ConfigError("no prompt: give it as an argument, `-` to read stdin, or --file")
    else:
        prompt = str(args.prompt)
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    return prompt


def run(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    prompt = read_prompt(args)
    settings = Settings.from_env()
    store = open_store(settings, pool=False)
    try:
        task_id = insert_once(store, request_payload(prompt, context), args.priority,
                              args.agent, args.idempotency_key)
        print(task_id, flush=True)
        if not (args.wait or args.follow):
            return failed_at_insert(store, task_id)
        interval = poll_interval(settings)
        if args.follow:
            return follow_answer(store, task_id, args.timeout, interval)
        return follow(store, task_id, args.timeout, interval)
    finally:
        store.close()


def insert_once(store: TaskStore, payload: dict[str, Any], priority: int, agent: str,
                key: str | None) -> str:
    """Insert the row; with a key already used (23505), the id of the row that has it.
    A row deleted between the refusal and the read (a prune) frees its key: insert again."""
    if key is not None and not 1 <= len(key) <= 200:
        raise ConfigError(f"--idempotency-key must be 1 to 200 characters long, got {len(key)}")
    for _ in range(3):
        try:
            return store.insert(payload, priority, agent, idempotency_key=key)
        except StoreRejected as exc:
            if key is None or exc.code != "23505":
                raise
        existing = store.keyed_task(agent, key)
        if existing is not None:
            print(f"task {existing} already has idempotency key {key!r} (agent {agent}): "
                  f"nothing submitted; that task is the one", file=sys.stderr, flush=True)
            return existing
    raise StoreRejected(f"idempotency key {key!r} is in use but its task cannot be read", "23505")


def poll_interval(settings: Settings) -> float:
    """How often --wait and --follow read the row."""
    return POSTGRES_POLL if settings.store_kind == "postgres" \
        else max(0.2, settings.poll_interval)


def failed_at_insert(store: TaskStore, task_id: str) -> int:
    """A payload over the size or depth limit is stored already failed (InvalidRequest)
    rather than refused, so the insert succeeds: say why and exit as --wait would."""
    row = store.get(task_id)
    if row is not None and row["status"] == "failed":
        print(error_of(row.get("error"), row.get("response_payload")), file=sys.stderr)
        return EXIT_FAILED
    return 0


def follow(store: TaskStore, task_id: str, timeout: float, interval: float) -> int:
    """Print each (status, attempt) change with a timestamp until the row ends."""
    deadline = time.monotonic() + timeout
    seen: tuple[str, int] | None = None
    outage = False
    row: dict[str, Any] | None = None
    while True:
        try:
            row = store.get(task_id)
        except StoreUnavailable as exc:
            if not outage:
                print(f"⚠️  {exc} (still waiting)", file=sys.stderr, flush=True)
            outage = True
        else:
            outage = False
            if row is None:
                print(f"❌ task {task_id} no longer exists", file=sys.stderr)
                return EXIT_FAILED
            state = (str(row["status"]), int(row["attempts"] or 0))
            if state != seen:
                seen = state
                print(_status_line(*state), flush=True)
            if state[0] == "completed":
                print(answer_of(row.get("response_payload")))
                return EXIT_COMPLETED
            if state[0] == "failed":
                print(error_of(row.get("error"), row.get("response_payload")), file=sys.stderr)
                return EXIT_FAILED
        if time.monotonic() >= deadline:
            status = seen[0] if seen else "unknown"
            print(f"⌛ gave up waiting after {timeout:g}s; the task is still {status}. "
                  f"Follow it with `agent-bridge status`, or look at row {task_id}.",
                  file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def follow_answer(store: TaskStore, task_id: str, timeout: float, interval: float) -> int:
    """Print the answer as it streams in (the text added since the last look, read
    through the store: the attempt's chunks, else the row's partial answer), status
    changes on stderr, and at the end the rest of the final answer, or the error."""
    deadline = time.monotonic() + timeout
    shown = ""  # the answer printed so far (on the current stdout line)
    seen: tuple[str, int] | None = None
    outage = False

    def say(line: str) -> None:  # a line on stderr, after ending the answer's line
        if shown:
            print(flush=True)
        print(line, file=sys.stderr, flush=True)

    while True:
        try:
            row = store.get(task_id)
            partial = (store.streamed_answer(task_id, int(row["attempts"] or 0))
                       if row is not None and row["status"] == "processing" else None)
        except StoreUnavailable as exc:
            if not outage:
                say(f"⚠️  {exc} (still waiting)")
                shown = ""
            outage = True
        else:
            outage = False
            if row is None:
                say(f"❌ task {task_id} no longer exists")
                return EXIT_FAILED
            state = (str(row["status"]), int(row["attempts"] or 0))
            response = row.get("response_payload")
            if state != seen:
                if seen is not None and state[0] not in ("completed", "failed"):
                    say(_status_line(*state))
                    shown = ""  # a new attempt streams its answer from the start
                elif seen is None:
                    print(_status_line(*state), file=sys.stderr, flush=True)
                seen = state
            if state[0] == "completed":
                final = answer_of(response)
                if shown and not final.startswith(shown):
                    print(flush=True)
                    shown = ""
                print(final[len(shown):], flush=True)
                return EXIT_COMPLETED
            if state[0] == "failed":
                say(error_of(row.get("error"), response))
                return EXIT_FAILED
            if partial is None and isinstance(response, dict) and response.get("partial"):
                partial = answer_of(response)
            if partial and partial != shown and not shown.startswith(partial):
                if not partial.startswith(shown):  # rewritten: start the line again
                    print(flush=True)
                    shown = ""
                print(partial[len(shown):], end="", flush=True)
                shown = partial
        if time.monotonic() >= deadline:
            status = seen[0] if seen else "unknown"
            say(f"⌛ gave up waiting after {timeout:g}s; the task is still {status}. "
                f"Follow it with `agent-bridge show --follow {task_id}`.")
            return EXIT_TIMEOUT
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def _status_line(status: str, attempt: int) -> str:
    stamp = datetime.now().astimezone().strftime("%H:%M:%S")
    icon = ICONS.get(status, "•")
    detail = f" (attempt {attempt})" if status == "processing" and attempt else ""
    return f"[{stamp}] {icon} {status}{detail}"


def answer_of(response: Any) -> str:
    """response_payload.answer, or the whole payload as JSON when it has none."""
    if isinstance(response, dict) and isinstance(response.get("answer"), str):
        return str(response["answer"])
    return json.dumps(response, ensure_ascii=False)


def error_of(error: Any, response: Any) -> str:
    """`type: message` from the row's error, else the frontend's response_payload.error."""
    if isinstance(error, dict) and error.get("message") is not None:
        kind = error.get("type") or "Error"
        return f"{kind}: {error['message']}"
    if isinstance(response, dict) and response.get("error"):
        return f"Error: {response['error']}"
    return "Error: the task failed without an error message"
