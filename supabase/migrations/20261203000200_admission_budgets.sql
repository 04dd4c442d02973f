-- agent-bridge: admission budgets (issue 20): what one signed-in user may spend per day, the
-- agents a tenant may use, and payload checks whose cost is bounded. Idempotent.
--
-- - Day budgets: rows created and request bytes sent per user per UTC day
--   (agent_tenant_limits.max_rows_per_day, max_request_bytes_per_day), counted in
--   agent_bridge.user_day_usage.
-- - Allow-list: agent_tenant_limits.allowed_agents (null = every agent).
-- - An insert whose payload is too large or too deep is no longer refused with an error (an
--   error rolls back, so nothing could be counted against the budget): the row is stored
--   already `failed` (error.type InvalidRequest, the payload dropped) and counts. Once the
--   day's budget is spent, inserts are refused before the payload is looked at.
-- - The depth check is one walk in C (jsonpath) instead of a level-by-level copy.

-- 1. The operator's limits: day budgets and allowed agents ---------------------------------

-- The defaults go on the '*' row only when the columns are first added, so an operator's
-- later change (even to null) is kept by every later run. A null in the '*' row means the
-- built-in value: 2,000 rows, 50 MiB a day, every agent.
do $$
begin
    if not exists (select 1 from information_schema.columns
                    where table_schema = 'public' and table_name = 'agent_tenant_limits'
                      and column_name = 'max_rows_per_day') then
        alter table public.agent_tenant_limits
            add column max_rows_per_day integer check (max_rows_per_day >= 0),
            add column max_request_bytes_per_day bigint
                check (max_request_bytes_per_day >= 0);
        update public.agent_tenant_limits
           set max_rows_per_day = 2000, max_request_bytes_per_day = 52428800
         where tenant = '*';
    end if;
end
$$;
alter table public.agent_tenant_limits
    add column if not exists allowed_agents text[];

comment on table public.agent_tenant_limits is
    'agent-bridge limits per tenant (enterprise_id, else user id); the row ''*'' is the default. '
    'max_active: pending+processing rows one signed-in user may have; min/max_priority: the '
    'priority band users may choose; run_at_horizon: how far ahead users may schedule; '
    'max_processing: rows of the tenant processing at once (0 = no cap, null = '
    'TENANT_CONCURRENCY); max_rows_per_day, max_request_bytes_per_day: rows and request '
    'bytes one signed-in user may insert per UTC day; allowed_agents: the agents its users '
    'may insert for (null = every agent). Null = as the ''*'' row.';
comment on column public.agent_tenant_limits.max_rows_per_day is
    'Rows one signed-in user may insert per UTC day, refused ones that were stored as '
    'failed included (null = as ''*''; null in ''*'' = 2000).';
comment on column public.agent_tenant_limits.max_request_bytes_per_day is
    'request_payload bytes (pg_column_size, uncompressed) one signed-in user may send per UTC '
    'day, payloads stored as failed for their size included (null = as ''*''; null in '
    '''*'' = 52428800).';
comment on column public.agent_tenant_limits.allowed_agents is
    'The agents the tenant''s signed-in users may insert rows for (null = as ''*''; null in '
    '''*'' = every agent).';

-- 2. What each user has used today -----------------------------------------------------------

