"""The schema as pg_dump prints it, and the guide's original table, for migration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

# The integration guide's table, exactly as users created it before agent-bridge.
GUIDE_TABLE = (Path(__file__).parent / "guide_table.sql").read_text(encoding="utf-8")


def schema_dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {name: conn.execute(q).fetchall()
                for name, q in SCHEMA_QUERIES.items()}





# Everything a migration run could change, as plain comparable rows.
SCHEMA_QUERIES = {
    "columns": """select table_schema, table_name, column_name, data_type, column_default,
                         is_nullable from information_schema.columns
                   where table_schema in ('public', 'auth') order by 1, 2, 3""",
    "functions": """select p.oid::regprocedure::text, pg_get_functiondef(p.oid),
                           array(select a::text from unnest(p.proacl) a order by 1)
                      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                     where n.nspname in ('public', 'auth') order by 1""",
    "policies": """select policyname, cmd, roles::text, qual, with_check from pg_policies
                    where tablename = 'agent_task_requests' order by 1""",
    "table_grants": """select grantee, privilege_type from information_schema.role_table_grants
                        where table_name = 'agent_task_requests' order by 1, 2""",
    "column_grants": """select grantee, column_name, privilege_type
                          from information_schema.column_privileges
                         where table_name = 'agent_task_requests' order by 1, 2, 3""",
    "constraints": """select conname, pg_get_constraintdef(oid) from pg_constraint
                       where conrelid = 'public.agent_task_requests'::regclass order by 1""",
    "indexes": """select indexname, indexdef from pg_indexes
                   where tablename = 'agent_task_requests' order by 1""",
    "triggers": """select tgname, pg_get_triggerdef(oid) from pg_trigger
                    where tgrelid = 'public.agent_task_requests'::regclass
                      and not tgisinternal order by 1""",
    "types": """select a.attname, format_type(a.atttypid, a.atttypmod) from pg_attribute a
                 where a.attrelid = 'public.agent_task_write'::regclass order by a.attnum""",
    "rls": """select relrowsecurity, relforcerowsecurity from pg_class
               where oid = 'public.agent_task_requests'::regclass""",
    "publications": "select pubname, schemaname, tablename from pg_publication_tables order by 1",
    "roles": """select rolname, rolinherit, rolbypassrls, rolcanlogin from pg_roles
                 where rolname in ('anon', 'authenticated', 'service_role') order by 1""",
}

