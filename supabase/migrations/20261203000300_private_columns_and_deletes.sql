-- agent-bridge: what a signed-in user can learn that is not theirs (issue 20). Idempotent.
--
-- 1. DELETE events that carry nothing identifying.
--
-- Supabase Realtime (walrus' realtime.apply_rls) cannot check a deleted row against RLS, so
-- it sends every DELETE of a published table to every subscriber whose filters pass (a
-- subscriber without a filter always passes). Its old_record is what wal2json sends as the
-- row's `identity`, i.e. the table's REPLICA IDENTITY columns, keeping those the
-- subscriber's role may select and, on a table with RLS on, only primary key columns.
-- Before: the replica identity was the primary key, so every signed-in user subscribed to
-- agent_task_chunks without a filter got (task_id, attempt, seq) of every user's chunks
-- each time an attempt ended (task ids, attempt counts, chunk counts, finish times), and
-- the id of every task row deleted (retention).
--
-- Now each published table's replica identity is a unique index on a column of its own,
-- `replica_key`: it is not a primary key column (so apply_rls leaves it out of a DELETE on
-- an RLS table) and no API role may select it (so it would stay out with RLS off too). A
-- DELETE event now says that some row of the table went, and when; not whose or which.
-- (A subscriber filtering on task_id / id gets no DELETE event at all: Realtime matches a
-- DELETE's filters against the identity columns. agent-bridge's clients never needed one.)
-- UPDATE events keep working: their old_record (the identity's selectable columns) is {}
-- for users instead of {id}; the new record is unchanged.
--
-- 2. Private columns. `agent_task_requests.worker` (host:pid:run of the worker holding the
-- task) and `agent_tenant_limits.note` (the operator's words) are the operator's: users get
-- SELECT on every other column instead of on the table. A role with column grants only
-- cannot `select *` (PostgREST `select=*` answers 403, SQLSTATE 42501) and Realtime drops
-- the columns it may not select from every event (and refuses a filter on them), so
-- readers as a user name their columns (clients/js does). A column added to one of these
-- tables by a later migration is private until that migration grants it.

-- 1. The replica identity keys --------------------------------------------------------------

-- `generated always as identity`: every row has one without a writer naming it. Adding it
-- to a table that holds rows rewrites the table once (a value per row), under an ACCESS
-- EXCLUSIVE lock; on a large agent_task_requests, run this migration in a quiet moment.
-- Each insert then writes one more 8-byte value and one more index entry.
alter table public.agent_task_requests
    add column if not exists replica_key bigint generated always as identity;
alter table public.agent_task_chunks
    add column if not exists replica_key bigint generated always as identity;

comment on column public.agent_task_requests.replica_key is
    'agent-bridge: the row''s replica identity (what a Realtime DELETE event would carry), '
    'so that it is not the task id; private to the service.';
comment on column public.agent_task_chunks.replica_key is
    'agent-bridge: the row''s replica identity (what a Realtime DELETE event would carry), '
    'so that it is not (task_id, attempt, seq); private to the service.';

create unique index if not exists agent_task_requests_replica_key_idx
    on public.agent_task_requests (replica_key);
create unique index if not exists agent_task_chunks_replica_key_idx
    on public.agent_task_chunks (replica_key);

-- (An ALTER that changes nothing still takes its lock: only where it is not set yet.)
do $$
declare
    t text;
begin
    foreach t in array array['agent_task_requests', 'agent_task_chunks'] loop
        if not exists (select 1 from pg_index i
                        where i.indrelid = format('public.%I', t)::regclass
                          and i.indexrelid = format('public.%I', t || '_replica_key_idx')::regclass
                          and i.indisreplident) then
            execute format('alter table public.%I replica identity using index %I',
                           t, t || '_replica_key_idx');
        end if;
    end loop;
end
$$;

-- 2. Column privileges: everything but the private columns ---------------------------------

-- Revoking the table's SELECT revokes its column grants too; then every column but the
-- private ones is granted again, as it is now (columns of earlier migrations included).
do $$
declare
    t record;
    v_columns text;
begin
    for t in select * from (values
            ('agent_task_requests', array['worker', 'replica_key']),
            ('agent_task_chunks', array['replica_key']),
            ('agent_tenant_limits', array['note'])) as x(name, private) loop
        execute format('revoke select on table public.%I from public, anon, authenticated',
                       t.name);
        select string_agg(quote_ident(a.attname), ', ' order by a.attnum) into v_columns
          from pg_attribute a
         where a.attrelid = format('public.%I', t.name)::regclass
           and a.attnum > 0 and not a.attisdropped and a.attname <> all (t.private);
        execute format('grant select (%s) on table public.%I to authenticated',
                       v_columns, t.name);
    end loop;
end
$$;

-- PostgREST caches the columns it may return (see 20261130000900_reload_schema.sql).
notify pgrst, 'reload schema';