-- One row per user and UTC day. Written only by agent_bridge.count_user_request (from the
-- admit trigger, under the user's quota lock); users have no access. Rows older than a week
-- are deleted by that user's next insert.
create table if not exists agent_bridge.user_day_usage (
    user_id uuid not null,
    day date not null,
    rows integer not null default 0,
    request_bytes bigint not null default 0,
    primary key (user_id, day)
);
comment on table agent_bridge.user_day_usage is
    'agent-bridge day budgets: rows and request_payload bytes each signed-in user inserted per '
    'UTC day (agent_tenant_limits.max_rows_per_day, max_request_bytes_per_day). Delete a row to '
    'give a user their day back.';

alter table agent_bridge.user_day_usage enable row level security;
revoke all on table agent_bridge.user_day_usage from public, anon, authenticated;
grant select, insert, update, delete on table agent_bridge.user_day_usage to service_role;

-- Adds one row of p_bytes to the signed-in user's (auth.uid()) count for today and returns
-- the new totals; the caller refuses the insert (rolling this back) if they are over a
-- limit. The user comes from the JWT, never from an argument, so a call can only ever spend
-- the caller's own budget. Concurrent calls for one user queue on the counter row (ON
-- CONFLICT DO UPDATE locks it), so totals never skip a row even without the admit trigger's
-- advisory lock. Security definer: users may not write the table themselves.
create or replace function agent_bridge.count_user_request(p_bytes bigint)
returns table (rows integer, request_bytes bigint)
language plpgsql
volatile
security definer
set search_path = ''
as $$
#variable_conflict use_column
declare
    v_uid uuid := auth.uid();
    v_day date := (now() at time zone 'UTC')::date;
begin
    if pg_catalog.pg_trigger_depth() = 0 then
        raise exception 'agent_bridge.count_user_request is called by the insert trigger only'
            using errcode = '42501';
    end if;
    if v_uid is null or p_bytes is null or p_bytes < 0 then
        return;
    end if;
    delete from agent_bridge.user_day_usage u
     where u.user_id = v_uid and u.day < v_day - 7;
    return query
    insert into agent_bridge.user_day_usage as u (user_id, day, rows, request_bytes)
    values (v_uid, v_day, 1, p_bytes)
    on conflict (user_id, day) do update
       set rows = u.rows + 1, request_bytes = u.request_bytes + excluded.request_bytes
    returning u.rows, u.request_bytes;
end
$$;
revoke execute on function agent_bridge.count_user_request(bigint) from public, anon;
grant execute on function agent_bridge.count_user_request(bigint) to authenticated, service_role;
-- The admit trigger runs as the inserting user, so they need the schema to reach the
-- helper. Every function in agent_bridge revokes PUBLIC's execute, and PostgREST does not
-- expose the schema.
grant usage on schema agent_bridge to authenticated;

-- The size of a payload, for the size limit and the day budget alike: its size as stored,
-- read from the value's header, O(1), where ::text would write the whole document out
-- (14 ms for 1 MiB of small arrays). For text it is about the JSON's length; for
-- documents of many small objects and arrays, up to 4 times it: those are the ones that
-- cost the database the most to parse, index and keep, so the limit bounds that cost too.
-- (A compressed value, only possible from INSERT ... SELECT of a stored row, would show
-- its compressed size: its text size is measured instead.)
create or replace function agent_bridge.payload_bytes(p_payload jsonb)
returns bigint
language sql
immutable
parallel safe
security invoker
set search_path = ''
as $$
    select case when pg_catalog.pg_column_compression(p_payload) is null
                then pg_catalog.pg_column_size(p_payload)::bigint
                else pg_catalog.octet_length(p_payload::text)::bigint end
$$;
revoke execute on function agent_bridge.payload_bytes(jsonb) from public, anon;
grant execute on function agent_bridge.payload_bytes(jsonb) to authenticated, service_role;

-- 3. Admission: what a signed-in user may insert --------------------------------------------

-- As in 20261130000300_tenants.sql, plus the allow-list (before anything else: it needs no
-- lock) and the day budgets (after the quota, under the same per-user lock). Runs as the
-- inserting user: it sees only the user's own rows and limits, as RLS allows.
create or replace function public.agent_task_requests_admit()
returns trigger
language plpgsql
security invoker
set search_path = ''
as $$
declare
    v_uid uuid;
    v_enterprise text;
    v_tenant text;
    v_max_active integer;
    v_min_priority integer;
    v_max_priority integer;
    v_horizon interval;
    v_max_rows integer;
    v_max_bytes bigint;
    v_agents text[];
    v_active integer;
    v_bytes bigint;
    v_rows_used integer;
    v_bytes_used bigint;
    v_reset text;
