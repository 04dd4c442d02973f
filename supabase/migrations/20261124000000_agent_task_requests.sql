-- agent-bridge: the agent_task_requests table and its state machine.
--
-- Idempotent: safe to run again, and safe on a database that already holds the
-- integration guide's original table with rows in it (pending rows stay pending
-- and are picked up after the upgrade). Every status change goes through one of
-- the functions below; nothing else writes `status` (except, during an upgrade,
-- the guide's old worker: see agent_task_requests_touch).
--
--   pending ──claim──▶ processing ──complete──▶ completed
--      ▲                   │  │ ──fail─────────▶ failed ──requeue──▶ pending
--      └──release/rescue───┘  └─schedule_retry (stays processing)
--
-- Fencing: every claim increments `attempts`; a worker passes (attempt, worker)
-- with every later write, and a write whose pair no longer matches the row
-- changes nothing and returns applied = false.

-- 1. The table (the guide's columns, types and four statuses, unchanged) ---------

create table if not exists public.agent_task_requests (
    id uuid primary key default gen_random_uuid(),
    status varchar(50) not null default 'pending'
        check (status in ('pending', 'processing', 'completed', 'failed')),
    request_payload jsonb not null default '{}'::jsonb,
    response_payload jsonb default null,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);

alter table public.agent_task_requests
    add column if not exists attempts integer not null default 0,
    add column if not exists max_attempts integer not null default 3,
    add column if not exists priority integer not null default 0,
    add column if not exists run_at timestamptz not null default now(),
    add column if not exists lease_expires_at timestamptz,
    add column if not exists started_at timestamptz,
    add column if not exists finished_at timestamptz,
    add column if not exists worker text,
    add column if not exists error jsonb,
    add column if not exists user_id uuid default auth.uid(),
    add column if not exists enterprise_id text;

-- Rows finished before the upgrade get a finish time, so the constraint below holds.
update public.agent_task_requests
   set finished_at = coalesce(updated_at, created_at, now())
 where status in ('completed', 'failed') and finished_at is null;

-- Rows an old worker left in 'processing' get a short lease: if that worker is
-- still alive it may finish them; otherwise rescue returns them to pending.
update public.agent_task_requests
   set lease_expires_at = now() + interval '5 minutes'
 where status = 'processing' and lease_expires_at is null;

do $$
begin
    if not exists (select 1 from pg_constraint
                    where conname = 'agent_task_requests_attempts_check') then
        alter table public.agent_task_requests
            add constraint agent_task_requests_attempts_check
            check (attempts >= 0 and max_attempts >= 1);
    end if;
    if not exists (select 1 from pg_constraint
                    where conname = 'agent_task_requests_finished_check') then
        alter table public.agent_task_requests
            add constraint agent_task_requests_finished_check
            check ((status in ('completed', 'failed')) = (finished_at is not null));
    end if;
    if not exists (select 1 from pg_constraint
                    where conname = 'agent_task_requests_lease_check') then
        alter table public.agent_task_requests
            add constraint agent_task_requests_lease_check
            check (status = 'processing' or lease_expires_at is null);
    end if;
end
$$;

-- The claim query reads this index in order and stops after `limit` rows.
create index if not exists agent_task_requests_claim_idx
    on public.agent_task_requests (priority desc, run_at, created_at)
    where status = 'pending';

-- Rescue scans only rows that hold a lease.
create index if not exists agent_task_requests_lease_idx
    on public.agent_task_requests (lease_expires_at)
    where status = 'processing';

create index if not exists agent_task_requests_user_idx
    on public.agent_task_requests (user_id);

-- 2. Triggers: input checks, updated_at, wake-ups --------------------------------

-- The request size limit; change it with
--   alter database postgres set agent_bridge.max_request_bytes = '2097152';
create or replace function public.agent_task_requests_check_request()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
    max_bytes bigint := coalesce(
        nullif(current_setting('agent_bridge.max_request_bytes', true), '')::bigint,
        1048576);
    size_bytes bigint;
begin
    if new.request_payload is null or jsonb_typeof(new.request_payload) <> 'object' then
        raise exception 'request_payload must be a JSON object such as {"prompt": "..."}, got %',
            coalesce(jsonb_typeof(new.request_payload), 'null')
            using errcode = '22023';
    end if;
    size_bytes := octet_length(new.request_payload::text);
    if size_bytes > max_bytes then
        -- 22001 (value too long), not 54000: PostgREST answers 54xxx with a 500,
        -- but an oversized request is the caller's mistake (400).
        raise exception 'request_payload is % bytes; the limit is % bytes', size_bytes, max_bytes
            using errcode = '22001',
                  hint = 'Raise agent_bridge.max_request_bytes or send a reference instead of the data.';
    end if;
    return new;
end
$$;

drop trigger if exists agent_task_requests_check_request on public.agent_task_requests;
create trigger agent_task_requests_check_request
    before insert or update of request_payload on public.agent_task_requests
    for each row execute function public.agent_task_requests_check_request();

-- Also keeps finished_at and the lease in step with a status that a writer from before
-- the upgrade (the guide's own worker, setting status alone) changed: without this its
-- updates would break the constraints above while old and new workers overlap. The
-- state functions below set both themselves, so for them this changes nothing.
create or replace function public.agent_task_requests_touch()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    new.updated_at := now();
    if new.status is distinct from old.status then
        new.finished_at := case when new.status in ('completed', 'failed')
                                then coalesce(new.finished_at, now()) end;
        new.lease_expires_at := case when new.status = 'processing'
                                     then coalesce(new.lease_expires_at,
                                                   now() + interval '5 minutes') end;
    end if;
    return new;
end
$$;

drop trigger if exists agent_task_requests_touch on public.agent_task_requests;
create trigger agent_task_requests_touch
    before update on public.agent_task_requests
    for each row execute function public.agent_task_requests_touch();

-- A row that becomes pending wakes a LISTENing bridge at once. The payload is the
-- row id only; listeners claim through agent_tasks_claim as usual.
create or replace function public.agent_task_requests_notify()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    if new.status = 'pending' then
        perform pg_notify('agent_task_requests', new.id::text);
    end if;
    return null;
end
$$;

drop trigger if exists agent_task_requests_notify on public.agent_task_requests;
create trigger agent_task_requests_notify
    after insert or update of status on public.agent_task_requests
    for each row execute function public.agent_task_requests_notify();

-- 3. State functions: the only way status changes --------------------------------

-- The result every fenced write returns: whether it applied, and the row as it is
-- now, so a refused caller can say why (newer attempt, already finished, ...).
-- (Dropping and re-creating a type would cascade to the functions, so it is
-- created once.)
do $$
begin
    if not exists (select 1 from pg_type t join pg_namespace n on n.oid = t.typnamespace
                    where n.nspname = 'public' and t.typname = 'agent_task_write') then
        create type public.agent_task_write as (
            applied boolean,
            status text,
            attempts integer,
            worker text
        );
    end if;
end
$$;

-- Claim up to p_limit due pending rows: highest priority first, then oldest run_at.
-- Each claimed row's attempts goes up by one; that number fences every later write.
create or replace function public.agent_tasks_claim(p_limit integer, p_lease_seconds double precision)
returns table (id uuid, attempt integer)
language sql
volatile
security invoker
set search_path = ''
as $$
    with due as (
        select t.id
          from public.agent_task_requests t
         where t.status = 'pending' and t.run_at <= now()
         order by t.priority desc, t.run_at, t.created_at
         limit greatest(p_limit, 0)
           for update skip locked
    )
    update public.agent_task_requests t
       set status = 'processing',
           attempts = t.attempts + 1,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           worker = null,
           started_at = null
      from due
     where t.id = due.id
    returning t.id, t.attempts;
$$;

-- A worker starts (or, after a Celery retry, restarts) its attempt. Refused when the
-- attempt is stale, or when another live worker already holds this attempt (a
-- duplicate broker delivery). Returns the payload the worker needs.
-- (20261130000200_agents.sql adds the row's `agent` to what it returns; a changed
-- return type cannot be replaced, so every run drops it first.)
drop function if exists public.agent_task_start(uuid, integer, text, double precision);
create or replace function public.agent_task_start(
    p_id uuid, p_attempt integer, p_worker text, p_lease_seconds double precision)
returns table (
    applied boolean, status text, attempts integer, worker text,
    request_payload jsonb, max_attempts integer, priority integer,
    user_id uuid, enterprise_id text, created_at timestamptz)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
declare
    r public.agent_task_requests;
begin
    update public.agent_task_requests t
       set worker = p_worker,
           started_at = coalesce(t.started_at, now()),
           lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where t.id = p_id
       and t.status = 'processing'
       and t.attempts = p_attempt
       and (t.worker is null or t.worker = p_worker or t.lease_expires_at < now())
    returning t.* into r;
    if found then
        return query select true, r.status::text, r.attempts, r.worker,
            r.request_payload, r.max_attempts, r.priority,
            r.user_id, r.enterprise_id, r.created_at;
    else
        return query select false, t.status::text, t.attempts, t.worker,
            null::jsonb, t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at
          from public.agent_task_requests t where t.id = p_id;
    end if;
end
$$;

-- The row as a fenced write found it, for refused writes.
create or replace function public.agent_task_current(p_id uuid)
returns setof public.agent_task_write
language sql
stable
security invoker
set search_path = ''
as $$
    select false, t.status::text, t.attempts, t.worker
      from public.agent_task_requests t where t.id = p_id;
$$;

-- The holder of an attempt renews its lease while its handler runs.
create or replace function public.agent_task_heartbeat(
    p_id uuid, p_attempt integer, p_worker text, p_lease_seconds double precision)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- Partial output while the handler streams; the final complete replaces it.
create or replace function public.agent_task_progress(
    p_id uuid, p_attempt integer, p_worker text, p_response jsonb)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set response_payload = p_response
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

create or replace function public.agent_task_complete(
    p_id uuid, p_attempt integer, p_worker text, p_response jsonb)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set status = 'completed',
           response_payload = p_response,
           error = null,
           finished_at = now(),
           lease_expires_at = null
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- Final failure. p_error is {type, message, retryable, ...}; the message is also put
-- in response_payload.error, where the guide's frontend looks for it.
create or replace function public.agent_task_fail(
    p_id uuid, p_attempt integer, p_worker text, p_error jsonb)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set status = 'failed',
           error = p_error || jsonb_build_object('at', now(), 'attempt', p_attempt),
           response_payload = jsonb_build_object('error', p_error ->> 'message'),
           finished_at = now(),
           lease_expires_at = null
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- A transient error: the row stays processing, shows the error, and its lease covers
-- the backoff. The holder lets go (worker = null) so the retried message may start
-- on any worker.
create or replace function public.agent_task_schedule_retry(
    p_id uuid, p_attempt integer, p_worker text, p_error jsonb,
    p_delay_seconds double precision, p_lease_seconds double precision)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set error = p_error || jsonb_build_object('at', now(), 'attempt', p_attempt),
           worker = null,
           lease_expires_at = now() + make_interval(secs => p_delay_seconds + p_lease_seconds)
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- The bridge could not enqueue a claimed row: back to pending at once. Only a row
-- no worker has started can be released. attempts is not lowered (fencing numbers
-- are never reused), so a release counts as an attempt.
create or replace function public.agent_task_release(p_id uuid, p_attempt integer)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set status = 'pending',
           lease_expires_at = null,
           max_attempts = t.max_attempts + 1
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker is null
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- Rows whose lease expired (bridge died after claiming, broker lost the message,
-- worker vanished) go back to pending, or to failed once attempts >= max_attempts.
-- An attempt that no worker started (its job waited in, or was lost from, the
-- broker) does not count against max_attempts, as with release: only runs that
-- reached a worker can use up a task.
create or replace function public.agent_tasks_rescue(p_limit integer default 1000)
returns table (id uuid, attempt integer, status text)
language sql
volatile
security invoker
set search_path = ''
as $$
    with expired as (
        select t.id,
               t.started_at is not null and t.attempts >= t.max_attempts as gives_up
          from public.agent_task_requests t
         where t.status = 'processing' and t.lease_expires_at < now()
         order by t.lease_expires_at
         limit p_limit
           for update skip locked
    )
    update public.agent_task_requests t
       set status = case when expired.gives_up then 'failed' else 'pending' end,
           finished_at = case when expired.gives_up then now() end,
           max_attempts = case when t.started_at is null then t.max_attempts + 1
                               else t.max_attempts end,
           worker = null,
           lease_expires_at = null,
           error = case when expired.gives_up then
                       jsonb_build_object(
                           'type', 'LeaseExpired',
                           'message', format(
                               'Gave up after %s of %s attempts: each time the worker '
                               'running the task stopped before finishing it (crash, '
                               'kill, or a handler that outlived its lease).',
                               t.attempts, t.max_attempts),
                           'retryable', false, 'at', now(), 'attempt', t.attempts)
                   else t.error end,
           response_payload = case when expired.gives_up then
                       jsonb_build_object('error', format(
                           'Gave up after %s of %s attempts: the worker running the task '
                           'stopped before finishing it.', t.attempts, t.max_attempts))
                   else t.response_payload end
      from expired
     where t.id = expired.id
    returning t.id, t.attempts, t.status::text;
$$;

-- Operator retry: failed rows back to pending with p_more_attempts fresh attempts.
-- Select by ids, or by failure time and/or error type (null means any).
create or replace function public.agent_tasks_requeue(
    p_ids uuid[] default null,
    p_failed_since timestamptz default null,
    p_error_type text default null,
    p_more_attempts integer default 3)
returns table (id uuid, attempts integer)
language sql
volatile
security invoker
set search_path = ''
as $$
    update public.agent_task_requests t
       set status = 'pending',
           max_attempts = t.attempts + greatest(p_more_attempts, 1),
           response_payload = null,
           finished_at = null,
           run_at = now(),
           worker = null
     where t.status = 'failed'
       and (p_ids is null or t.id = any (p_ids))
       and (p_failed_since is null or t.finished_at >= p_failed_since)
       and (p_error_type is null or t.error ->> 'type' = p_error_type)
    returning t.id, t.attempts;
$$;

-- Counts for `agent-bridge status` and the bridge's heartbeat.
create or replace function public.agent_tasks_stats()
returns table (
    pending bigint, due bigint, processing bigint, completed bigint, failed bigint,
    expired_leases bigint, oldest_due_seconds double precision)
language sql
stable
security invoker
set search_path = ''
as $$
    select count(*) filter (where t.status = 'pending'),
           count(*) filter (where t.status = 'pending' and t.run_at <= now()),
           count(*) filter (where t.status = 'processing'),
           count(*) filter (where t.status = 'completed'),
           count(*) filter (where t.status = 'failed'),
           count(*) filter (where t.status = 'processing' and t.lease_expires_at < now()),
           extract(epoch from now() - min(t.run_at) filter (
               where t.status = 'pending' and t.run_at <= now()))::double precision
      from public.agent_task_requests t;
$$;

-- What `agent-bridge check` compares with the version it expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 1 $$;

-- 4. Security, Supabase-style ------------------------------------------------------

alter table public.agent_task_requests enable row level security;

revoke all on table public.agent_task_requests from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_task_requests to service_role;
-- Users insert requests (these columns only) and read their own rows.
grant select on table public.agent_task_requests to authenticated;
grant insert (id, status, request_payload, priority, run_at, user_id, enterprise_id)
    on table public.agent_task_requests to authenticated;

drop policy if exists agent_task_requests_insert_own on public.agent_task_requests;
create policy agent_task_requests_insert_own on public.agent_task_requests
    for insert to authenticated
    with check (
        user_id = (select auth.uid())
        and status = 'pending'
        and response_payload is null
    );

drop policy if exists agent_task_requests_select_own on public.agent_task_requests;
create policy agent_task_requests_select_own on public.agent_task_requests
    for select to authenticated
    using (user_id = (select auth.uid()));

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'public.agent_tasks_claim(integer, double precision)',
        'public.agent_task_start(uuid, integer, text, double precision)',
        'public.agent_task_current(uuid)',
        'public.agent_task_heartbeat(uuid, integer, text, double precision)',
        'public.agent_task_progress(uuid, integer, text, jsonb)',
        'public.agent_task_complete(uuid, integer, text, jsonb)',
        'public.agent_task_fail(uuid, integer, text, jsonb)',
        'public.agent_task_schedule_retry(uuid, integer, text, jsonb, double precision, double precision)',
        'public.agent_task_release(uuid, integer)',
        'public.agent_tasks_rescue(integer)',
        'public.agent_tasks_requeue(uuid[], timestamptz, text, integer)',
        'public.agent_tasks_stats()',
        'public.agent_bridge_schema_version()'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

-- Realtime: the guide's frontend subscribes to postgres_changes on this table.
do $$
begin
    if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
       and not exists (select 1 from pg_publication_tables
                        where pubname = 'supabase_realtime'
                          and schemaname = 'public' and tablename = 'agent_task_requests')
    then
        alter publication supabase_realtime add table public.agent_task_requests;
    end if;
end
$$;
