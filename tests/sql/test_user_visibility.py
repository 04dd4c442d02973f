"""What a signed-in user can learn that is not theirs (issue 20, items 4 and 6).

As Supabase's roles, through the real database; Realtime events through the Realtime
stand-in (tests/fakes/realtime.py, which sends DELETEs as walrus' apply_rls does: the
replica identity columns the role may select, the primary key's only when RLS is on, to
every subscriber, RLS not applied); the worker's errors and logs through a real worker.

- A DELETE event (a streamed attempt's chunks going, retention deleting a row) carries
  nothing identifying: no task id, attempt or user, to anyone.
- The `worker` column (host:pid) and `agent_tenant_limits.note` are the operator's: users
  cannot select them, through SQL, PostgREST or Realtime (nor filter on them).
- A row's error message is classified (`provider unreachable`, ...) with no address or OS
  error in it; the worker's log keeps the detail.
- A prompt (or an error's text) cannot forge a log line.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import errors

from tests.db import as_role, insert_task, sql
from tests.stack import Stack
from tests.visibility_handlers import INTERNAL

TASKS, CHUNKS = "agent_task_requests", "agent_task_chunks"






# --------------------------------------------------------------------------- Realtime









def test_every_published_table_deletes_anonymously(clean_db: str) -> None:
    """The rule for every table users can subscribe to (today's and any added later): what
    apply_rls puts in a DELETE's old_record for `anon` and `authenticated` (the replica
    identity's columns the role may select; with RLS on, only primary key columns) is empty."""
    leaks = sql(clean_db, """
        select r.role, c.relname, a.attname
          from pg_publication_tables p
          join pg_class c on c.oid = format('%I.%I', p.schemaname, p.tablename)::regclass
          join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
          left join pg_index pk on pk.indrelid = c.oid and pk.indisprimary
          left join pg_index ri on ri.indrelid = c.oid and ri.indisreplident
          cross join (values ('anon'), ('authenticated')) r(role)
         where p.pubname = 'supabase_realtime'
           and case c.relreplident
                   when 'f' then true
                   when 'd' then coalesce(a.attnum = any (pk.indkey::int2[]), false)
                   when 'i' then coalesce(a.attnum = any (ri.indkey::int2[]), false)
                   else false end
           and has_column_privilege(r.role, c.oid, a.attnum, 'SELECT')
           and (not c.relrowsecurity or coalesce(a.attnum = any (pk.indkey::int2[]), false))
         order by 1, 2, 3""")
    published = {t for (t,) in sql(clean_db, "select tablename from pg_publication_tables "
                                             "where pubname = 'supabase_realtime'")}
    assert {TASKS, CHUNKS} <= published
    assert leaks == []







def test_users_never_see_the_operators_note(clean_db: str) -> None:
    """Before: every user read the '*' row's note (the operator's words about limits)."""
    with as_role(clean_db, "authenticated", str(uuid.uuid4())) as conn:
        with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
            conn.execute("select note from public.agent_tenant_limits")
        rows = conn.execute("select tenant, max_active, min_priority, max_priority, "
                            "run_at_horizon, max_processing from public.agent_tenant_limits"
                            ).fetchall()
    assert [r[0] for r in rows] == ["*"]  # the limits themselves stay readable


# --------------------------------------------------------------------------- errors and logs

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def leaky_stack(clean_db: str, clean_redis: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(clean_db, clean_redis, tmp_path, AGENT_HANDLER="tests.visibility_handlers:leaky",
              AGENT_MAX_RETRIES="0", OPENAI_API_KEY="sk-test-0123456789abcdef",
              OPENAI_MODEL="m", LOG_LEVEL="DEBUG")
    try:
        yield s
    finally:
        s.stop_all()


def test_error_messages_are_classified_for_users(leaky_stack: Stack) -> None:
    """Before: error.message was the exception's text: `could not reach the OpenAI-compatible
    API at http://127.0.0.1:PORT: [Errno 111] Connection refused`, a handler's URLs and IPs."""
    port = closed_port()
    leaky_stack.env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    leaky_stack.worker()
    leaky_stack.bridge()
    expected = {  # kind -> (error.type, error.message)
        "socket": ("ConnectionRefusedError", "provider unreachable"),
        "urlopen": ("URLError", "provider unreachable"),
        "timeout": ("TimeoutError", "provider timed out"),
        "wrapped": ("RuntimeError", "upstream <address> said no (reset by peer at <address>)"),
        "openai": ("RetryableError", "provider unreachable (gave up after 0 retries)"),
    }
    ids = {insert_task(leaky_stack.db_url, {"prompt": "hi", "context": {"kind": k, "port": port}}
                       ): k for k in expected}
    rows = {str(r["id"]): r for r in leaky_stack.wait_all_done()}
    for task_id, kind in ids.items():
        row = rows[task_id]
        assert row["status"] == "failed"
        assert (row["error"]["type"], row["error"]["message"]) == expected[kind], kind
        assert row["response_payload"] == {"error": expected[kind][1]}
        assert not re.search(r"127\.0\.0\.1|10\.20\.30\.40|Errno", row["error"]["message"])
    # The operator's log keeps what happened, and where.
    logs = leaky_stack.logs()
    assert f"127.0.0.1:{port}" in logs and "Connection refused" in logs
    assert f"http://{INTERNAL}/v1/chat said no" in logs


def test_a_prompt_cannot_forge_log_lines(clean_db: str, clean_redis: str, tmp_path: Path
                                         ) -> None:
    """Before: the prompt was logged verbatim at DEBUG (and an error's text at WARNING), so a
    newline in it started a line of the user's choosing."""
    forged = "❌ Task 00000000-0000-0000-0000-000000000000 failed: Forged: by a user"
    stack = Stack(clean_db, clean_redis, tmp_path, LOG_LEVEL="DEBUG")
    try:
        stack.worker()
        stack.bridge()
        insert_task(clean_db, {"prompt": f"hi\n{forged}\r\x1b[2K\u2028"})
        insert_task(clean_db, {"prompt": "p", "context": {"raise": f"boom\n{forged}"}})
        stack.wait_all_done()
        logs = stack.logs()
    finally:
        stack.stop_all()
    assert "User asking: hi\\n❌ Task 00000000" in logs  # logged, escaped, on its own line
    assert "failed: ValueError: boom\\n❌ Task 00000000" in logs
    assert not [line for line in logs.splitlines() if line.startswith(forged[:12])]
    assert "\x1b" not in logs and "\u2028" not in logs and "\r" not in logs