begin
    if (select r.rolbypassrls or r.rolsuper from pg_catalog.pg_roles r
         where r.rolname = current_user) then
        return new;
    end if;
    v_uid := auth.uid();
    v_enterprise := nullif((auth.jwt() -> 'app_metadata' ->> 'enterprise_id'), '');

    -- The enterprise is the one in the user's JWT (app_metadata, which users cannot edit).
    if new.enterprise_id is null or new.enterprise_id = '' then
        new.enterprise_id := v_enterprise;
    elsif new.enterprise_id is distinct from v_enterprise then
        raise exception 'enterprise_id "%" is not your enterprise', new.enterprise_id
            using errcode = '42501',
                  hint = case when v_enterprise is null
                      then 'Your account has no app_metadata.enterprise_id; leave enterprise_id out.'
                      else 'Leave enterprise_id out: it is filled in from your account.' end;
    end if;

    v_tenant := coalesce(v_enterprise, v_uid::text, 'shared');
    select coalesce(max(l.max_active) filter (where l.tenant = v_tenant),
                    max(l.max_active) filter (where l.tenant = '*'), 20),
           coalesce(max(l.min_priority) filter (where l.tenant = v_tenant),
                    max(l.min_priority) filter (where l.tenant = '*'), 0),
           coalesce(max(l.max_priority) filter (where l.tenant = v_tenant),
                    max(l.max_priority) filter (where l.tenant = '*'), 0),
           coalesce(max(l.run_at_horizon) filter (where l.tenant = v_tenant),
                    max(l.run_at_horizon) filter (where l.tenant = '*'), interval '7 days'),
           coalesce(max(l.max_rows_per_day) filter (where l.tenant = v_tenant),
                    max(l.max_rows_per_day) filter (where l.tenant = '*'), 2000),
           coalesce(max(l.max_request_bytes_per_day) filter (where l.tenant = v_tenant),
                    max(l.max_request_bytes_per_day) filter (where l.tenant = '*'), 52428800),
           coalesce(max(l.allowed_agents) filter (where l.tenant = v_tenant),
                    max(l.allowed_agents) filter (where l.tenant = '*'))
      into v_max_active, v_min_priority, v_max_priority, v_horizon, v_max_rows, v_max_bytes,
           v_agents
      from public.agent_tenant_limits l
     where l.tenant in (v_tenant, '*');

    -- 42501 (403 through PostgREST), as for another enterprise: the agent exists (an unknown
    -- one is 22023, from agent_task_requests_check_agent) but this account may not use it.
    if v_agents is not null and new.agent is not null and new.agent <> all (v_agents) then
        raise exception 'agent "%" is not allowed for your account: %', new.agent,
            case when cardinality(v_agents) = 0 then 'no agents are allowed'
                 else 'allowed agents are ' || (select string_agg(a, ', ' order by a)
                                                  from unnest(v_agents) a) end
            using errcode = '42501',
                  hint = 'Ask the operator to add it to allowed_agents in agent_tenant_limits.';
    end if;

    if new.priority is null or new.priority < v_min_priority or new.priority > v_max_priority then
        raise exception 'priority % is not allowed: your tasks may use priority % to %',
            coalesce(new.priority::text, 'null'), v_min_priority, v_max_priority
            using errcode = '22023',
                  hint = 'Leave priority out; the operator sets the band in agent_tenant_limits.';
    end if;

    if new.run_at is null or not isfinite(new.run_at) then
        raise exception 'run_at must be a finite time, got %', coalesce(new.run_at::text, 'null')
            using errcode = '22023';
    end if;
    if new.run_at < now() then
        new.run_at := now();  -- a past time means now: it never jumps ahead of earlier rows
    elsif new.run_at > now() + v_horizon then
        raise exception 'run_at % is too far ahead: tasks may be scheduled at most % ahead',
            new.run_at, v_horizon
            using errcode = '22023';
    end if;

    -- The quota. One user's inserts take turns here, so two at once cannot both
    -- take the last place; rows inserted earlier by the same statement count too.
    -- (The lock is held to the end of the transaction: the budgets below are under it.)
    perform pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtextextended('agent_task_requests quota ' || coalesce(v_uid::text, ''), 0));
    select count(*) into v_active
      from (select 1 from public.agent_task_requests t
             where t.user_id = v_uid and t.status in ('pending', 'processing')
             limit v_max_active) x;
    if v_active >= v_max_active then
        raise exception 'too many active tasks: the limit is % pending or processing tasks per user',
            v_max_active
            using errcode = 'P0001',
                  detail = format('You have %s tasks that are pending or processing.', v_active),
                  hint = 'Wait for a task to finish, or ask the operator to raise max_active.';
    end if;

    -- The day budgets. Counted before the payload is checked, so a payload later stored as
    -- failed (too large, too deep) counts as well; a refusal here rolls the count back.
    -- The size as stored (agent_bridge.payload_bytes), as the size limit measures it.
    if v_uid is not null then
        v_bytes := coalesce(agent_bridge.payload_bytes(new.request_payload), 0);
        select u.rows, u.request_bytes into v_rows_used, v_bytes_used
          from agent_bridge.count_user_request(v_bytes) u;
        v_reset := to_char((now() at time zone 'UTC')::date + 1, 'YYYY-MM-DD') || ' 00:00 UTC';
        if v_rows_used > v_max_rows then
            raise exception 'daily row limit reached: % tasks per day; resets at %',
                v_max_rows, v_reset
                using errcode = 'P0001',
                      detail = format('You have inserted %s tasks today (UTC).', v_rows_used - 1),
                      hint = 'Wait for the reset, or ask the operator to raise max_rows_per_day.';
        end if;
        if v_bytes_used > v_max_bytes then
            raise exception 'daily request size limit reached: % bytes of request_payload per day; resets at %',
                v_max_bytes, v_reset
                using errcode = 'P0001',
                      detail = format('You have sent %s bytes today (UTC); this request is %s bytes.',
                                      v_bytes_used - v_bytes, v_bytes),
                      hint = 'Send less (a reference instead of the data), wait for the reset, '
                             'or ask the operator to raise max_request_bytes_per_day.';
        end if;
    end if;
    return new;
