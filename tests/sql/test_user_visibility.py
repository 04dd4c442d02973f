"""What a signed-in user can learn that is not theirs (issue 20, items 4 and 6).

As Supabase's roles, through the real database; Realtime events through the Realtime
stand-in (tests/fakes/realtime.py, which sends DELETEs as walrus' apply_rls does: the
replica identity columns the role may select, the primary key's only when RLS is on, to
every subscriber, RLS not applied).

- A DELETE event (a streamed attempt's chunks going, retention deleting a row) carries
  nothing identifying: no task id, attempt or user, to anyone.
- The `worker` column (host:pid) and `agent_tenant_limits.note` are the operator's: users
  cannot select them, through SQL, PostgREST or Realtime (nor filter on them).

A row's error message and the worker's log, with a real worker:
tests/acceptance/test_errors_and_logs.py.
"""

from __future__ import annotations

import uuid

import pytest
from psycopg import errors

from tests.db import as_role, sql

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
