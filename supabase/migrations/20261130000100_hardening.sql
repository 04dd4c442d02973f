-- agent-bridge: hardening (issue 10). Schema checks that make bad input fail at the
-- door, and fencing edges closed. Idempotent, like every migration here.
--
-- - request_payload nested deeper than agent_bridge.max_request_depth (64) levels is
--   refused at insert: a worker's JSON decoder (Python's, the browser's) recurses
--   per level and would fail on it.
-- - run_at must be a finite time: '-infinity' broke the stats, 'infinity' never ran.
-- - A processing row always holds a lease, and only a processing row does; the state
--   functions that take a lease refuse a missing, non-positive or absurd one.
-- - release only gives back an attempt no worker ever started.

-- 1. Input checks --------------------------------------------------------------------

-- Runs after agent_task_requests_check_request (BEFORE triggers fire in name order),
-- so the payload is already known to be an object within the size limit. The depth
-- is measured level by level with set operations, never by recursion, so a payload
-- nested 100,000 levels deep cannot exhaust the server's stack either. Change the
-- limit with
--   alter database postgres set agent_bridge.max_request_depth = '128';
create or replace function public.agent_task_requests_check_shape()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
    max_depth integer := coalesce(
        nullif(current_setting('agent_bridge.max_request_depth', true), '')::integer, 64);
    level jsonb[];
    depth integer := 0;
begin
    if tg_op = 'INSERT' or new.run_at is distinct from old.run_at then
        if new.run_at is not null and not isfinite(new.run_at) then
            raise exception 'run_at must be a finite time, got %', new.run_at
                using errcode = '22023',
                      hint = 'Leave run_at out to run the task now, or give a date and time.';
        end if;
    end if;
    if tg_op = 'INSERT' or new.request_payload is distinct from old.request_payload then
        level := array[new.request_payload];
        while cardinality(level) > 0 loop
            depth := depth + 1;
            if depth > max_depth then
                -- 22023, not 54001: PostgREST answers 54xxx with a 500, and this is the
                -- caller's mistake (400).
                raise exception 'request_payload is nested more than % levels deep; the limit is % levels',
                    max_depth, max_depth
                    using errcode = '22023',
                          hint = 'Flatten the payload, or raise agent_bridge.max_request_depth.';
            end if;
            -- The next level: every object or array directly inside this one.
            select coalesce(array_agg(c.value), '{}') into level
              from unnest(level) as v(doc)
             cross join lateral (
                    select e.value from jsonb_each(
                        case when jsonb_typeof(v.doc) = 'object' then v.doc end) e
                    union all
                    select a.value from jsonb_array_elements(
                        case when jsonb_typeof(v.doc) = 'array' then v.doc end) a) c
             where jsonb_typeof(c.value) in ('object', 'array');
        end loop;
    end if;
    return new;
end
$$;

revoke execute on function public.agent_task_requests_check_shape() from public, anon, authenticated;

drop trigger if exists agent_task_requests_check_request_shape on public.agent_task_requests;
create trigger agent_task_requests_check_request_shape
    before insert or update of request_payload, run_at on public.agent_task_requests
    for each row execute function public.agent_task_requests_check_shape();

-- 2. Constraints ----------------------------------------------------------------------

do $$
begin
    if not exists (select 1 from pg_constraint
                    where conname = 'agent_task_requests_run_at_check') then
        -- Rows from before the check: an infinite run_at becomes "due now".
        update public.agent_task_requests
           set run_at = now()
         where not isfinite(run_at);
        alter table public.agent_task_requests
            add constraint agent_task_requests_run_at_check check (isfinite(run_at));
    end if;
    -- agent_task_requests_lease_check (first migration) says only a processing row
    -- has a lease; this one says it always has one too, so rescue sees every
    -- processing row. Rows an old worker left without a lease got one above (first
    -- migration, every run); the update is repeated for a database in between.
    if not exists (select 1 from pg_constraint
                    where conname = 'agent_task_requests_lease_held_check') then
        update public.agent_task_requests
           set lease_expires_at = now() + interval '5 minutes'
         where status = 'processing' and lease_expires_at is null;
        alter table public.agent_task_requests
            add constraint agent_task_requests_lease_held_check
            check ((status = 'processing') = (lease_expires_at is not null));
    end if;