end
$$;

-- 4. Payload checks: a refused payload becomes a failed row -----------------------------------

-- Same checks and texts as before (20261124000000, 20261130000100), but the size is the
-- payload's size as stored (agent_bridge.payload_bytes, above). On INSERT a payload too
-- large or too deep no longer raises: the row is stored `failed` with error.type
-- InvalidRequest, its payload replaced by {} (the bytes are not kept), so the user sees a
-- readable error on the task, the day budget counts it, and nobody claims it. On UPDATE
-- (the service changing a payload) they still raise: there is no new row to fail. A payload
-- that is not a JSON object is still refused with an error: nothing could be stored for it.
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
    v_message text;
    v_hint text := 'Raise agent_bridge.max_request_bytes or send a reference instead of the data.';
begin
    if new.request_payload is null or jsonb_typeof(new.request_payload) <> 'object' then
        raise exception 'request_payload must be a JSON object such as {"prompt": "..."}, got %',
            coalesce(jsonb_typeof(new.request_payload), 'null')
            using errcode = '22023';
    end if;
    size_bytes := agent_bridge.payload_bytes(new.request_payload);
    if size_bytes > max_bytes then
        v_message := format('request_payload is %s bytes; the limit is %s bytes', size_bytes,
                          max_bytes);
        if tg_op = 'INSERT' then
            new.status := 'failed';
            new.request_payload := '{}'::jsonb;
            new.error := jsonb_build_object('type', 'InvalidRequest', 'message', v_message,
                                            'hint', v_hint, 'retryable', false, 'at', now());
            new.response_payload := jsonb_build_object('error', v_message);
            new.finished_at := now();
            new.lease_expires_at := null;
            new.worker := null;
            return new;
        end if;
        -- 22001 (value too long), not 54000: PostgREST answers 54xxx with a 500,
        -- but an oversized request is the caller's mistake (400).
        raise exception '%', v_message using errcode = '22001', hint = v_hint;
    end if;
    return new;
end
$$;

-- Runs after agent_task_requests_check_request (BEFORE triggers fire in name order), so the
-- payload is an object within the size limit (or already {} on a failed row). The depth is
-- found by one jsonpath walk in C: `.**{N}` visits every value at most N levels below the
-- root and no deeper (so its recursion is bounded whatever the payload's depth), and an
-- exists-query stops at the first match. Depth counts objects and arrays alike, the root
-- object being level 1, so a container at level N + 1 (jsonpath level N) is too deep. The
-- path is lax so the search stops at the first match (strict mode collects every match to
-- look for errors); `.type()` does not unwrap arrays in lax mode, where a filter would test
-- an array's elements instead of the array. Change the limit with
--   alter database postgres set agent_bridge.max_request_depth = '128';
create or replace function public.agent_task_requests_check_shape()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
    max_depth integer := greatest(coalesce(
        nullif(current_setting('agent_bridge.max_request_depth', true), '')::integer, 64), 0);
    v_message text;
    v_hint text := 'Flatten the payload, or raise agent_bridge.max_request_depth.';
begin
    if tg_op = 'INSERT' or new.run_at is distinct from old.run_at then
        if new.run_at is not null and not isfinite(new.run_at) then
            raise exception 'run_at must be a finite time, got %', new.run_at
                using errcode = '22023',
                      hint = 'Leave run_at out to run the task now, or give a date and time.';
        end if;
    end if;
    if (tg_op = 'INSERT' or new.request_payload is distinct from old.request_payload)
       and jsonb_path_exists(new.request_payload, format(
               'lax $.**{%s}.type() ? (@ == "object" || @ == "array")', max_depth)::jsonpath)
    then
        v_message := format('request_payload is nested more than %s levels deep; the limit is %s levels',
                          max_depth, max_depth);
        if tg_op = 'INSERT' then
            new.status := 'failed';
            new.request_payload := '{}'::jsonb;
            new.error := jsonb_build_object('type', 'InvalidRequest', 'message', v_message,
                                            'hint', v_hint, 'retryable', false, 'at', now());
            new.response_payload := jsonb_build_object('error', v_message);
            new.finished_at := now();
            new.lease_expires_at := null;
            new.worker := null;
            return new;
        end if;
        -- 22023, not 54001: PostgREST answers 54xxx with a 500, and this is the
        -- caller's mistake (400).
        raise exception '%', v_message using errcode = '22023', hint = v_hint;
    end if;
    return new;
end
$$;

revoke execute on function public.agent_task_requests_check_shape() from public, anon, authenticated;

-- 5. Users insert pending rows, and the failed rows the checks above make of them ---------------

-- A user cannot write `error` (no column grant) and no other trigger sets it on insert, so
-- the second branch admits only a row the payload checks failed; admit counted it already.
drop policy if exists agent_task_requests_insert_own on public.agent_task_requests;
create policy agent_task_requests_insert_own on public.agent_task_requests
    for insert to authenticated
    with check (
        user_id = (select auth.uid())
        and ((status = 'pending' and response_payload is null)
             or (status = 'failed' and error ->> 'type' = 'InvalidRequest'
                 and request_payload = '{}'::jsonb and attempts = 0))
    );

notify pgrst, 'reload schema';