end
$$;

-- 3. State functions: lease arguments checked, release narrowed ----------------------

-- A lease or delay in seconds is refused unless it is a real number in range: a null
-- lease would leave a processing row that rescue never sees, a NaN or an infinite one
-- fails deep inside make_interval, and a delay of 1e20 seconds overflows timestamptz.
-- Checked only when the call names a row (p_id), so a call with no row is a no-op.
-- (agent_task_start is redefined by a later migration, 20261130000200_agents.sql,
-- which makes the same check.)

-- Helpers the state functions share live in their own schema, which PostgREST does
-- not expose: they are not part of the API.
create schema if not exists agent_bridge;
revoke all on schema agent_bridge from public;
grant usage on schema agent_bridge to service_role;

create or replace function agent_bridge.check_seconds(
    p_name text, p_value double precision, p_zero_ok boolean)
returns void
language plpgsql
immutable
security invoker
set search_path = ''
as $$
begin
    if p_value is null or p_value = 'NaN' or p_value > 31536000
       or p_value < 0 or (p_value = 0 and not p_zero_ok) then
        raise exception '% must be % 0 and at most 31536000 (a year), got %', p_name,
            case when p_zero_ok then 'at least' else 'more than' end,
            coalesce(p_value::text, 'null') using errcode = '22023';
    end if;
end
$$;
revoke execute on function agent_bridge.check_seconds(text, double precision, boolean)
    from public;
grant execute on function agent_bridge.check_seconds(text, double precision, boolean)
    to service_role;

create or replace function public.agent_task_heartbeat(
    p_id uuid, p_attempt integer, p_worker text, p_lease_seconds double precision)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    if p_id is not null then
        perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    end if;
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
    if p_id is not null then
        perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    end if;
    if p_id is not null then
        perform agent_bridge.check_seconds('p_delay_seconds', p_delay_seconds, true);
    end if;
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

-- The bridge could not enqueue a claimed row: back to pending at once. Only an
-- attempt no worker ever started can be released (started_at is null): after a
-- schedule_retry the worker is null again, but that attempt did run and is not the
-- bridge's to give back. attempts is not lowered (fencing numbers are never reused).
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
       and t.attempts = p_attempt and t.worker is null and t.started_at is null
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'public.agent_task_heartbeat(uuid, integer, text, double precision)',
        'public.agent_task_schedule_retry(uuid, integer, text, jsonb, double precision, double precision)',
        'public.agent_task_release(uuid, integer)'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

-- Requeue in pages. PostgREST caps every result at db-max-rows (Supabase: 1,000) with a
-- LIMIT around the call, so a requeue of 5,000 rows through rpc() would report 1,000; with
-- p_limit the caller asks for pages under the cap (the oldest failures first) until a page
-- comes back short. Null: no limit (direct SQL). The old signature is dropped first: two
-- overloads of one name make PostgREST answer PGRST203.
drop function if exists public.agent_tasks_requeue(uuid[], timestamptz, text, integer);
create or replace function public.agent_tasks_requeue(
    p_ids uuid[] default null,
    p_failed_since timestamptz default null,
    p_error_type text default null,
    p_more_attempts integer default 3,
    p_limit integer default null)
returns table (id uuid, attempts integer)
language sql
volatile
security invoker
set search_path = ''
as $$
    with chosen as (
        select t.id
          from public.agent_task_requests t
         where t.status = 'failed'
           and (p_ids is null or t.id = any (p_ids))
           and (p_failed_since is null or t.finished_at >= p_failed_since)
           and (p_error_type is null or t.error ->> 'type' = p_error_type)
         order by t.finished_at, t.id
         limit p_limit
           for update
    )
    update public.agent_task_requests t
       set status = 'pending',
           max_attempts = t.attempts + greatest(p_more_attempts, 1),
           response_payload = null,
           finished_at = null,
           run_at = now(),
           worker = null
      from chosen
     where t.id = chosen.id
    returning t.id, t.attempts;
$$;
revoke execute on function public.agent_tasks_requeue(uuid[], timestamptz, text, integer, integer)
    from public, anon, authenticated;
grant execute on function public.agent_tasks_requeue(uuid[], timestamptz, text, integer, integer)
    to service_role;
