-- agent-bridge: the schema as it is now.
--
-- The migrations in supabase/migrations/ are how the database got here, and they are what
-- `agent-bridge migrate` and `supabase db push` apply; this file is the same schema written
-- once, for reading top to bottom. tests/sql/test_schema_file.py builds a database from each
-- (both on top of bridge/sql/supabase_compat.sql: the roles, auth.uid(), auth.jwt() and the
-- supabase_realtime publication Supabase provides) and checks that `pg_dump --schema-only`
-- of the two is identical. A migration that changes the schema updates this file in the
-- same commit.
--
-- Every status change is one of the state functions of section 4; nothing else writes
-- `status` (triggers only keep columns in step with it).
--
--   pending ──claim──▶ processing ──complete──▶ completed
--      ▲                   │  │ ──fail─────────▶ failed ──requeue──▶ pending
--      └──release/rescue───┘  └─schedule_retry (stays processing)
--   pending / processing ──cancel──▶ failed (Cancelled)
--   processing ──wait (a question)──▶ pending, waiting ──answer──▶ pending, due now
--                                        └─ unanswered by its deadline ──claim──▶ failed (NoAnswer)
--
-- Fencing: every claim increments `attempts`; a worker passes (attempt, worker) with every
-- later write, and a write whose pair no longer matches the row changes nothing and
-- returns applied = false.
--
-- Sections: 1. tables, types and their constraints; 2. indexes; 3. helpers in schema
-- agent_bridge; 4. state functions; 5. triggers; 6. row-level security policies;
-- 7. grants; 8. publication and schema version.

-- Helpers live in their own schema, which PostgREST does not expose: they are not part
-- of the API.
create schema agent_bridge;

-- 1. Tables, types and their constraints ----------------------------------------------------

-- The integration guide's table (its first six columns, types and four statuses,
-- unchanged), one row per task. A row's tenant is its enterprise_id, else its user_id,
-- else the one shared tenant ('shared') of rows the service inserts without either.
create table public.agent_task_requests (
    id uuid primary key default gen_random_uuid(),
    status varchar(50) not null default 'pending',
    request_payload jsonb not null default '{}'::jsonb,
    response_payload jsonb,
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    -- The fencing number: one more at every claim.
    attempts integer not null default 0,
    max_attempts integer not null default 3,
    priority integer not null default 0,
    run_at timestamptz not null default now(),
    lease_expires_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    -- host:pid:run of the worker holding the attempt; private to the service.
    worker text,
    -- {type, message, retryable, at, attempt, ...} of the last failure or retry.
    error jsonb,
    user_id uuid default auth.uid(),
    enterprise_id text,
    -- The agent the row is for; its jobs go to the Celery queue agent_tasks.<agent>
    -- (`default` keeps agent_tasks).
    agent text not null default 'default',
    tenant text generated always as (
        coalesce(nullif(enterprise_id, ''), user_id::text, 'shared')) stored,
    -- When cancellation was asked for (null: never). Cleared when an operator requeues.
    cancel_requested_at timestamptz,
    -- The row's replica identity (section 2): what a Realtime DELETE event carries.
    replica_key bigint generated always as identity,
    -- {input_tokens, output_tokens, cost[, unreported_tokens]}: what the task's attempts
    -- spent, summed; users may read it.
    usage jsonb,
    -- {tokens, cost, period, period_start}: what the running attempt's bind reserved;
    -- private to the service.
    spend_reserved jsonb,
    -- attempt * 100000 + run of the last usage report applied: a report is counted once.
    usage_mark bigint,
    -- The submitter's key for this request: unique per (user_id, agent) while the row
    -- exists (agent_task_requests_idempotency_key_idx, and the trigger
    -- agent_task_requests_0_idempotency, section 5).
    idempotency_key text,
    -- {question, asked_at, expires_at, number}: what the task's handler asked its user and
    -- waits for (only on a pending row; section 4.9); users may read it.
    waiting_for jsonb,
    -- [{question, answer, answered_at}, ...]: the answers so far, in the order asked.
    answers jsonb,
    constraint agent_task_requests_status_check
        check (status in ('pending', 'processing', 'completed', 'failed')),
    constraint agent_task_requests_attempts_check check (attempts >= 0 and max_attempts >= 1),
    constraint agent_task_requests_finished_check
        check ((status in ('completed', 'failed')) = (finished_at is not null)),
    -- Only a processing row has a lease, and it always has one, so rescue sees every
    -- processing row.
    constraint agent_task_requests_lease_check
        check (status = 'processing' or lease_expires_at is null),
    constraint agent_task_requests_lease_held_check
        check ((status = 'processing') = (lease_expires_at is not null)),
    -- '-infinity' broke the stats, 'infinity' never ran.
    constraint agent_task_requests_run_at_check check (isfinite(run_at)),
    constraint agent_task_requests_idempotency_key_check
        check (char_length(idempotency_key) between 1 and 200),
    -- A task waiting for an answer is queued, not running (section 4.9).
    constraint agent_task_requests_waiting_check
        check (waiting_for is null or status = 'pending'),
    constraint agent_task_requests_answers_check
        check (answers is null or jsonb_typeof(answers) = 'array')
)
-- The start and the lease renewals change no indexed column: with room left on the page
-- they are HOT updates, which write no index at all.
with (fillfactor = 90);

comment on column public.agent_task_requests.replica_key is
    'agent-bridge: the row''s replica identity (what a Realtime DELETE event would carry), '
    'so that it is not the task id; private to the service.';

-- The result every fenced write returns: whether it applied, and the row as it is now, so
-- a refused caller can say why (newer attempt, already finished, ...).
create type public.agent_task_write as (
    applied boolean,
    status text,
    attempts integer,
    worker text
);

-- One write of a batch as the write helpers (agent_bridge.write_*) return it: the write's
-- place in its batch (1-based), whether it applied, and the row as the write left it;
-- request_payload and the columns after it only where said (binds and starts).
create type agent_bridge.write_result as (
    ord integer,
    applied boolean,
    status text,
    attempts integer,
    worker text,
    request_payload jsonb,
    max_attempts integer,
    priority integer,
    user_id uuid,
    enterprise_id text,
    created_at timestamptz,
    agent text
);

-- Streamed answers as appended chunks: a worker streaming `{"answer": text, "partial":
-- true}` appends only what is new, instead of rewriting the row's whole response_payload
-- (whose bytes, in WAL and in every Realtime UPDATE message, grew with the square of the
-- answer's length):
--
--   answer = left(answer, answer_offset) || text      (in seq order, per attempt)
--
-- Chunks live only while their attempt runs: when the row leaves `processing`, or its
-- worker changes, they are deleted in the same transaction (folded first into
-- response_payload where the row keeps the partial answer). No foreign key to
-- agent_task_requests: `truncate agent_task_requests` must keep working, and an insert
-- need not lock the row a second time. A trigger deletes a deleted row's chunks; the
-- select policy hides any other orphan.
create table public.agent_task_chunks (
    task_id uuid not null,
    attempt integer not null,
    seq integer not null constraint agent_task_chunks_seq_check check (seq >= 0),
    answer_offset integer not null
        constraint agent_task_chunks_answer_offset_check check (answer_offset >= 0),
    text text not null,
    created_at timestamptz not null default now(),
    replica_key bigint generated always as identity,
    primary key (task_id, attempt, seq)
);

comment on table public.agent_task_chunks is
    'agent-bridge: the streamed answer of a running attempt, as appended pieces: answer = '
    'left(answer, answer_offset) || text, in seq order. Deleted when the attempt ends.';
comment on column public.agent_task_chunks.replica_key is
    'agent-bridge: the row''s replica identity (what a Realtime DELETE event would carry), '
    'so that it is not (task_id, attempt, seq); private to the service.';

-- The agents a bridge serves, registered by `agent-bridge run` from its AGENTS setting
-- each time it starts (agent_bridge_register_agents). `default` (AGENT_HANDLER) is always
-- known and is not listed here. Before any bridge has registered, only `default` is
-- accepted.
create table public.agent_bridge_agents (
    name text primary key
        constraint agent_bridge_agents_name_check
        check (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$' and name <> 'default'),
    queue text not null,
    -- max_attempts given to the agent's new rows; null keeps the table default.
    max_attempts integer
        constraint agent_bridge_agents_max_attempts_check
        check (max_attempts is null or max_attempts >= 1),
    registered_at timestamptz not null default now()
);

-- The operator's limits: one row per tenant that differs from the default, plus the
-- default row '*'. A null in a tenant's row means "as the '*' row"; a null in the '*' row
-- means the built-in value (20 active rows, priority 0..0, 7 days, TENANT_CONCURRENCY,
-- 2,000 rows and 50 MiB a day, every agent).
create table public.agent_tenant_limits (
    tenant text primary key,
    max_active integer constraint agent_tenant_limits_max_active_check check (max_active >= 0),
    min_priority integer,
    max_priority integer,
    run_at_horizon interval
        constraint agent_tenant_limits_run_at_horizon_check
        check (run_at_horizon >= interval '0'),
    max_processing integer
        constraint agent_tenant_limits_max_processing_check check (max_processing >= 0),
    -- The operator's words; private to the service.
    note text,
    max_rows_per_day integer
        constraint agent_tenant_limits_max_rows_per_day_check check (max_rows_per_day >= 0),
    max_request_bytes_per_day bigint
        constraint agent_tenant_limits_max_request_bytes_per_day_check
        check (max_request_bytes_per_day >= 0),
    allowed_agents text[],
    token_budget bigint
        constraint agent_tenant_limits_token_budget_check check (token_budget >= 0),
    cost_budget numeric(20, 6)
        constraint agent_tenant_limits_cost_budget_check check (cost_budget >= 0),
    budget_period text
        constraint agent_tenant_limits_budget_period_check
        check (budget_period in ('day', 'month')),
    constraint agent_tenant_limits_check check (min_priority <= max_priority)
);

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

comment on column public.agent_tenant_limits.token_budget is
    'Tokens (input + output) the tenant may spend per budget_period (null = as ''*''; null in '
    '''*'' = no token budget).';
comment on column public.agent_tenant_limits.cost_budget is
    'Cost, in the unit handlers report (e.g. USD), the tenant may spend per budget_period '
    '(null = as ''*''; null in ''*'' = no cost budget).';
comment on column public.agent_tenant_limits.budget_period is
    '''day'' or ''month'' (UTC) (null = as ''*''; null in ''*'' = month).';

-- The default row, as the migrations insert it (an operator may change it; later
-- migrations never overwrite it).
insert into public.agent_tenant_limits (tenant, max_active, min_priority, max_priority,
                                        run_at_horizon, max_processing, note,
                                        max_rows_per_day, max_request_bytes_per_day)
values ('*', 20, 0, 0, interval '7 days', null, 'default for every tenant', 2000, 52428800);

-- The claim's round-robin. Rounds are 2^20 stamps apart: a claim stamps the tenants it
-- serves with the round's first stamp, and tenants that join before the next claim take
-- the stamps after it, one each in order of arrival (agent_bridge.tenant_join_stamp). So a
-- tenant that joins goes behind the tenants just served, ahead of any tenant served later,
-- and joiners never tie with each other. 2^63 / 2^20 rounds is ~278 years of 1,000 claims
-- a second.
create sequence public.agent_task_claim_round increment by 1048576;
create sequence public.agent_task_tenant_arrival;
-- A sequence never called hands out its start value first, which would stamp the first
-- round's tenants ahead of the tenants that joined before it: issue that value now.
select nextval('public.agent_task_claim_round');

-- One row per tenant seen with a pending row. Its states:
--   active                        in the rotation: the claim visits it in (served, tenant)
--                                 order; it may have due rows
--   not active, wake_at = t       asleep: every pending row of it has run_at >= t
--   not active, wake_at is null   idle: no pending rows
-- `served`: the claim round that last gave it rows, or its join stamp; the claim serves
-- the least recently served tenants first. The invariant (no lost wake-up): a tenant with
-- a committed pending row is active, or asleep with wake_at <= that row's run_at; see
-- agent_bridge.tenants_arrive for the locking protocol that keeps it.
create table public.agent_task_tenants (
    tenant text primary key,
    active boolean not null default true,
    served bigint not null,  -- default agent_bridge.tenant_join_stamp(), set in section 3
    wake_at timestamptz,
    constraint agent_task_tenants_wake_check check (wake_at is null or not active)
);

comment on column public.agent_task_tenants.wake_at is
    'agent-bridge: set while the tenant is asleep (not active): no pending row of it is '
    'due before this time. Null while active or idle (no pending rows).';

-- Day budgets: one row per signed-in user and UTC day. Written only by
-- agent_bridge.count_user_request (from the admit trigger, under the user's quota lock);
-- users have no access. Rows older than a week are deleted by that user's next insert,
-- and days before yesterday by the prune.
create table agent_bridge.user_day_usage (
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

-- Whether state changes, streamed pieces and wake-ups also go out as Realtime Broadcast
-- (issue 24). On where Realtime reads the database (a Supabase project); off on a plain
-- PostgreSQL, where nothing would deliver or prune realtime.messages (the realtime schema
-- supabase_compat.sql creates for tests does not count). Operators switch it with
--   update agent_bridge.realtime_broadcast set enabled = true;   -- or false
create table agent_bridge.realtime_broadcast (
    only_row boolean primary key default true check (only_row),
    enabled boolean not null
);

comment on table agent_bridge.realtime_broadcast is
    'Whether state changes, streamed pieces and wake-ups are sent as Realtime Broadcast.';

insert into agent_bridge.realtime_broadcast (enabled)
select to_regclass('realtime.messages') is not null
   and to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null
   and coalesce(obj_description(to_regnamespace('realtime'), 'pg_namespace'), '')
       <> 'agent-bridge compat';

-- Spend per tenant and budget period (issue 25); see agent_bridge.reserve_spend.
create table public.agent_tenant_usage (
    tenant text not null,
    period text not null
        constraint agent_tenant_usage_period_check check (period in ('day', 'month')),
    period_start date not null,
    input_tokens bigint not null default 0,
    output_tokens bigint not null default 0,
    -- reservations charged whole: attempts that ended without reporting their usage
    unreported_tokens bigint not null default 0,
    cost numeric(20, 6) not null default 0,
    -- held by running attempts
    reserved_tokens bigint not null default 0,
    reserved_cost numeric(20, 6) not null default 0,
    -- attempts whose usage was counted
    attempts integer not null default 0,
    updated_at timestamptz not null default now(),
    primary key (tenant, period, period_start)
);

comment on table public.agent_tenant_usage is
    'agent-bridge spend per tenant and budget period (UTC day or month): tokens and cost the '
    'tenant''s tasks reported, reservations charged whole, and what running attempts hold.';

-- Spend per agent since the start, for the bridge's Prometheus counters
-- (agent_bridge_tokens_total, agent_bridge_cost_total); written with the tenant's usage.
create table agent_bridge.agent_usage (
    agent text primary key,
    input_tokens bigint not null default 0,
    output_tokens bigint not null default 0,
    unreported_tokens bigint not null default 0,
    cost numeric(20, 6) not null default 0
);

-- 2. Indexes --------------------------------------------------------------------------------

-- The claim reads these in order and stops after `limit` rows: a tenant's due rows in its
-- own order (priority, then age); the second serves claims limited to some agents without
-- reading the others' rows.
create index agent_task_requests_claim_idx
    on public.agent_task_requests (priority desc, run_at, created_at)
    where status = 'pending';
create index agent_task_requests_tenant_claim_idx
    on public.agent_task_requests (tenant, priority desc, run_at, created_at)
    where status = 'pending';
create index agent_task_requests_tenant_agent_claim_idx
    on public.agent_task_requests (tenant, agent, priority desc, run_at, created_at)
    where status = 'pending';
-- How many rows a tenant has processing (its cap), and a user's active rows (the quota),
-- without reading finished history. The rescue finds expired leases through the first
-- too: there is deliberately no index on lease_expires_at, so that the start and the
-- lease renewals stay HOT updates.
create index agent_task_requests_tenant_processing_idx
    on public.agent_task_requests (tenant)
    where status = 'processing';
create index agent_task_requests_user_active_idx
    on public.agent_task_requests (user_id)
    where status in ('pending', 'processing');
create index agent_task_requests_user_idx
    on public.agent_task_requests (user_id);
-- Idempotency keys: one row per (user, agent, key). Rows without user_id (the service's
-- own inserts) share one key space per agent: nulls not distinct.
create unique index agent_task_requests_idempotency_key_idx
    on public.agent_task_requests (user_id, agent, idempotency_key) nulls not distinct
    where idempotency_key is not null;
-- The prune: the oldest finished rows first, a short range scan from the left whatever
-- the table's size. Serves the requeue's failed_since filter too.
create index agent_task_requests_finished_idx
    on public.agent_task_requests (finished_at)
    where status in ('completed', 'failed');

-- The sleepers, earliest first: the claim reads the due ones off the front; and the
-- tenants in the rotation, in turn order.
create index agent_task_tenants_wake_idx
    on public.agent_task_tenants (wake_at) where wake_at is not null;
create index agent_task_tenants_turn_idx
    on public.agent_task_tenants (served, tenant) where active;

-- Replica identity. Supabase Realtime cannot check a deleted row against RLS, so it sends
-- every DELETE of a published table to every subscriber whose filters pass, with the
-- row's replica identity columns that the subscriber may select and, on a table with RLS
-- on, only primary key columns. Each published table's identity is therefore a column of
-- its own, `replica_key`: not a primary key column and selectable by no API role, so a
-- DELETE event says that some row went, and when; not whose or which.
create unique index agent_task_requests_replica_key_idx
    on public.agent_task_requests (replica_key);
create unique index agent_task_chunks_replica_key_idx
    on public.agent_task_chunks (replica_key);
alter table public.agent_task_requests
    replica identity using index agent_task_requests_replica_key_idx;
alter table public.agent_task_chunks
    replica identity using index agent_task_chunks_replica_key_idx;

-- 3. Helpers in schema agent_bridge ---------------------------------------------------------
--
-- Not part of the API. The claim's body (agent_bridge.claim_rows), the set-based writes
-- (agent_bridge.write_*) and the prune's batches are in section 4, next to the functions
-- that call them.

-- A lease or delay in seconds is refused unless it is a real number in range: a null
-- lease would leave a processing row that rescue never sees, a NaN or an infinite one
-- fails deep inside make_interval, and a delay of 1e20 seconds overflows timestamptz.
create function agent_bridge.check_seconds(
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

-- Every write waits for its commit to reach the disk (synchronous_commit = on); the claim,
-- the start and the lease renewals need not. They are fenced and leased, so if the server
-- crashes before they reach the disk (at most a fraction of a second of commits, never a
-- torn one), what is lost is recovered as a crash of the bridge or worker is: a lost claim
-- leaves the row pending (a job sent for it is refused at start); a lost start or renewal
-- leaves the row without its worker, whose outcome is then refused, and the rescue runs
-- the task again. Outcomes (complete, fail, retry, cancel), releases and rescues keep
-- waiting for the disk: a completed task is never run again. `set_config(..., true)`
-- lasts to the end of the caller's transaction, so the commit right after the call is the
-- one relaxed.
-- (PL/pgSQL, as broadcasting(): before PostgreSQL 18 a SQL function that cannot be inlined
-- is planned again at every call.)
create function agent_bridge.relax_commit()
returns void
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    perform set_config('synchronous_commit', 'off', true);
end
$$;

-- The size of a payload, for the size limit and the day budget alike: its size as stored,
-- read from the value's header, O(1), where ::text would write the whole document out
-- (14 ms for 1 MiB of small arrays). For text it is about the JSON's length; for
-- documents of many small objects and arrays, up to 4 times it: those are the ones that
-- cost the database the most to parse, index and keep, so the limit bounds that cost too.
-- (A compressed value, only possible from INSERT ... SELECT of a stored row, would show
-- its compressed size: its text size is measured instead.)
create function agent_bridge.payload_bytes(p_payload jsonb)
returns bigint
language plpgsql
immutable
parallel safe
security invoker
set search_path = ''
as $$
begin
    return case when pg_catalog.pg_column_compression(p_payload) is null
                then pg_catalog.pg_column_size(p_payload)::bigint
                else pg_catalog.octet_length(p_payload::text)::bigint end;
end
$$;

-- Adds one row of p_bytes to the signed-in user's (auth.uid()) count for today and returns
-- the new totals; the caller refuses the insert (rolling this back) if they are over a
-- limit. The user comes from the JWT, never from an argument, so a call can only ever spend
-- the caller's own budget. Concurrent calls for one user queue on the counter row (ON
-- CONFLICT DO UPDATE locks it), so totals never skip a row even without the admit trigger's
-- advisory lock. Security definer: users may not write the table themselves.
create function agent_bridge.count_user_request(p_bytes bigint)
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

-- Whether the caller may act on task p_id as its user (cancel_agent_task, answer_agent_task):
-- roles that bypass RLS (service_role, the table owner) on any row, a signed-in user on the
-- rows they own (user_id = auth.uid()); false for a row that does not exist. Called from
-- those security definer functions, where current_user is the owner: the caller is the role
-- PostgREST switched to (the `role` setting, which a definer function does not change), else
-- the login role. Users may not execute it themselves.
create function agent_bridge.may_act_on(p_id uuid)
returns boolean
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    caller name := coalesce(nullif(current_setting('role'), 'none'), session_user);
    sees_all boolean;
    owner_id uuid;
begin
    select r.rolsuper or r.rolbypassrls
           or pg_catalog.pg_has_role(caller, c.relowner, 'MEMBER')
      into sees_all
      from pg_catalog.pg_roles r, pg_catalog.pg_class c
     where r.rolname = caller and c.oid = 'public.agent_task_requests'::pg_catalog.regclass;
    if coalesce(sees_all, false) then
        return true;
    end if;
    select t.user_id into owner_id from public.agent_task_requests t where t.id = p_id;
    -- (never null: a caller without a user id is refused, not let through by a null)
    return owner_id is not null and owner_id is not distinct from (select auth.uid());
end
$$;

-- The answer the chunks of (p_id, p_attempt) rebuild; null when there are none.
create function agent_bridge.streamed_answer(p_id uuid, p_attempt integer)
returns text
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    answer text;
    c record;
begin
    for c in select k.answer_offset, k.text from public.agent_task_chunks k
              where k.task_id = p_id and k.attempt = p_attempt order by k.seq loop
        answer := left(coalesce(answer, ''), c.answer_offset) || c.text;
    end loop;
    return answer;
end
$$;

-- A row's response_payload with its streamed answer folded in: p_payload when nothing
-- was streamed, else {"answer": <rebuilt>, "partial": true}, what the row would hold had
-- every partial answer rewritten it.
create function agent_bridge.streamed_payload(
    p_id uuid, p_attempt integer, p_payload jsonb)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    answer text := agent_bridge.streamed_answer(p_id, p_attempt);
begin
    if answer is null then
        return p_payload;
    end if;
    return jsonb_build_object('answer', answer, 'partial', true);
end
$$;

-- The stamp of a tenant joining the line now (new, back from idle, or awake): behind
-- every tenant already waiting, ahead of every tenant served after it arrived. Nobody
-- jumps the queue and nobody is starved.
create function agent_bridge.tenant_join_stamp()
returns bigint
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return (select r.last_value + 1 + nextval('public.agent_task_tenant_arrival') % 1048575
              from public.agent_task_claim_round r);
end
$$;

alter table public.agent_task_tenants
    alter column served set default agent_bridge.tenant_join_stamp();

-- The earliest run_at of a tenant's pending rows, null if none: the first entry of each
-- priority in agent_task_requests_tenant_claim_idx (tenant, priority desc, run_at, ...),
-- one index probe per distinct priority the tenant has pending (users have one band,
-- by default the single priority 0), never a read of all its rows.
create function agent_bridge.tenant_next_run_at(p_tenant text)
returns timestamptz
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
    return (
        with recursive heads as (
            (select t.priority, t.run_at from public.agent_task_requests t
              where t.tenant = p_tenant and t.status = 'pending'
              order by t.priority desc, t.run_at
              limit 1)
            union all
            select n.priority, n.run_at
              from heads h
             cross join lateral (
                 select t.priority, t.run_at from public.agent_task_requests t
                  where t.tenant = p_tenant and t.status = 'pending' and t.priority < h.priority
                  order by t.priority desc, t.run_at
                  limit 1) n
        )
        select min(h.run_at) from heads h);
end
$$;

-- The tenants of rows that just became pending (p_run_at: each row's run_at; null means
-- due now). A tenant with a due row is active; one whose new rows are all in the future
-- sleeps until the earliest, or sooner if it already sleeps until sooner; an active one
-- stays as it is (the claim puts it to sleep if it has nothing due).
--
-- Locking protocol with the claim: an active tenant's row is held FOR KEY SHARE until this
-- transaction ends; any other tenant's row is locked by the upsert (ON CONFLICT DO UPDATE
-- locks the row even when its WHERE leaves it unchanged). The claim puts a tenant to sleep
-- or deactivates it only under FOR UPDATE SKIP LOCKED (which skips both) and only after
-- re-reading, under that lock and with a fresh snapshot, its pending rows. So a tenant
-- never goes to sleep past (or is deactivated despite) a pending row that is uncommitted:
-- either the writer holds the tenant and the claim leaves it active, or the writer's lock
-- waits for the claim, then finds the tenant inactive and upserts it here, waking it or
-- lowering wake_at. Claims' `served` updates take a lock that does not conflict with KEY
-- SHARE. A joiner's stamp is the current round's: a tenant coming back never keeps a
-- stamp older than that, so it cannot jump the queue.
create function agent_bridge.tenants_arrive(p_tenants text[], p_run_at timestamptz[])
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    v_held text[];
begin
    if cardinality(p_tenants) is null or cardinality(p_tenants) = 0 then
        return;
    end if;
    select coalesce(array_agg(s.tenant), '{}') into v_held
      from (select s.tenant from public.agent_task_tenants s
             where s.tenant = any (p_tenants) and s.active
             order by s.tenant
               for key share) s;
    insert into public.agent_task_tenants as s (tenant, active, wake_at, served)
    select x.tenant, x.due, case when not x.due then x.first_run_at end,
           agent_bridge.tenant_join_stamp()
      from (select a.tenant,
                   bool_or(a.run_at is null or a.run_at <= now()) as due,
                   min(a.run_at) as first_run_at
              from unnest(p_tenants, p_run_at) a(tenant, run_at)
             where a.tenant is not null and a.tenant <> all (v_held)
             group by a.tenant) x
     order by x.tenant
    on conflict (tenant) do update
       set active = excluded.active,
           wake_at = case when excluded.active then null
                          else least(s.wake_at, excluded.wake_at) end,
           served = case when excluded.active then greatest(s.served, excluded.served)
                         else s.served end
     where not s.active
       and (excluded.active or s.wake_at is null or excluded.wake_at < s.wake_at);
end
$$;

-- A negative age or a batch out of bounds is refused; a null one means "nothing to do", as
-- null arguments do for the other state functions.
create function agent_bridge.check_prune(p_older_than interval, p_batch integer)
returns void
language plpgsql
immutable
security invoker
set search_path = ''
as $$
begin
    if p_older_than < interval '0' then
        raise exception 'p_older_than must be an age of 0 or more (e.g. ''30 days''), got %',
            p_older_than
            using errcode = '22023';
    end if;
    -- A batch is one transaction: bounded, so it stays short.
    if p_batch < 1 or p_batch > 10000 then
        raise exception 'p_batch must be between 1 and 10000, got %', p_batch
            using errcode = '22023';
    end if;
end
$$;

-- Security definer: the receive policy evaluates it as the subscriber, who may not read
-- the flag table.
create function agent_bridge.broadcasting()
returns boolean
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
    return coalesce((select enabled from agent_bridge.realtime_broadcast), false)
       and to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null;
end
$$;

-- The receive rule for a task's topic, evaluated as the subscriber (security invoker):
-- the row must be one the subscriber may select, which the table's own policies decide.
create function agent_bridge.may_receive(p_topic text)
returns boolean
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
    if p_topic is null
       or p_topic !~ '^agent_task:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       or not agent_bridge.broadcasting() then
        return false;
    end if;
    return exists (select 1 from public.agent_task_requests r
                    where r.id = substr(p_topic, 12)::uuid);
end
$$;

-- A row's state as its user may see it, for the `state` event: the columns a user may
-- select, without request_payload (the user wrote it; it never changes). An answer, error
-- and answers to questions too big for one message are left out and named in `omitted`:
-- the client reads the row for them.
create function agent_bridge.state_message(p_row public.agent_task_requests)
returns jsonb
language plpgsql
stable
set search_path = ''
as $$
declare
    v_state jsonb := jsonb_build_object(
        'id', p_row.id, 'status', p_row.status, 'attempts', p_row.attempts,
        'max_attempts', p_row.max_attempts, 'priority', p_row.priority,
        'run_at', p_row.run_at, 'lease_expires_at', p_row.lease_expires_at,
        'started_at', p_row.started_at, 'finished_at', p_row.finished_at,
        'created_at', p_row.created_at, 'updated_at', p_row.updated_at,
        'user_id', p_row.user_id, 'enterprise_id', p_row.enterprise_id,
        'agent', p_row.agent, 'waiting_for', p_row.waiting_for);
    v_result jsonb := jsonb_build_object('response_payload', p_row.response_payload,
                                         'error', p_row.error, 'answers', p_row.answers);
begin
    if octet_length(v_result::text) > 65536 then
        return v_state || jsonb_build_object('response_payload', null, 'error', null,
                                             'answers', null,
                                             'omitted', jsonb_build_array('response_payload',
                                                                          'error', 'answers'));
    end if;
    return v_state || v_result;
end
$$;

-- Spend control (issue 25): token and cost budgets per tenant and period, enforced where
-- they cannot be raced.
--
--   insert   refused once the tenant's budget is spent (the admit trigger)
--   claim    a queued row of a tenant whose budget is spent ends failed / BudgetExceeded
--            without reaching a worker (public.agent_tasks_claim)
--   bind     the worker's bind declares what its handler may spend; the bind reserves it
--            from what is left (less if less is left; refused, and the row failed, when
--            nothing is), under the tenant's usage row lock, so concurrent tasks cannot
--            overshoot together (agent_bridge.reserve_spend)
--   usage    the attempt's real spend, in the transaction of its outcome, fenced like it
--            and counted once (public.agent_tasks_write kind 'usage'); it replaces the
--            reservation
--   end      an attempt that ends, or changes holder, with its reservation unsettled (a
--            crash, a cancel, a rescue, a handler that reported nothing) is charged the
--            whole reservation: it may have spent it (agent_task_requests_settle_spend)
--
-- Usage is kept per task (agent_task_requests.usage, which users may read) and per tenant
-- and period (public.agent_tenant_usage, the tenant's own rows readable by its users).


-- Whether any tenant has a budget: the checks below are skipped (one probe of a small
-- table) where none has.
create function agent_bridge.budgets_exist()
returns boolean
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
    return exists (select 1 from public.agent_tenant_limits l
                    where l.token_budget is not null or l.cost_budget is not null);
end
$$;

-- A tenant's budgets and spend in its current period. `*_left` count reservations as
-- spent; null where there is no such budget.
create function agent_bridge.budget_state(p_tenant text)
returns table (tenant text, period text, period_start date, resets_at timestamptz,
               token_budget bigint, cost_budget numeric, tokens bigint, cost numeric,
               reserved_tokens bigint, reserved_cost numeric, tokens_left bigint,
               cost_left numeric)
language sql
stable
security invoker
set search_path = ''
as $$
    with l as (
        select coalesce(max(l.token_budget) filter (where l.tenant = p_tenant),
                        max(l.token_budget) filter (where l.tenant = '*')) as token_budget,
               coalesce(max(l.cost_budget) filter (where l.tenant = p_tenant),
                        max(l.cost_budget) filter (where l.tenant = '*')) as cost_budget,
               coalesce(max(l.budget_period) filter (where l.tenant = p_tenant),
                        max(l.budget_period) filter (where l.tenant = '*'),
                        'month') as period
          from public.agent_tenant_limits l
         where l.tenant in (p_tenant, '*')
    ),
    p as (
        select l.*, date_trunc(l.period, now() at time zone 'UTC')::date as period_start
          from l
    )
    select p_tenant, p.period, p.period_start,
           (p.period_start + case p.period when 'day' then interval '1 day'
                                           else interval '1 month' end)
               ::timestamp at time zone 'UTC',
           p.token_budget, p.cost_budget,
           coalesce(u.input_tokens + u.output_tokens + u.unreported_tokens, 0),
           coalesce(u.cost, 0),
           coalesce(u.reserved_tokens, 0),
           coalesce(u.reserved_cost, 0),
           p.token_budget - coalesce(u.input_tokens + u.output_tokens + u.unreported_tokens
                                     + u.reserved_tokens, 0),
           p.cost_budget - coalesce(u.cost + u.reserved_cost, 0)
      from p
      left join public.agent_tenant_usage u
        on u.tenant = p_tenant and u.period = p.period and u.period_start = p.period_start
$$;

-- The error a row gets when its tenant's budget is spent: which budget, how much, and when
-- it resets. Null while the tenant may still spend. With p_count_reserved, what running
-- attempts hold counts as spent (a bind's question); without, only what was spent (an
-- insert's and a claim's: a reservation may yet be given back).
create function agent_bridge.budget_exceeded(p_tenant text, p_count_reserved boolean)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    s record;
    v_which text;
    v_used text;
    v_reserved text;
begin
    select * into s from agent_bridge.budget_state(p_tenant);
    if s.token_budget is not null
       and (case when p_count_reserved then s.tokens_left
                 else s.token_budget - s.tokens end) <= 0 then
        v_which := 'token';
        v_used := format('%s of %s tokens', s.tokens, s.token_budget);
        v_reserved := case when p_count_reserved and s.reserved_tokens > 0
                           then format(', %s more held by running tasks', s.reserved_tokens) end;
    elsif s.cost_budget is not null
          and (case when p_count_reserved then s.cost_left
                    else s.cost_budget - s.cost end) <= 0 then
        v_which := 'cost';
        v_used := format('%s of %s', s.cost::numeric(20, 2), s.cost_budget::numeric(20, 2));
        v_reserved := case when p_count_reserved and s.reserved_cost > 0
                           then format(', %s more held by running tasks',
                                       s.reserved_cost::numeric(20, 2)) end;
    else
        return null;
    end if;
    return jsonb_build_object(
        'type', 'BudgetExceeded', 'retryable', false, 'budget', v_which,
        'period', s.period, 'resets_at', s.resets_at,
        'message', format('%s budget spent: %s this %s%s; resets at %s', v_which, v_used,
                          s.period, coalesce(v_reserved, ''),
                          to_char(s.resets_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI "UTC"')));
end
$$;

-- The tenant's usage row for the period, locked: reservations and reports of one tenant
-- take turns here.
create function agent_bridge.lock_usage(p_tenant text, p_period text, p_period_start date)
returns void
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    insert into public.agent_tenant_usage (tenant, period, period_start)
    values (p_tenant, p_period, p_period_start)
    on conflict do nothing;
    perform 1 from public.agent_tenant_usage u
      where u.tenant = p_tenant and u.period = p_period and u.period_start = p_period_start
        for update;
end
$$;

-- A non-negative number from a spend document, or null where absent.
create function agent_bridge.spend_number(p_doc jsonb, p_key text)
returns numeric
language plpgsql
immutable
set search_path = ''
as $$
declare
    v_value jsonb := p_doc -> p_key;
begin
    if v_value is null or jsonb_typeof(v_value) = 'null' then
        return null;
    end if;
    if jsonb_typeof(v_value) <> 'number' or (v_value #>> '{}')::numeric < 0 then
        raise exception '% must be a number of 0 or more, got %', p_key, v_value
            using errcode = '22023';
    end if;
    return (v_value #>> '{}')::numeric;
end
$$;

-- The binds that applied (p_ords: their places in the batch's arrays p_ids, p_attempts,
-- p_workers and p_wants), with what their handler declared it may spend ({tokens, cost},
-- p_wants; null: nothing declared, nothing reserved): in write order, each reserves what
-- it declared, or what is left if less, from its tenant's budget. A bind whose tenant has
-- nothing left is refused and its row ends failed / BudgetExceeded (p_ords' refusal),
-- before any handler runs. A row that already holds a reservation for this holder keeps it
-- (a bind repeated). One row per bind with a declaration: its grant ({tokens, cost}: null
-- where the tenant has no such budget, i.e. as declared) or its refusal.
create function agent_bridge.reserve_spend(
    p_ords integer[], p_ids uuid[], p_attempts integer[], p_workers text[], p_wants jsonb[])
returns table (ord integer, budget jsonb, refusal jsonb)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
declare
    w record;
    s record;
    t public.agent_task_requests;
    v_refusal jsonb;
    v_tokens bigint;
    v_cost numeric;
begin
    if not agent_bridge.budgets_exist() then
        return query select o, p_wants[o], null::jsonb from unnest(p_ords) o
                      where p_wants[o] is not null;
        return;
    end if;
    for w in select o as ord, p_ids[o] as id, p_attempts[o] as attempt,
                    p_workers[o] as worker, p_wants[o] as want
               from unnest(p_ords) o
              where p_wants[o] is not null
              order by o loop
        select * into t from public.agent_task_requests r
         where r.id = w.id and r.attempts = w.attempt and r.worker = w.worker
           and r.status = 'processing';
        if not found then
            continue;
        end if;
        if t.spend_reserved is not null then
            ord := w.ord;
            budget := t.spend_reserved - 'period' - 'period_start';
            refusal := null;
            return next;
            continue;
        end if;
        select * into s from agent_bridge.budget_state(t.tenant);
        if s.token_budget is null and s.cost_budget is null then
            ord := w.ord;
            budget := w.want;
            refusal := null;
            return next;
            continue;
        end if;
        perform agent_bridge.lock_usage(t.tenant, s.period, s.period_start);
        v_refusal := agent_bridge.budget_exceeded(t.tenant, true);
        if v_refusal is not null then
            update public.agent_task_requests r
               set status = 'failed',
                   error = v_refusal || jsonb_build_object('at', now(), 'attempt', w.attempt),
                   response_payload = jsonb_build_object('error', v_refusal ->> 'message'),
                   finished_at = now(),
                   lease_expires_at = null
             where r.id = w.id;
            ord := w.ord;
            budget := null;
            refusal := v_refusal;
            return next;
            continue;
        end if;
        select * into s from agent_bridge.budget_state(t.tenant);  -- under the lock
        v_tokens := agent_bridge.spend_number(w.want, 'tokens');
        v_cost := agent_bridge.spend_number(w.want, 'cost');
        if s.token_budget is not null then
            v_tokens := least(coalesce(v_tokens, s.tokens_left), s.tokens_left);
        end if;
        if s.cost_budget is not null then
            v_cost := least(coalesce(v_cost, s.cost_left), s.cost_left);
        end if;
        update public.agent_tenant_usage u
           set reserved_tokens = u.reserved_tokens + coalesce(v_tokens, 0),
               reserved_cost = u.reserved_cost + coalesce(v_cost, 0),
               updated_at = now()
         where u.tenant = t.tenant and u.period = s.period and u.period_start = s.period_start;
        update public.agent_task_requests r
           set spend_reserved = jsonb_build_object('tokens', v_tokens, 'cost', v_cost,
                                                   'period', s.period,
                                                   'period_start', s.period_start)
         where r.id = w.id;
        ord := w.ord;
        budget := jsonb_build_object('tokens', v_tokens, 'cost', v_cost);
        refusal := null;
        return next;
    end loop;
end
$$;

-- The usage reports of a batch (p_kinds 'usage', p_docs {input_tokens, output_tokens,
-- cost}, p_seqs the run of the attempt that reports: Celery's retries + 1): fenced by
-- (attempt, worker) on a processing row, counted once per (attempt, run). Each adds to the
-- row's usage and to its tenant's period, and gives back the attempt's reservation. A row
-- per report applied.
create function agent_bridge.write_usage(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[], p_docs jsonb[],
    p_seqs integer[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    w record;
    t public.agent_task_requests;
    s record;
    v_in bigint;
    v_out bigint;
    v_cost numeric;
    v_period text;
    v_start date;
begin
    for w in select u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc, u.seq
               from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs, p_seqs)
                    with ordinality u(kind, id, attempt, worker, doc, seq, ord)
              where u.kind = 'usage'
              order by u.id, u.ord loop
        select * into t from public.agent_task_requests r
         where r.id = w.id and r.status = 'processing' and r.attempts = w.attempt
           and r.worker = w.worker
           and w.attempt::bigint * 100000 + coalesce(w.seq, 0) > coalesce(r.usage_mark, 0)
           for update;
        if not found then
            continue;
        end if;
        v_in := coalesce(agent_bridge.spend_number(w.doc, 'input_tokens'), 0);
        v_out := coalesce(agent_bridge.spend_number(w.doc, 'output_tokens'), 0);
        v_cost := coalesce(agent_bridge.spend_number(w.doc, 'cost'), 0);
        if t.spend_reserved is not null then
            v_period := t.spend_reserved ->> 'period';
            v_start := (t.spend_reserved ->> 'period_start')::date;
        else
            select * into s from agent_bridge.budget_state(t.tenant);
            v_period := s.period;
            v_start := s.period_start;
        end if;
        perform agent_bridge.lock_usage(t.tenant, v_period, v_start);
        update public.agent_tenant_usage u
           set input_tokens = u.input_tokens + v_in,
               output_tokens = u.output_tokens + v_out,
               cost = u.cost + v_cost,
               reserved_tokens = greatest(u.reserved_tokens - coalesce(
                   (t.spend_reserved ->> 'tokens')::bigint, 0), 0),
               reserved_cost = greatest(u.reserved_cost - coalesce(
                   (t.spend_reserved ->> 'cost')::numeric, 0), 0),
               attempts = u.attempts + 1,
               updated_at = now()
         where u.tenant = t.tenant and u.period = v_period and u.period_start = v_start;
        perform agent_bridge.count_agent_usage(t.agent, v_in, v_out, 0, v_cost);
        update public.agent_task_requests r
           set usage = agent_bridge.add_usage(r.usage, v_in, v_out, v_cost, 0),
               spend_reserved = null,
               usage_mark = w.attempt::bigint * 100000 + coalesce(w.seq, 0)
         where r.id = w.id;
        return next row(w.ord, true, 'processing', w.attempt, w.worker, null, null, null,
                        null, null, null, null)::agent_bridge.write_result;
    end loop;
end
$$;

-- Add spend to an agent's running totals.
create function agent_bridge.count_agent_usage(
    p_agent text, p_in bigint, p_out bigint, p_unreported bigint, p_cost numeric)
returns void
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    insert into agent_bridge.agent_usage as a (agent, input_tokens, output_tokens,
                                                unreported_tokens, cost)
    values (p_agent, p_in, p_out, p_unreported, p_cost)
    on conflict (agent) do update
       set input_tokens = a.input_tokens + excluded.input_tokens,
           output_tokens = a.output_tokens + excluded.output_tokens,
           unreported_tokens = a.unreported_tokens + excluded.unreported_tokens,
           cost = a.cost + excluded.cost;
end
$$;

-- A task's usage with more added.
create function agent_bridge.add_usage(
    p_usage jsonb, p_in bigint, p_out bigint, p_cost numeric, p_unreported bigint)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
begin
    return jsonb_strip_nulls(jsonb_build_object(
        'input_tokens', coalesce((p_usage ->> 'input_tokens')::bigint, 0) + p_in,
        'output_tokens', coalesce((p_usage ->> 'output_tokens')::bigint, 0) + p_out,
        'cost', coalesce((p_usage ->> 'cost')::numeric, 0) + p_cost,
        'unreported_tokens', nullif(coalesce((p_usage ->> 'unreported_tokens')::bigint, 0)
                                    + p_unreported, 0)));
end
$$;

-- 4. State functions: the only way status changes -------------------------------------------

-- 4.1 The claim -----------------------------------------------------------------------------

-- Claim up to p_limit due pending rows, taking turns across tenants: the tenants least
-- recently served go first, one row each per turn; a tenant's own rows go in priority
-- order (then run_at, created_at), and priority breaks ties between tenants whose turn it
-- equally is. A tenant may have at most its cap of rows processing
-- (agent_tenant_limits.max_processing, else p_tenant_concurrency; 0 = no cap). p_agents:
-- only rows of these agents (null: any). Rows come back in the order they should run.
-- Each claimed row's attempts goes up by one; that number fences every later write.
-- Each comes back with what the worker needs to start it: the row's max_attempts,
-- priority, user_id, enterprise_id, created_at and agent, and its request_payload when
-- that is at most p_inline_bytes (agent_bridge.payload_bytes; 0: never), else null (the
-- worker then reads it at start).
--
-- 0. the due sleepers are woken first, at most p_limit + 32 of them, earliest first (a
--    crowd due at the same instant is woken over a few claims, each waking more than it
--    serves), each joining the line at the current round;
-- 1. the walk visits active tenants only; a tenant found with pending rows but none due is
--    put to sleep until its earliest, and one with none is deactivated, both under the
--    locking protocol of agent_bridge.tenants_arrive;
-- 2. the rows: rank 1 of every tenant before rank 2 of any, and so on.
--
-- Cost: about p_limit index probes (one per tenant whose turn it is), whatever the
-- backlog and however many tenants sleep; plus one probe for the sleepers, one write per
-- tenant woken or put to sleep (each happens once per batch of due rows, not per claim),
-- and more only while many active tenants sit at their cap. Every statement walks an
-- index whatever its parameters and statistics (see the SET clauses and the walk).
create function agent_bridge.claim_rows(
    p_limit integer,
    p_lease_seconds double precision,
    p_tenant_concurrency integer default 0,
    p_agents text[] default null,
    p_inline_bytes integer default 0)
returns table (id uuid, attempt integer, agent text, request_payload jsonb,
               max_attempts integer, priority integer, user_id uuid, enterprise_id text,
               created_at timestamptz)
language plpgsql
volatile
security invoker
set search_path = ''
-- Re-planning these statements on every call (custom plans) costs more than running
-- them; every statement is written to walk indexes whatever its parameters.
set plan_cache_mode = force_generic_plan
-- ... and the planner is held to that when the statistics are stale (a bulk arrival
-- before ANALYZE): no scan of a whole table, no bitmap of every tenant's rows.
set enable_seqscan = off
set enable_bitmapscan = off
-- ... and, since a disabled scan is costed at 1e10 before PostgreSQL 18, far above
-- jit_above_cost, a server with JIT would compile every statement here, and every trigger
-- the claim's UPDATE fires, once per row (13-15 ms a row on PostgreSQL 15; issue 23).
set jit = off
as $$
#variable_conflict use_column
declare
    v_limit integer := greatest(coalesce(p_limit, 0), 0);
    v_default_cap integer;
    v_round bigint;
    -- the tenants taking part, in turn order, with how many rows each may take
    v_tenants text[] := '{}';
    v_served bigint[] := '{}';
    v_allow integer[] := '{}';
    -- passed over: nothing pending (deactivate), or only future rows (to sleep)
    v_idle text[] := '{}';
    v_later text[] := '{}';
    v_locked text[];
    v_chunk_tenants text[];
    v_chunk_served bigint[];
    v_after_served bigint;
    v_after_tenant text;
    v_tie_served bigint;
    v_share integer;
    r record;
begin
    if v_limit = 0 then
        return;
    end if;
    perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    select l.max_processing into v_default_cap
      from public.agent_tenant_limits l where l.tenant = '*';
    v_default_cap := coalesce(v_default_cap, p_tenant_concurrency, 0);

    -- 0. Wake the sleepers that are due. Skips a tenant a writer holds (it is woken by
    -- the next claim, or by the writer itself); waking is never unsafe.
    update public.agent_task_tenants tt
       set active = true, wake_at = null, served = greatest(tt.served, w.stamp)
      from (select d.tenant, agent_bridge.tenant_join_stamp() as stamp
              from (select s.tenant from public.agent_task_tenants s
                     where s.wake_at is not null and s.wake_at <= now() and not s.active
                     order by s.wake_at
                     limit v_limit + 32
                       for no key update skip locked) d) w
     where tt.tenant = w.tenant;

    -- 1. Whose turn it is: walk the active tenants in (served, tenant) order, a chunk
    -- at a time, until p_limit of them have a due row and room under their cap.
    loop
        select coalesce(array_agg(s.tenant order by s.served, s.tenant), '{}'),
               coalesce(array_agg(s.served order by s.served, s.tenant), '{}')
          into v_chunk_tenants, v_chunk_served
          from (select tt.tenant, tt.served from public.agent_task_tenants tt
                 where tt.active
                   and (v_after_tenant is null
                        or (tt.served, tt.tenant) > (v_after_served, v_after_tenant))
                 order by tt.served, tt.tenant
                 limit v_limit - cardinality(v_tenants) + 4) s;
        exit when cardinality(v_chunk_tenants) = 0;
        -- Whether each has a due row (of the agents asked for) and room for it: one
        -- probe of that tenant's index entries each, as LATERAL ... LIMIT 1, which the
        -- planner can turn neither into a join nor into a hash of every tenant's rows
        -- (an EXISTS can be both, and was, with statistics from before a bulk arrival).
        -- The tenant's limits are looked up the same way, never hashed whole.
        for r in
            select c.tenant, c.served, room.n as allowance,
                   coalesce(mine.found, theirs.found, false) as found
              from unnest(v_chunk_tenants, v_chunk_served) with ordinality
                   c(tenant, served, ord)
              left join lateral (
                 select l.max_processing from public.agent_tenant_limits l
                  where l.tenant = c.tenant limit 1) l on true
             cross join lateral (
                 select case when coalesce(l.max_processing, v_default_cap) > 0
                        then coalesce(l.max_processing, v_default_cap) - (
                             select count(*) from (
                                 select 1 from public.agent_task_requests p
                                  where p.tenant = c.tenant and p.status = 'processing'
                                  limit coalesce(l.max_processing, v_default_cap)) x)::integer
                        else v_limit end as n) room
              left join lateral (
                 select true as found from public.agent_task_requests t
                  where p_agents is null and room.n > 0
                    and t.tenant = c.tenant and t.status = 'pending' and t.run_at <= now()
                  limit 1) mine on true
              left join lateral (
                 select true as found from unnest(p_agents) g(name)
                  cross join lateral (
                      select 1 from public.agent_task_requests t
                       where t.tenant = c.tenant and t.agent = g.name
                         and t.status = 'pending' and t.run_at <= now()
                       limit 1) x
                  where room.n > 0
                  limit 1) theirs on true
             order by c.ord
        loop
            v_after_served := r.served;
            v_after_tenant := r.tenant;
            if r.found then
                v_tenants := v_tenants || r.tenant;
                v_served := v_served || r.served;
                v_allow := v_allow || r.allowance;
                exit when cardinality(v_tenants) = v_limit;
            elsif not exists (select 1 from public.agent_task_requests t
                               where t.tenant = r.tenant and t.status = 'pending') then
                v_idle := v_idle || r.tenant;
            elsif not exists (select 1 from public.agent_task_requests t
                               where t.tenant = r.tenant and t.status = 'pending'
                                 and t.run_at <= now()) then
                v_later := v_later || r.tenant;
            end if;  -- else at its cap, or due rows only for other agents: keeps its place
        end loop;
        exit when cardinality(v_tenants) = v_limit
               or cardinality(v_chunk_tenants) < v_limit - cardinality(v_tenants) + 4;
    end loop;

    v_round := nextval('public.agent_task_claim_round');
    if cardinality(v_idle) + cardinality(v_later) > 0 then
        if current_setting('transaction_isolation') = 'read committed' then
            -- Lock first (skipping tenants a writer holds), then look again with a fresh
            -- snapshot: a row committed before the lock is seen; a writer after it waits
            -- for this transaction and then wakes the tenant or lowers its wake_at. A
            -- tenant found with a due row by now stays active. Two statements: a
            -- statement's snapshot is taken when it starts, so one that locked and looked
            -- would miss the row of a writer that committed between the two (and so
            -- released its hold on the tenant): that tenant would sleep past its row.
            select coalesce(array_agg(s.tenant), '{}') into v_locked
              from (select s.tenant from public.agent_task_tenants s
                     where s.tenant = any (v_idle || v_later) and s.active
                     order by s.tenant
                       for update skip locked) s;
            update public.agent_task_tenants tt
               set active = false, wake_at = n.next_run_at
              from (select q.tenant, agent_bridge.tenant_next_run_at(q.tenant) as next_run_at
                      from unnest(v_locked) q(tenant)) n
             where tt.tenant = n.tenant
               and (n.next_run_at is null or n.next_run_at > now());
        elsif cardinality(v_later) > 0 then
            -- No fresh snapshot to check with: leave them active, at the back of the line.
            update public.agent_task_tenants tt
               set served = v_round
              from (select s.tenant from public.agent_task_tenants s
                     where s.tenant = any (v_later)
                       for no key update skip locked) s
             where tt.tenant = s.tenant;
        end if;
    end if;

    if cardinality(v_tenants) = 0 then
        return;
    end if;

    -- The rest of the last tenant's tie (same `served`), since priority decides
    -- among tenants whose turn it equally is.
    if cardinality(v_tenants) = v_limit then
        v_tie_served := v_served[v_limit];
        select v_tenants || coalesce(array_agg(x.tenant order by x.tenant), '{}'),
               v_served || coalesce(array_agg(x.served order by x.tenant), '{}'),
               v_allow || coalesce(array_agg(x.allowance order by x.tenant), '{}')
          into v_tenants, v_served, v_allow
          from (select tt.tenant, tt.served, room.n as allowance
                  from public.agent_task_tenants tt
                  left join lateral (
                     select l.max_processing from public.agent_tenant_limits l
                      where l.tenant = tt.tenant limit 1) l on true
                 cross join lateral (
                     select case when coalesce(l.max_processing, v_default_cap) > 0
                            then coalesce(l.max_processing, v_default_cap) - (
                                 select count(*) from (
                                     select 1 from public.agent_task_requests p
                                      where p.tenant = tt.tenant and p.status = 'processing'
                                      limit coalesce(l.max_processing, v_default_cap)) y)::integer
                            else v_limit end as n) room
                 cross join lateral (
                     select 1 from public.agent_task_requests t
                      where t.tenant = tt.tenant and t.status = 'pending' and t.run_at <= now()
                        and (p_agents is null or t.agent = any (p_agents))
                      limit 1) due
                 where tt.active and tt.served = v_tie_served and tt.tenant > v_after_tenant) x
         where x.allowance > 0;
    end if;

    -- 2. The rows: each tenant's first rows in its own order, ranked; rank 1 of every
    -- tenant goes before rank 2 of any, and so on. Within a rank: least recently
    -- served tenant first, then priority, then age. No tenant needs more than
    -- p_limit minus one row for each other tenant taking part.
    v_share := greatest(v_limit - least(cardinality(v_tenants), v_limit) + 1, 1);
    return query
    with candidates as (
        select w.id, w.priority, w.run_at, w.created_at, c.tenant, c.served,
               row_number() over (partition by c.tenant
                                  order by w.priority desc, w.run_at, w.created_at) as rank
          from unnest(v_tenants, v_served, v_allow) c(tenant, served, allowance)
         cross join lateral (
             select h.id, h.priority, h.run_at, h.created_at from (
                 -- Locked here, skipping rows another claim holds, so concurrent
                 -- bridges share even one tenant's backlog. (A locking clause is not
                 -- allowed on a UNION arm itself, hence the wrapping subqueries.)
                 (select * from (
                  select t.id, t.priority, t.run_at, t.created_at
                    from public.agent_task_requests t
                   where p_agents is null and t.tenant = c.tenant
                     and t.status = 'pending' and t.run_at <= now()
                   order by t.priority desc, t.run_at, t.created_at
                   limit least(c.allowance, v_share)
                     for update skip locked) mine)
                 union all
                 (select a.id, a.priority, a.run_at, a.created_at
                    from unnest(p_agents) g(name)
                   cross join lateral (
                       select t.id, t.priority, t.run_at, t.created_at
                         from public.agent_task_requests t
                        where t.tenant = c.tenant and t.agent = g.name
                          and t.status = 'pending' and t.run_at <= now()
                        order by t.priority desc, t.run_at, t.created_at
                        limit least(c.allowance, v_share)
                          for update skip locked) a)
             ) h order by h.priority desc, h.run_at, h.created_at
             limit least(c.allowance, v_share)) w
    ),
    picked as (
        select k.id,
               row_number() over (order by k.rank, k.served, k.priority desc, k.run_at,
                                           k.created_at, k.tenant) as ord
          from candidates k
         order by k.rank, k.served, k.priority desc, k.run_at, k.created_at, k.tenant
         limit v_limit
    ),
    -- The picked rows by primary key (`= any (array(...))`, one probe each): as a join,
    -- with statistics from when the table was small, the plan hashed them against every
    -- row of the table, and every pending row, at every claim (issue 23).
    locked as (
        select t.id from public.agent_task_requests t
         where t.id = any (array(select p.id from picked p)) and t.status = 'pending'
           for update skip locked
    ),
    claimed as (
        -- A row waiting for an answer is due only once its question expired (run_at is
        -- the deadline; an answer makes it due at once and clears waiting_for): it ends
        -- failed / NoAnswer here, without reaching a worker, whose handler would only
        -- replay to the same question.
        update public.agent_task_requests t
           set status = case when t.waiting_for is null then 'processing' else 'failed' end,
               attempts = t.attempts + case when t.waiting_for is null then 1 else 0 end,
               lease_expires_at = case when t.waiting_for is null
                                       then now() + make_interval(secs => p_lease_seconds) end,
               worker = null,
               started_at = case when t.waiting_for is null then null else t.started_at end,
               finished_at = case when t.waiting_for is not null then now() end,
               error = case when t.waiting_for is null then t.error
                            else agent_bridge.no_answer_error(t.waiting_for, t.attempts) end,
               response_payload = case when t.waiting_for is null then t.response_payload
                   else jsonb_build_object('error', agent_bridge.no_answer_error(
                            t.waiting_for, t.attempts) ->> 'message') end,
               waiting_for = null
         where t.id = any (array(select l.id from locked l))
        -- (the payload is measured only when asked for: its size is read from its
        -- header, and a value stored compressed is measured as text)
        returning t.id, t.attempts, t.agent, t.tenant, t.status,
                  case when p_inline_bytes > 0 then
                      case when agent_bridge.payload_bytes(t.request_payload) <= p_inline_bytes
                                -- deeper than the default insert limit (an operator may
                                -- raise it) only at start: a decoder's recursion limit
                                -- must fail that one task, not the whole claim
                                and not jsonb_path_exists(t.request_payload,
                                    'lax $.**{64}.type() ? (@ == "object" || @ == "array")')
                           then t.request_payload end
                  end as request_payload,
                  t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at
    ),
    stamped as (
        update public.agent_task_tenants tt
           set served = v_round
          from (select s.tenant from public.agent_task_tenants s
                 where s.tenant in (select c.tenant from claimed c)
                   for no key update skip locked) s
         where tt.tenant = s.tenant
    )
    select c.id, c.attempts, c.agent, c.request_payload, c.max_attempts, c.priority,
           c.user_id, c.enterprise_id, c.created_at
      from claimed c join picked p on p.id = c.id
     where c.status = 'processing'
     order by p.ord;
end
$$;

-- The entry point (PostgREST's and the bridge's): the claim above, with a relaxed commit.
create function public.agent_tasks_claim(
    p_limit integer,
    p_lease_seconds double precision,
    p_tenant_concurrency integer default 0,
    p_agents text[] default null,
    p_inline_bytes integer default 0)
returns table (id uuid, attempt integer, agent text, request_payload jsonb,
               max_attempts integer, priority integer, user_id uuid, enterprise_id text,
               created_at timestamptz)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_claimed jsonb;
    v_failed uuid[];
begin
    perform agent_bridge.relax_commit();
    if not agent_bridge.budgets_exist() then
        return query select c.id, c.attempt, c.agent, c.request_payload, c.max_attempts,
                            c.priority, c.user_id, c.enterprise_id, c.created_at
                       from agent_bridge.claim_rows(p_limit, p_lease_seconds,
                                                    p_tenant_concurrency, p_agents,
                                                    p_inline_bytes) c;
        return;
    end if;
    -- A row whose tenant's budget is spent ends failed / BudgetExceeded here, before it
    -- reaches a queue (issue 25). The claim's rows are kept as JSON for a second statement:
    -- one statement would not see the rows the claim function has just written.
    select coalesce(jsonb_agg(to_jsonb(c)), '[]') into v_claimed
      from agent_bridge.claim_rows(p_limit, p_lease_seconds, p_tenant_concurrency, p_agents,
                                   p_inline_bytes) c;
    with c as (
        select x.id, x.attempt, coalesce(nullif(x.enterprise_id, ''), x.user_id::text,
                                         'shared') as tenant
          from jsonb_to_recordset(v_claimed) x(id uuid, attempt integer, user_id uuid,
                                               enterprise_id text)
    ),
    spent as (
        select x.tenant, agent_bridge.budget_exceeded(x.tenant, false) as doc
          from (select distinct c.tenant from c) x
    ),
    failed as (
        update public.agent_task_requests t
           set status = 'failed',
               error = s.doc || jsonb_build_object('at', now(), 'attempt', c.attempt),
               response_payload = jsonb_build_object('error', s.doc ->> 'message'),
               finished_at = now(),
               lease_expires_at = null
          from c
          join spent s on s.tenant = c.tenant and s.doc is not null
         where t.id = c.id and t.attempts = c.attempt
        returning t.id
    )
    select coalesce(array_agg(f.id), '{}') into v_failed from failed f;
    return query
    select x.id, x.attempt, x.agent, x.request_payload, x.max_attempts, x.priority,
           x.user_id, x.enterprise_id, x.created_at
      from jsonb_to_recordset(v_claimed) x(id uuid, attempt integer, agent text,
                                           request_payload jsonb, max_attempts integer,
                                           priority integer, user_id uuid, enterprise_id text,
                                           created_at timestamptz)
     where x.id <> all (v_failed);
end
$$;

-- Every agent's spend since the start (the bridge's Prometheus counters).
create function public.agent_tasks_usage_totals()
returns table (agent text, input_tokens bigint, output_tokens bigint,
               unreported_tokens bigint, cost numeric)
language sql
stable
security invoker
set search_path = ''
as $$
    select a.agent, a.input_tokens, a.output_tokens, a.unreported_tokens, a.cost
      from agent_bridge.agent_usage a
     order by a.agent
$$;

-- What a signed-in user's tenant may still spend this period (users read it with
-- rpc('agent_tenant_budget')).
create function public.agent_tenant_budget()
returns table (tenant text, period text, period_start date, resets_at timestamptz,
               token_budget bigint, cost_budget numeric, tokens bigint, cost numeric,
               reserved_tokens bigint, reserved_cost numeric, tokens_left bigint,
               cost_left numeric)
language sql
stable
security invoker
set search_path = ''
as $$
    select * from agent_bridge.budget_state(coalesce(
        nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''),
        (select auth.uid())::text))
$$;

-- Every tenant with spend on record or a budget of its own, in its current period
-- (`agent-bridge usage`).
create function public.agent_tenants_usage()
returns table (tenant text, period text, period_start date, resets_at timestamptz,
               token_budget bigint, cost_budget numeric, tokens bigint, cost numeric,
               reserved_tokens bigint, reserved_cost numeric, tokens_left bigint,
               cost_left numeric)
language sql
stable
security invoker
set search_path = ''
as $$
    select b.*
      from (select u.tenant from public.agent_tenant_usage u
            union
            select l.tenant from public.agent_tenant_limits l
             where l.tenant <> '*' and (l.token_budget is not null or l.cost_budget is not null)
           ) x,
           lateral agent_bridge.budget_state(x.tenant) b
     order by b.tenant
$$;

-- 4.2 The worker's attempt ------------------------------------------------------------------

-- The writes of an attempt's holder are set-based (agent_bridge.write_*: any number of
-- rows in one statement, fenced per row); the single-row functions call them with one
-- row, and public.agent_tasks_write (4.8) with a batch, so each rule is written once.
--
-- The fencing says `coalesce(t.status, '') = 'processing'`, the same test as `t.status =
-- 'processing'` (status is never null) that no partial index's predicate matches: so the
-- planner reaches each row of a batch by its primary key whatever the statistics say.
-- With the plain test and statistics from a time with few rows processing, it walked the
-- whole processing index once per batch, or per row (500 heartbeats among 2,000
-- processing rows: 280 ms instead of 13).

-- The binds and starts of a batch (p_kinds 'bind' and 'start'; other elements are
-- skipped): agent_task_start's fenced UPDATE, one statement for all of them. A row per
-- write applied, with the row's columns; a start's with its request_payload too. One row
-- written more than once: the writes of one (attempt, worker) are one write (the last of
-- them gives the lease) and all apply; of several (attempt, worker) pairs the first the
-- row admits applies and the others are refused, as they would be one after another (the
-- first takes the row, with a fresh lease). p_seconds are checked by the caller.
create function agent_bridge.write_bind(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[],
    p_seconds double precision[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with w as (
        select u.ord::integer as ord, u.kind, u.id, u.attempt, u.worker, u.secs
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_seconds)
               with ordinality u(kind, id, attempt, worker, secs, ord)
         where u.kind in ('bind', 'start')
    ),
    pairs as (
        select w.id, w.attempt, w.worker, min(w.ord) as first_ord,
               (array_agg(w.secs order by w.ord desc))[1] as secs,
               bool_or(w.kind = 'start') as wants_payload
          from w
         group by w.id, w.attempt, w.worker
    ),
    chosen as (
        select distinct on (p.id) p.id, p.attempt, p.worker, p.secs, p.wants_payload
          from pairs p
          join public.agent_task_requests c
            on c.id = p.id and coalesce(c.status, '') = 'processing'
           and c.attempts = p.attempt
           and (c.worker is null or c.worker = p.worker or c.lease_expires_at < now())
         order by p.id, p.first_ord
    ),
    bound as (
        update public.agent_task_requests t
           set worker = chosen.worker,
               started_at = coalesce(t.started_at, now()),
               lease_expires_at = now() + make_interval(secs => chosen.secs)
          from chosen
         where t.id = chosen.id
           and coalesce(t.status, '') = 'processing'
           and t.attempts = chosen.attempt
           and (t.worker is null or t.worker = chosen.worker or t.lease_expires_at < now())
        returning t.id, chosen.attempt as asked_attempt, chosen.worker as asked_worker,
                  t.status::text as status, t.attempts, t.worker,
                  case when chosen.wants_payload then t.request_payload end as payload,
                  t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at,
                  t.agent
    )
    select w.ord, true, b.status, b.attempts, b.worker,
           case when w.kind = 'start' then b.payload end,
           b.max_attempts, b.priority, b.user_id, b.enterprise_id, b.created_at, b.agent
      from w
      join bound b
        on b.id = w.id and b.asked_attempt = w.attempt
       and b.asked_worker is not distinct from w.worker;
end
$$;

-- The heartbeats of a batch (p_kinds 'heartbeat'): agent_task_heartbeat's fenced UPDATE,
-- one statement for all of them. A row per write applied. Several heartbeats of one
-- (row, attempt, worker) are one renewal (the last gives the lease) and all apply, as
-- they would one after another. p_seconds are checked by the caller.
create function agent_bridge.write_heartbeat(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[],
    p_seconds double precision[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with w as (
        select u.ord::integer as ord, u.id, u.attempt, u.worker, u.secs
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_seconds)
               with ordinality u(kind, id, attempt, worker, secs, ord)
         where u.kind = 'heartbeat'
    ),
    pairs as (
        select distinct on (w.id, w.attempt, w.worker) w.id, w.attempt, w.worker, w.secs
          from w
         order by w.id, w.attempt, w.worker, w.ord desc
    ),
    renewed as (
        update public.agent_task_requests t
           set lease_expires_at = now() + make_interval(secs => pairs.secs)
          from pairs
         where t.id = pairs.id and coalesce(t.status, '') = 'processing'
           and t.attempts = pairs.attempt and t.worker = pairs.worker
        returning t.id, t.status::text as status, t.attempts, t.worker
    )
    select w.ord, true, r.status, r.attempts, r.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from w
      join renewed r on r.id = w.id and r.attempts = w.attempt and r.worker = w.worker;
end
$$;

-- The appends of a batch (p_kinds 'append'): agent_task_append for all of them. The rows
-- are locked FOR SHARE (in id order) where the append's fencing holds, and the chunks of
-- those appends go in with one multi-row INSERT. A row per append applied. The arguments
-- of an append that applies are checked (any bad one fails the call), as
-- agent_task_append checks them; one that is refused is not.
create function agent_bridge.write_append(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[],
    p_seqs integer[], p_offsets integer[], p_texts text[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_ords integer[];
    v_ids uuid[];
    v_attempts integer[];
    v_workers text[];
    v_seqs integer[];
    v_offsets integer[];
    v_texts text[];
    v_bad integer;
begin
    -- (aggregates of one query see its rows in one order: the arrays line up)
    select array_agg(x.ord), array_agg(x.id), array_agg(x.attempt), array_agg(x.worker),
           array_agg(x.seq), array_agg(x.answer_offset), array_agg(x.text)
      into v_ords, v_ids, v_attempts, v_workers, v_seqs, v_offsets, v_texts
      from (select u.ord::integer as ord, u.id, u.attempt, u.worker, u.seq,
                   u.answer_offset, u.text
              from unnest(p_kinds, p_ids, p_attempts, p_workers, p_seqs, p_offsets, p_texts)
                   with ordinality u(kind, id, attempt, worker, seq, answer_offset, text, ord)
              join public.agent_task_requests t
                on t.id = u.id and coalesce(t.status, '') = 'processing'
               and t.attempts = u.attempt and t.worker = u.worker
             where u.kind = 'append'
             order by t.id
               for share of t) x;
    if v_ords is null then
        return;
    end if;
    select a.ord into v_bad
      from unnest(v_ords, v_seqs, v_offsets, v_texts) a(ord, seq, answer_offset, text)
     where a.seq is null or a.seq < 0 or a.answer_offset is null or a.answer_offset < 0
        or a.text is null
     order by a.ord
     limit 1;
    if found then
        raise exception 'p_seq and p_offset must be 0 or more and p_text not null'
            using errcode = '22023', detail = format('The append at position %s.', v_bad);
    end if;
    insert into public.agent_task_chunks (task_id, attempt, seq, answer_offset, text)
    select a.id, a.attempt, a.seq, a.answer_offset, a.text
      from unnest(v_ids, v_attempts, v_seqs, v_offsets, v_texts)
           a(id, attempt, seq, answer_offset, text);
    return query
    select a.ord, true, 'processing'::text, a.attempt, a.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from unnest(v_ords, v_attempts, v_workers) a(ord, attempt, worker);
end
$$;

-- The completes of a batch (p_kinds 'complete', p_docs the responses):
-- agent_task_complete's fenced UPDATE, one statement for all of them. A row per write
-- applied. Of several completes of one (row, attempt, worker) the first applies and the
-- others are refused, as they would be one after another (the row is no longer
-- processing).
create function agent_bridge.write_complete(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[], p_docs jsonb[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with firsts as (
        select distinct on (u.id, u.attempt, u.worker)
               u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs)
               with ordinality u(kind, id, attempt, worker, doc, ord)
         where u.kind = 'complete'
         order by u.id, u.attempt, u.worker, u.ord
    ),
    done as (
        update public.agent_task_requests t
           set status = 'completed',
               response_payload = firsts.doc,
               error = null,
               finished_at = now(),
               lease_expires_at = null
          from firsts
         where t.id = firsts.id and coalesce(t.status, '') = 'processing'
           and t.attempts = firsts.attempt and t.worker = firsts.worker
        returning firsts.ord, t.status::text as status, t.attempts, t.worker
    )
    select d.ord, true, d.status, d.attempts, d.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from done d;
end
$$;

-- The final failures of a batch (p_kinds 'fail', p_docs the errors): agent_task_fail's
-- fenced UPDATE, one statement for all of them. A row per write applied; of several
-- failures of one (row, attempt, worker) the first applies, as with completes.
create function agent_bridge.write_fail(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[], p_docs jsonb[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with firsts as (
        select distinct on (u.id, u.attempt, u.worker)
               u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs)
               with ordinality u(kind, id, attempt, worker, doc, ord)
         where u.kind = 'fail'
         order by u.id, u.attempt, u.worker, u.ord
    ),
    done as (
        update public.agent_task_requests t
           set status = 'failed',
               error = firsts.doc || jsonb_build_object('at', now(), 'attempt', firsts.attempt),
               response_payload = jsonb_build_object('error', firsts.doc ->> 'message'),
               finished_at = now(),
               lease_expires_at = null
          from firsts
         where t.id = firsts.id and coalesce(t.status, '') = 'processing'
           and t.attempts = firsts.attempt and t.worker = firsts.worker
        returning firsts.ord, t.status::text as status, t.attempts, t.worker
    )
    select d.ord, true, d.status, d.attempts, d.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from done d;
end
$$;

-- A worker starts (or, after a Celery retry, restarts) its attempt. Refused when the
-- attempt is stale, or when another live worker already holds this attempt (a duplicate
-- broker delivery). Returns the payload the worker needs and the row's `agent` (the
-- worker runs that agent's handler with its limits). With p_spend ({tokens, cost}: what
-- the handler may spend) it reserves that from the tenant's budget and returns the grant
-- as `budget`; refused, and the row failed, when the budget is spent.
create function public.agent_task_start(
    p_id uuid, p_attempt integer, p_worker text, p_lease_seconds double precision,
    p_spend jsonb default null)
returns table (
    applied boolean, status text, attempts integer, worker text,
    request_payload jsonb, max_attempts integer, priority integer,
    user_id uuid, enterprise_id text, created_at timestamptz, agent text, budget jsonb)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
declare
    r public.agent_task_requests;
    g record;
    v_applied boolean;
    v_budget jsonb;
begin
    if p_id is not null then
        perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    end if;
    perform agent_bridge.relax_commit();
    update public.agent_task_requests t
       set worker = p_worker,
           started_at = coalesce(t.started_at, now()),
           lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where t.id = p_id
       and t.status = 'processing'
       and t.attempts = p_attempt
       and (t.worker is null or t.worker = p_worker or t.lease_expires_at < now())
    returning t.* into r;
    v_applied := found;
    if v_applied and p_spend is not null then
        select * into g from agent_bridge.reserve_spend(array[1], array[p_id],
                                                       array[p_attempt], array[p_worker],
                                                       array[p_spend]);
        -- the budget is spent: the row is failed, the start refused
        v_applied := g.refusal is null;
        v_budget := g.budget;
    end if;
    if v_applied then
        return query select true, r.status::text, r.attempts, r.worker,
            r.request_payload, r.max_attempts, r.priority,
            r.user_id, r.enterprise_id, r.created_at, r.agent, v_budget;
    else
        return query select false, t.status::text, t.attempts, t.worker,
            null::jsonb, t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at,
            t.agent, null::jsonb
          from public.agent_task_requests t where t.id = p_id;
    end if;
end
$$;

-- The row as a fenced write found it, for refused writes.
-- One usage report: agent_bridge.write_usage for one row.
create function public.agent_task_report_usage(
    p_id uuid, p_attempt integer, p_worker text, p_usage jsonb, p_run integer)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    if exists (select from agent_bridge.write_usage(array['usage'], array[p_id],
                                                    array[p_attempt], array[p_worker],
                                                    array[p_usage], array[p_run])) then
        return query select true, 'processing'::text, p_attempt, p_worker;
    else
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

create function public.agent_task_current(p_id uuid)
returns setof public.agent_task_write
language sql
stable
security invoker
set search_path = ''
as $$
    select false, t.status::text, t.attempts, t.worker
      from public.agent_task_requests t where t.id = p_id;
$$;

-- The holder of an attempt renews its lease while its handler runs (the write is
-- agent_bridge.write_heartbeat's).
create function public.agent_task_heartbeat(
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
    perform agent_bridge.relax_commit();
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

-- A full partial write (any shape of partial output other than an appended answer): the
-- final complete replaces it, and the attempt's chunks go.
create function public.agent_task_progress(
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
    if found then
        delete from public.agent_task_chunks k where k.task_id = p_id;
    else
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- A piece of the streamed answer: fenced like agent_task_progress (the row processing,
-- at p_attempt, held by p_worker). The row is locked FOR SHARE, not written: a
-- concurrent state change waits for this insert and then deletes it with the others,
-- and an append that waited for a state change sees the new row and is refused.
-- answer_offset is the length written so far (in characters) for an append, the length
-- of the common prefix when a handler rewrote earlier text, 0 to start over. The write
-- is agent_bridge.write_append's.
create function public.agent_task_append(
    p_id uuid, p_attempt integer, p_worker text, p_seq integer, p_offset integer,
    p_text text)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    r record;
begin
    select t.status::text as status, t.attempts, t.worker into r
      from public.agent_task_requests t
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
       for share;
    if not found then
        return query select * from public.agent_task_current(p_id);
        return;
    end if;
    if p_seq is null or p_seq < 0 or p_offset is null or p_offset < 0 or p_text is null then
        raise exception 'p_seq and p_offset must be 0 or more and p_text not null'
            using errcode = '22023';
    end if;
    insert into public.agent_task_chunks (task_id, attempt, seq, answer_offset, text)
    values (p_id, p_attempt, p_seq, p_offset, p_text);
    return query select true, r.status, r.attempts, r.worker;
end
$$;

-- The write is agent_bridge.write_complete's.
create function public.agent_task_complete(
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
-- in response_payload.error, where the guide's frontend looks for it. The write is
-- agent_bridge.write_fail's.
create function public.agent_task_fail(
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
create function public.agent_task_schedule_retry(
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

-- 4.3 Back to the queue ---------------------------------------------------------------------

-- The bridge could not enqueue a claimed row: back to pending at once. Only an attempt no
-- worker ever started can be released (started_at is null): after a schedule_retry the
-- worker is null again, but that attempt did run and is not the bridge's to give back.
-- attempts is not lowered (fencing numbers are never reused), so max_attempts goes up
-- instead.
create function public.agent_task_release(p_id uuid, p_attempt integer)
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

-- Rows whose lease expired (bridge died after claiming, broker lost the message,
-- worker vanished) go back to pending, or to failed once attempts >= max_attempts.
-- An attempt that no worker started (its job waited in, or was lost from, the
-- broker) does not count against max_attempts, as with release: only runs that
-- reached a worker can use up a task.
create function public.agent_tasks_rescue(p_limit integer default 1000)
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
-- Select by ids, or by failure time and/or error type (null means any). p_limit: pages
-- (the oldest failures first) under PostgREST's db-max-rows cap (Supabase: 1,000), which
-- would otherwise cut the reported result short; null: no limit (direct SQL).
create function public.agent_tasks_requeue(
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

-- 4.4 Cancellation --------------------------------------------------------------------------
--
--   pending ──cancel──────────────────────────────▶ failed (Cancelled)
--   processing, no live holder (not started, between
--     retries, holder's lease gone) ──cancel──────▶ failed (Cancelled)
--   processing, held ──cancel──▶ cancel_requested_at set + NOTIFY agent_task_cancel
--       └─ the holder stops its handler ──agent_task_cancelled──▶ failed (Cancelled)
--   completed / failed: unchanged
--
-- A cancelled row keeps the partial answer streamed so far in response_payload, marked
-- {"partial": true, "cancelled": true, "error": "..."}. A row with a cancel request
-- never goes back to the queue or completes (agent_task_requests_cancel_guard, section 5).

-- The response_payload of a cancelled row: {"cancelled": true, "error": message}
-- (the message where the guide's frontend looks for errors), plus the partial answer
-- streamed so far, if any (the given one, else what the row holds) marked
-- "partial": true.
create function public.agent_task_cancelled_payload(p_partial jsonb, p_message text)
returns jsonb
language sql
immutable
security invoker
set search_path = ''
as $$
    select case when jsonb_typeof(p_partial) = 'object' and p_partial ? 'answer'
                then p_partial || jsonb_build_object('partial', true)
                else '{}'::jsonb end
           || jsonb_build_object('cancelled', true, 'error', p_message);
$$;

-- Cancel row p_id (the core; service_role only); with p_attempt, only while the row is at
-- that attempt (an operator revoking one Celery job must not cancel a later attempt).
-- p_holder_gone: the caller knows the holder is dead (Celery terminated its process), so
-- the row ends now instead of waiting for it. Returns the row's status afterwards; null
-- if there is no such row.
create function public.agent_task_request_cancel(
    p_id uuid, p_attempt integer default null, p_holder_gone boolean default false)
returns text
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    r public.agent_task_requests;
    message text;
begin
    select * into r from public.agent_task_requests t where t.id = p_id for update;
    if not found then
        return null;
    end if;
    if (p_attempt is not null and r.attempts <> p_attempt)
       or r.status not in ('pending', 'processing') then
        return r.status;
    end if;
    if r.status = 'processing' and r.worker is not null and r.lease_expires_at >= now()
       and not coalesce(p_holder_gone, false) then
        -- A live worker holds it: record the request and tell that worker.
        if r.cancel_requested_at is null then
            update public.agent_task_requests t set cancel_requested_at = now()
             where t.id = p_id;
            perform pg_notify('agent_task_cancel', p_id::text || ':' || r.attempts);
        end if;
        return 'processing';
    end if;
    message := case
        when r.waiting_for is not null then 'Cancelled on request while waiting for an answer.'
        when r.status = 'pending' then 'Cancelled on request before it started.'
        when r.worker is null and r.started_at is not null
            then 'Cancelled on request while waiting to retry.'
        when r.worker is null then 'Cancelled on request before it started.'
        else 'Cancelled on request while it was running.' end;
    update public.agent_task_requests t
       set status = 'failed',
           cancel_requested_at = coalesce(t.cancel_requested_at, now()),
           error = jsonb_build_object('type', 'Cancelled', 'message', message,
                                      'retryable', false, 'at', now(),
                                      'attempt', t.attempts),
           response_payload = public.agent_task_cancelled_payload(
               agent_bridge.streamed_payload(t.id, t.attempts, t.response_payload), message),
           worker = null,
           finished_at = now(),
           lease_expires_at = null,
           waiting_for = null
     where t.id = p_id;
    if r.worker is not null then
        -- (a holder that survived what its caller thought killed it stops too)
        perform pg_notify('agent_task_cancel', p_id::text || ':' || r.attempts);
    end if;
    return 'failed';
end
$$;

-- supabase.rpc('cancel_agent_task', { task_id }) -> the row's status after the call:
-- 'failed' (it ended now), 'processing' (its worker is stopping it; it ends
-- 'failed' shortly), 'completed' or 'failed' (already finished: unchanged), or null:
-- no such row, or a row the caller may not cancel. A signed-in user may cancel
-- exactly the rows they own (user_id = auth.uid()); roles that bypass RLS
-- (service_role, the table owner) any row. Security definer, because users have
-- no UPDATE on the table: the ownership check below is what RLS would be.
create function public.cancel_agent_task(task_id uuid)
returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
begin
    if not agent_bridge.may_act_on(task_id) then
        return null;  -- exactly as for an id that does not exist
    end if;
    return public.agent_task_request_cancel(task_id);
end
$$;

-- The holder ends a cancelled attempt: fenced like every write; p_response is the partial
-- answer it had (null: keep the row's partial answer, the streamed one included).
create function public.agent_task_cancelled(
    p_id uuid, p_attempt integer, p_worker text, p_response jsonb)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    message text := 'Cancelled on request while it was running.';
begin
    return query
    update public.agent_task_requests t
       set status = 'failed',
           cancel_requested_at = coalesce(t.cancel_requested_at, now()),
           error = jsonb_build_object('type', 'Cancelled', 'message', message,
                                      'retryable', false, 'at', now(), 'attempt', p_attempt),
           response_payload = public.agent_task_cancelled_payload(
               coalesce(p_response,
                        agent_bridge.streamed_payload(t.id, t.attempts, t.response_payload)),
               message),
           worker = null,
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

-- Which of the attempts a worker process holds have been asked to stop: one call
-- per process per CANCEL_POLL_INTERVAL in Supabase mode (direct mode LISTENs on
-- agent_task_cancel and calls this only after (re)connecting).
create function public.agent_tasks_cancel_requested(p_ids uuid[], p_attempts integer[])
returns table (id uuid, attempt integer)
language sql
stable
security invoker
set search_path = ''
as $$
    select t.id, t.attempts
      from unnest(p_ids, p_attempts) as h(id, attempt)
      join public.agent_task_requests t on t.id = h.id and t.attempts = h.attempt
     where t.cancel_requested_at is not null;
$$;

-- 4.5 Agents and tenants --------------------------------------------------------------------

-- The bridge's AGENTS, replacing what was registered before: p_agents is
-- {"<name>": {"queue": "...", "max_attempts": n | null}, ...} (null: change nothing).
-- Returns what is now registered. Rows of an agent that is dropped stay as they are
-- (pending rows wait until it is configured again); new inserts for it are refused.
create function public.agent_bridge_register_agents(p_agents jsonb)
returns table (name text, queue text, max_attempts integer)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
begin
    if p_agents is not null then
        if jsonb_typeof(p_agents) <> 'object' then
            raise exception 'p_agents must be a JSON object of agents, got %',
                jsonb_typeof(p_agents) using errcode = '22023';
        end if;
        delete from public.agent_bridge_agents a where not (p_agents ? a.name);
        insert into public.agent_bridge_agents as a (name, queue, max_attempts)
        select e.key, e.value ->> 'queue', (e.value ->> 'max_attempts')::integer
          from jsonb_each(p_agents) e
        on conflict on constraint agent_bridge_agents_pkey do update
           set queue = excluded.queue,
               max_attempts = excluded.max_attempts,
               registered_at = now();
    end if;
    return query select a.name, a.queue, a.max_attempts
                   from public.agent_bridge_agents a order by a.name;
end
$$;

-- The old entry point of agent_bridge.tenants_arrive, kept for callers that know only the
-- tenants: their rows count as due now (an active tenant with nothing due is put to sleep
-- by the next claim).
create function public.agent_task_tenants_activate(p_tenants text[])
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
begin
    perform agent_bridge.tenants_arrive(p_tenants, null);
end
$$;

-- 4.6 Retention -----------------------------------------------------------------------------
--
-- Finished rows (`completed` or `failed`) whose finished_at is older than an age are
-- deleted in small batches, with their agent_task_chunks, and the per-user day counters
-- of days before yesterday. Run by the bridge (AGENT_RETENTION_DAYS), `agent-bridge
-- prune`, or a pg_cron job calling public.agent_tasks_prune. Pending and processing rows
-- are never deleted. Locking: a prune locks only finished rows (FOR UPDATE SKIP LOCKED)
-- and never agent_task_tenants, so a claim and a prune never wait for each other; a batch
-- is one short transaction of at most p_batch rows (10,000 at most).

-- One batch: at most p_batch finished rows whose finished_at is older than p_older_than,
-- the oldest first, with their chunks. Returns how many rows it deleted; fewer than
-- p_batch means none are left (but rows other transactions held at the time).
create function agent_bridge.prune_finished(
    p_older_than interval, p_batch integer default 500)
returns integer
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_ids uuid[];
    v_deleted integer;
begin
    perform agent_bridge.check_prune(p_older_than, p_batch);
    if p_older_than is null or p_batch is null then
        return 0;
    end if;
    -- Locked here, skipping rows another transaction holds; a row requeued meanwhile
    -- (no longer finished) is re-checked under the lock and left alone.
    select coalesce(array_agg(d.id), '{}') into v_ids
      from (select t.id from public.agent_task_requests t
             where t.status in ('completed', 'failed')
               and t.finished_at < now() - p_older_than
             order by t.finished_at
             limit p_batch
               for update skip locked) d;
    if cardinality(v_ids) = 0 then
        return 0;
    end if;
    -- Chunks live only while their attempt runs, so a finished row normally has none;
    -- any left by a hand edit go with their row (the delete trigger of
    -- 20261130001000_stream.sql covers processing rows only).
    delete from public.agent_task_chunks k where k.task_id = any (v_ids);
    delete from public.agent_task_requests t where t.id = any (v_ids);
    get diagnostics v_deleted = row_count;
    return v_deleted;
end
$$;

-- How many finished rows prune_finished would delete now (all batches together).
create function agent_bridge.count_prunable(p_older_than interval)
returns bigint
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
    perform agent_bridge.check_prune(p_older_than, 1);
    -- (null: no row is older than an unknown age)
    return (select count(*) from public.agent_task_requests t
             where t.status in ('completed', 'failed')
               and t.finished_at < now() - p_older_than);
end
$$;

-- At most p_batch rows of agent_bridge.user_day_usage for days before yesterday (UTC);
-- 0 where that table is not installed. p_dry_run: how many there are, deleting none.
-- Definer: the counters are the database's own bookkeeping; a prune must not depend on
-- the caller's grants on them (nor fail where that table is private).
create function agent_bridge.prune_day_usage(
    p_batch integer default 500, p_dry_run boolean default false)
returns integer
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    v_before date := (now() at time zone 'utc')::date - 1;
    v_deleted integer;
begin
    perform agent_bridge.check_prune(interval '0', p_batch);
    if to_regclass('agent_bridge.user_day_usage') is null then
        return 0;
    end if;
    if coalesce(p_dry_run, false) then
        return (select count(*) from agent_bridge.user_day_usage u where u.day < v_before);
    end if;
    if p_batch is null then
        return 0;
    end if;
    -- Only old days: today's counters (which inserts update, under lock) are not read.
    delete from agent_bridge.user_day_usage u
     where u.ctid = any (array(select x.ctid from agent_bridge.user_day_usage x
                                where x.day < v_before
                                limit p_batch
                                  for update skip locked));
    get diagnostics v_deleted = row_count;
    return v_deleted;
end
$$;

-- One batch of each (at most p_batch finished rows with their chunks, and at most p_batch
-- old day counters), in the caller's transaction; call it again while either count
-- equals p_batch. p_dry_run: how many there are in all, deleting nothing. A null
-- p_older_than does nothing.
create function public.agent_tasks_prune(
    p_older_than interval, p_batch integer default 500, p_dry_run boolean default false)
returns table (tasks bigint, day_usage bigint)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    perform agent_bridge.check_prune(p_older_than, p_batch);
    if p_older_than is null then
        return query select 0::bigint, 0::bigint;
    elsif coalesce(p_dry_run, false) then
        return query select agent_bridge.count_prunable(p_older_than),
                            agent_bridge.prune_day_usage(p_batch, true)::bigint;
    else
        return query select agent_bridge.prune_finished(p_older_than, p_batch)::bigint,
                            agent_bridge.prune_day_usage(p_batch, false)::bigint;
    end if;
end
$$;

-- 4.7 Counts --------------------------------------------------------------------------------

-- Counts for `agent-bridge status` and the bridge's heartbeat.
create function public.agent_tasks_stats()
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

-- Counts per agent for `agent-bridge status` and the bridge's per-agent metrics.
create function public.agent_tasks_agent_stats()
returns table (
    agent text, pending bigint, due bigint, processing bigint, completed bigint,
    failed bigint, oldest_due_seconds double precision)
language sql
stable
security invoker
set search_path = ''
as $$
    select t.agent,
           count(*) filter (where t.status = 'pending'),
           count(*) filter (where t.status = 'pending' and t.run_at <= now()),
           count(*) filter (where t.status = 'processing'),
           count(*) filter (where t.status = 'completed'),
           count(*) filter (where t.status = 'failed'),
           extract(epoch from now() - min(t.run_at) filter (
               where t.status = 'pending' and t.run_at <= now()
                 and isfinite(t.run_at)))::double precision
      from public.agent_task_requests t
     group by t.agent
     order by t.agent;
$$;

-- 4.8 Batched writes ------------------------------------------------------------------------

-- Many writes of the worker's attempts in one call, one commit (issue 23): element i of
-- each array is write i. p_kinds[i] is one of
--   bind       agent_task_start's write, without the payload  p_seconds: the lease
--   start      agent_task_start                               p_seconds: the lease
--   heartbeat  agent_task_heartbeat                           p_seconds: the lease
--   append     agent_task_append                              p_seqs, p_offsets, p_texts
--   progress   agent_task_progress                            p_docs: the response
--   complete   agent_task_complete                            p_docs: the response
--   fail       agent_task_fail                                p_docs: the error
--   retry      agent_task_schedule_retry                      p_docs: the error,
--                                                             p_delays, p_seconds
--   cancelled  agent_task_cancelled                           p_docs: the partial (or null)
--   usage      agent_task_report_usage                        p_docs: the usage, p_seqs: run
--   wait       agent_task_wait                                p_docs: what is asked,
--                                                             p_seconds: its timeout
-- with p_ids, p_attempts, p_workers the write's row, attempt and worker, and null in the
-- arrays a kind does not use. Each write is exactly its function's, fenced per row.
--
-- Returns one row per write, in order, ord = i: whether it applied, and the row as that
-- write left it; for a write refused, the row as the call leaves it (applied false, and
-- null columns if there is no such row). request_payload is a start's, when it applied;
-- max_attempts .. agent are filled for binds and starts (applied or refused, as
-- agent_task_start fills them), null for the other kinds.
--
-- Order: binds and starts, usage, heartbeats, appends, progress, then the outcomes
-- (complete, fail, retry, wait, cancelled). So an attempt's chunks and its outcome may
-- share a call: the outcome comes last and the chunks go with the attempt
-- (agent_task_requests_stream_end).
-- Binds, heartbeats, appends (one multi-row INSERT of chunks), completes and failures are
-- one statement each, whatever their number (agent_bridge.write_*); progress, retries,
-- waits, cancels and starts are rare, and run one by one.
--
-- Writes of one kind to one row in one call apply as they would one after another:
-- heartbeats (and binds) of one attempt and worker all apply, the last giving the lease;
-- of two completes (or failures) of one attempt the first applies and the second is
-- refused; appends each insert their chunk (one seq twice fails the call, 23505, as the
-- second agent_task_append would).
--
-- Arguments are checked as the functions check them (lease and delay seconds, an applied
-- append's seq, offset and text), and so are the arrays' lengths (a null array counts as
-- empty) and the kinds (22023): one bad write fails the whole call, which changes
-- nothing; the caller then sends the writes one by one. The commit is relaxed
-- (agent_bridge.relax_commit) only for a call without outcomes: an outcome waits for the
-- disk, as it does alone.
create function public.agent_tasks_write(
    p_kinds text[],
    p_ids uuid[],
    p_attempts integer[],
    p_workers text[],
    p_docs jsonb[],
    p_seconds double precision[],
    p_delays double precision[],
    p_seqs integer[],
    p_offsets integer[],
    p_texts text[])
returns table (ord integer, applied boolean, status text, attempts integer, worker text,
               request_payload jsonb, max_attempts integer, priority integer, user_id uuid,
               enterprise_id text, created_at timestamptz, agent text, budget jsonb)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
declare
    n integer := coalesce(cardinality(p_kinds), 0);
    v_kinds text[];
    v_done agent_bridge.write_result[] := '{}';
    v_one public.agent_task_write;
    v_bad record;
    r record;
    v_budgets jsonb;
    v_refused integer[];
begin
    -- The checks are plain expressions where they can be: most calls carry one write (a
    -- prefork child's), and each query here is a statement more per task.
    -- (a null array counts as empty: a call of nulls does nothing, as null arguments do
    -- for the other state functions)
    if coalesce(cardinality(p_ids), 0) <> n or coalesce(cardinality(p_attempts), 0) <> n
       or coalesce(cardinality(p_workers), 0) <> n or coalesce(cardinality(p_docs), 0) <> n
       or coalesce(cardinality(p_seconds), 0) <> n or coalesce(cardinality(p_delays), 0) <> n
       or coalesce(cardinality(p_seqs), 0) <> n or coalesce(cardinality(p_offsets), 0) <> n
       or coalesce(cardinality(p_texts), 0) <> n then
        raise exception 'p_kinds, p_ids, p_attempts, p_workers, p_docs, p_seconds, p_delays, '
                        'p_seqs, p_offsets and p_texts must be arrays of one length (one '
                        'element per write), got lengths %',
            array_to_string(array[cardinality(p_kinds), cardinality(p_ids),
                cardinality(p_attempts), cardinality(p_workers), cardinality(p_docs),
                cardinality(p_seconds), cardinality(p_delays), cardinality(p_seqs),
                cardinality(p_offsets), cardinality(p_texts)], ', ', 'null')
            using errcode = '22023';
    end if;
    if n = 0 then
        return;
    elsif n = 1 then
        v_kinds := p_kinds;
    else
        select array_agg(distinct k.kind) into v_kinds from unnest(p_kinds) k(kind);
    end if;
    if array_position(v_kinds, null) is not null
       or not v_kinds <@ array['bind', 'start', 'heartbeat', 'append', 'progress', 'complete',
                               'fail', 'retry', 'cancelled', 'usage', 'wait'] then
        select k.ord, k.kind into v_bad
          from unnest(p_kinds) with ordinality k(kind, ord)
         where k.kind is null
            or k.kind not in ('bind', 'start', 'heartbeat', 'append', 'progress', 'complete',
                              'fail', 'retry', 'cancelled', 'usage', 'wait')
         order by k.ord
         limit 1;
        raise exception 'p_kinds[%] is %, not a kind of write', v_bad.ord,
            coalesce('"' || v_bad.kind || '"', 'null')
            using errcode = '22023',
                  hint = 'The kinds are bind, start, heartbeat, append, progress, complete, '
                         'fail, retry, cancelled, usage and wait.';
    end if;
    -- (a null id is a write to no row, as in the functions: nothing to check)
    if n = 1 then
        if p_ids[1] is not null
           and p_kinds[1] in ('bind', 'start', 'heartbeat', 'retry', 'wait') then
            perform agent_bridge.check_seconds('p_seconds[1]', p_seconds[1], false);
            if p_kinds[1] = 'retry' then
                perform agent_bridge.check_seconds('p_delays[1]', p_delays[1], true);
            end if;
        end if;
    elsif v_kinds && array['bind', 'start', 'heartbeat', 'retry', 'wait'] then
        perform agent_bridge.check_seconds(format('p_seconds[%s]', u.ord), u.secs, false),
                case when u.kind = 'retry'
                     then agent_bridge.check_seconds(format('p_delays[%s]', u.ord), u.delay,
                                                     true) end
           from unnest(p_kinds, p_ids, p_seconds, p_delays)
                with ordinality u(kind, id, secs, delay, ord)
          where u.kind in ('bind', 'start', 'heartbeat', 'retry', 'wait') and u.id is not null
          order by u.ord;
    end if;

    if not v_kinds && array['complete', 'fail', 'retry', 'cancelled', 'wait'] then
        perform agent_bridge.relax_commit();
    end if;

    -- One write (a prefork child's, a quiet worker's): its single-row function, which does
    -- exactly what the set-based statements below do for one row, at less than half the
    -- cost (no arrays to unpack and join back). A missing row gives the empty answer.
    if n = 1 then
        if p_kinds[1] in ('bind', 'start') then
            return query
            select 1, coalesce(s.applied, false), s.status, s.attempts, s.worker,
                   case when p_kinds[1] = 'start' then s.request_payload end,
                   s.max_attempts, s.priority, s.user_id, s.enterprise_id, s.created_at,
                   s.agent, s.budget
              from (select) one
              left join public.agent_task_start(p_ids[1], p_attempts[1], p_workers[1],
                                                p_seconds[1], p_docs[1]) s on true;
            return;
        end if;
        case p_kinds[1]
            when 'heartbeat' then
                select * into v_one from public.agent_task_heartbeat(
                    p_ids[1], p_attempts[1], p_workers[1], p_seconds[1]);
            when 'append' then
                select * into v_one from public.agent_task_append(
                    p_ids[1], p_attempts[1], p_workers[1], p_seqs[1], p_offsets[1], p_texts[1]);
            when 'progress' then
                select * into v_one from public.agent_task_progress(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
            when 'complete' then
                select * into v_one from public.agent_task_complete(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
            when 'fail' then
                select * into v_one from public.agent_task_fail(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
            when 'retry' then
                select * into v_one from public.agent_task_schedule_retry(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1], p_delays[1],
                    p_seconds[1]);
            when 'wait' then
                select * into v_one from public.agent_task_wait(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1], p_seconds[1]);
            when 'usage' then
                select * into v_one from public.agent_task_report_usage(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1], p_seqs[1]);
            else
                select * into v_one from public.agent_task_cancelled(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
        end case;
        return query select 1, coalesce(v_one.applied, false), v_one.status, v_one.attempts,
                            v_one.worker, null::jsonb, null::integer, null::integer,
                            null::uuid, null::text, null::timestamptz, null::text, null::jsonb;
        return;
    end if;

    if v_kinds && array['bind', 'start'] then
        v_done := v_done || array(select w from agent_bridge.write_bind(
            p_kinds, p_ids, p_attempts, p_workers, p_seconds) w);
        -- What the binds' handlers declared they may spend, reserved (issue 25); a bind
        -- whose tenant has nothing left is refused, its row failed.
        select jsonb_object_agg(g.ord::text, g.budget),
               array_agg(g.ord) filter (where g.refusal is not null)
          into v_budgets, v_refused
          from agent_bridge.reserve_spend(
                   array(select d.ord from unnest(v_done) d
                          where p_kinds[d.ord] in ('bind', 'start')),
                   p_ids, p_attempts, p_workers, p_docs) g;
        if v_refused is not null then
            v_done := array(select d from unnest(v_done) d where d.ord <> all (v_refused));
        end if;
    end if;
    if 'usage' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_usage(
            p_kinds, p_ids, p_attempts, p_workers, p_docs, p_seqs) w);
    end if;
    if 'heartbeat' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_heartbeat(
            p_kinds, p_ids, p_attempts, p_workers, p_seconds) w);
    end if;
    if 'append' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_append(
            p_kinds, p_ids, p_attempts, p_workers, p_seqs, p_offsets, p_texts) w);
    end if;
    if 'progress' = any (v_kinds) then
        for r in select u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc
                   from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs)
                        with ordinality u(kind, id, attempt, worker, doc, ord)
                  where u.kind = 'progress'
                  order by u.ord loop
            select * into v_one
              from public.agent_task_progress(r.id, r.attempt, r.worker, r.doc);
            if v_one.applied then
                v_done := v_done || row(r.ord, true, v_one.status, v_one.attempts, v_one.worker,
                                        null, null, null, null, null, null, null
                                       )::agent_bridge.write_result;
            end if;
        end loop;
    end if;
    if 'complete' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_complete(
            p_kinds, p_ids, p_attempts, p_workers, p_docs) w);
    end if;
    if 'fail' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_fail(
            p_kinds, p_ids, p_attempts, p_workers, p_docs) w);
    end if;
    if v_kinds && array['retry', 'cancelled', 'wait'] then
        for r in select u.ord::integer as ord, u.kind, u.id, u.attempt, u.worker, u.doc,
                        u.delay, u.secs
                   from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs, p_delays, p_seconds)
                        with ordinality u(kind, id, attempt, worker, doc, delay, secs, ord)
                  where u.kind in ('retry', 'cancelled', 'wait')
                  order by u.kind = 'cancelled', u.ord loop
            if r.kind = 'retry' then
                select * into v_one
                  from public.agent_task_schedule_retry(r.id, r.attempt, r.worker, r.doc,
                                                        r.delay, r.secs);
            elsif r.kind = 'wait' then
                select * into v_one
                  from public.agent_task_wait(r.id, r.attempt, r.worker, r.doc, r.secs);
            else
                select * into v_one
                  from public.agent_task_cancelled(r.id, r.attempt, r.worker, r.doc);
            end if;
            if v_one.applied then
                v_done := v_done || row(r.ord, true, v_one.status, v_one.attempts, v_one.worker,
                                        null, null, null, null, null, null, null
                                       )::agent_bridge.write_result;
            end if;
        end loop;
    end if;

    -- One row per write: the applied ones as they left the row, the others as it is now.
    -- When every write applied, the answer is what they returned: the statement that reads
    -- the table for the others is planned afresh at every call (its custom plan wins), a
    -- tenth of a millisecond per batch (issue 23).
    if cardinality(v_done) = n then
        return query
        select d.ord, true, d.status, d.attempts, d.worker, d.request_payload, d.max_attempts,
               d.priority, d.user_id, d.enterprise_id, d.created_at, d.agent,
               v_budgets -> d.ord::text
          from unnest(v_done) d
         order by d.ord;
        return;
    end if;
    return query
    select u.ord::integer,
           d.ord is not null,
           case when d.ord is not null then d.status else t.status::text end,
           case when d.ord is not null then d.attempts else t.attempts end,
           case when d.ord is not null then d.worker else t.worker end,
           d.request_payload,
           case when d.ord is not null then d.max_attempts
                when u.kind in ('bind', 'start') then t.max_attempts end,
           case when d.ord is not null then d.priority
                when u.kind in ('bind', 'start') then t.priority end,
           case when d.ord is not null then d.user_id
                when u.kind in ('bind', 'start') then t.user_id end,
           case when d.ord is not null then d.enterprise_id
                when u.kind in ('bind', 'start') then t.enterprise_id end,
           case when d.ord is not null then d.created_at
                when u.kind in ('bind', 'start') then t.created_at end,
           case when d.ord is not null then d.agent
                when u.kind in ('bind', 'start') then t.agent end,
           case when d.ord is not null then v_budgets -> u.ord::text end
      from unnest(p_kinds, p_ids) with ordinality u(kind, id, ord)
      left join unnest(v_done) d on d.ord = u.ord
      left join public.agent_task_requests t on d.ord is null and t.id = u.id
     order by u.ord;
end
$$;

-- 4.9 Questions (human in the loop) --------------------------------------------------------

-- Issue 26: a handler that must ask before it acts (send the email?
-- spend $40?) stops, waits as long as it takes without holding a worker, and goes on with
-- the answer.
--
--   processing ──wait (tasks.ask)──▶ pending, waiting_for = the question, run_at = deadline
--   pending, waiting ──answer_agent_task──▶ pending, due now (the answer recorded)
--   pending, waiting, deadline passed ──claim──▶ failed (NoAnswer), no worker involved
--   pending, waiting ──cancel──▶ failed (Cancelled)
--
-- A waiting row is `pending`: no worker holds it and no lease runs (a lease is what
-- `processing` means, and a processing row would hold one of its tenant's
-- max_processing slots for hours); it is queued again the moment it is answered, and
-- cancelling it ends it at once, as any queued row. What tells it apart is `waiting_for`
-- ({question, asked_at, expires_at, number}), which only a pending row may hold. Its
-- run_at is the question's deadline, so the tenant sleeps until then like any future
-- row, and the claim that finds it due ends it NoAnswer instead of sending it to a
-- worker (an answer makes it due at once and clears waiting_for).
--
-- The handler runs again from the top with the answers so far (`answers`, in order:
-- {question, answer, answered_at} each), which tasks.ask() returns one by one, so a
-- handler written top to bottom replays to where it stopped. Each answered question
-- costs one attempt of its own; the wait raises max_attempts by one, so asking never
-- uses up the attempts a crash may need.

-- The error of a question that expired unanswered.
create function agent_bridge.no_answer_error(p_waiting jsonb, p_attempt integer)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select jsonb_build_object(
        'type', 'NoAnswer',
        'message', format('No answer came before the question expired (%s); the task '
                          'stopped there.', p_waiting ->> 'expires_at'),
        'retryable', false, 'at', now(), 'attempt', p_attempt,
        'question', p_waiting -> 'question');
$$;

-- The holder asks its user (p_waiting: {"question": ...}, at most 16 KiB) and lets the
-- attempt go: the row goes back to pending, waiting, until an answer or p_timeout_seconds.
-- Fenced like every write. With a cancel request on the row it ends failed / Cancelled
-- instead (agent_task_requests_cancel_guard).
create function public.agent_task_wait(
    p_id uuid, p_attempt integer, p_worker text, p_waiting jsonb,
    p_timeout_seconds double precision)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_size bigint;
begin
    if p_id is not null then
        perform agent_bridge.check_seconds('p_timeout_seconds', p_timeout_seconds, false);
        if jsonb_typeof(p_waiting) is distinct from 'object' or not p_waiting ? 'question' then
            raise exception 'p_waiting must be an object with a "question", got %',
                left(coalesce(p_waiting::text, 'null'), 100) using errcode = '22023';
        end if;
        v_size := agent_bridge.payload_bytes(p_waiting);
        if v_size > 16384 then
            raise exception 'the question is % bytes; at most 16384 bytes may be asked', v_size
                using errcode = '22023';
        end if;
    end if;
    return query
    update public.agent_task_requests t
       set status = 'pending',
           worker = null,
           lease_expires_at = null,
           run_at = now() + make_interval(secs => p_timeout_seconds),
           max_attempts = t.max_attempts + 1,
           waiting_for = case when t.cancel_requested_at is null then
               p_waiting || jsonb_build_object(
                   'asked_at', now(),
                   'expires_at', now() + make_interval(secs => p_timeout_seconds),
                   'number', coalesce(jsonb_array_length(t.answers), 0) + 1) end
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- The answers so far, for the holder of (p_id, p_attempt) only ('[]' when none yet); no
-- row for anyone else. (Two columns: PostgREST sends a one-column table as bare values.) Read once per run, by the first tasks.ask() of a handler.
create function public.agent_task_answers(p_id uuid, p_attempt integer, p_worker text)
returns table (attempt integer, answers jsonb)
language sql
stable
security invoker
set search_path = ''
as $$
    select t.attempts, coalesce(t.answers, '[]'::jsonb)
      from public.agent_task_requests t
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker;
$$;

-- supabase.rpc('answer_agent_task', { task_id, answer }) -> 'pending': the answer (any
-- JSON value, at most 64 KiB) is recorded and the task queued again, to run on from its
-- question. A signed-in user may answer exactly the rows they own (user_id = auth.uid()),
-- as with cancel_agent_task; roles that bypass RLS any row. Refused with a message that
-- says why (P0001, 400 through PostgREST): no such task of the caller's, not waiting for
-- an answer (never asked, already answered, finished), or the question expired; and
-- (22023, 400) an answer that is SQL null or too large. Security definer, because users
-- have no UPDATE on the table: the ownership check below is what RLS would be.
create function public.answer_agent_task(task_id uuid, answer jsonb)
returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    r public.agent_task_requests;
    v_size bigint;
begin
    if not agent_bridge.may_act_on(task_id) then
        -- exactly as for an id that does not exist
        raise exception 'no agent task % of yours', task_id using errcode = 'P0001';
    end if;
    if answer is null then
        raise exception 'answer must be a JSON value (a SQL null is not one)'
            using errcode = '22023';
    end if;
    v_size := agent_bridge.payload_bytes(answer);
    if v_size > 65536 then
        raise exception 'the answer is % bytes; at most 65536 bytes may be sent', v_size
            using errcode = '22023',
                  hint = 'Answer with less, or store large data elsewhere and send a reference.';
    end if;
    select * into r from public.agent_task_requests t where t.id = task_id for update;
    if not found then
        raise exception 'no agent task % of yours', task_id using errcode = 'P0001';
    end if;
    if r.waiting_for is null then
        raise exception 'agent task % is not waiting for an answer: %', task_id,
            case when r.status = 'pending' and r.answers is not null
                     then 'it has its answer and is queued to go on'
                 when r.status = 'pending' then 'it is queued and has asked nothing'
                 when r.status = 'processing' then 'it is running'
                 else 'it has finished (' || r.status || ')' end
            using errcode = 'P0001';
    end if;
    if r.run_at <= now() then
        raise exception 'the question of agent task % expired at %', task_id,
            r.waiting_for ->> 'expires_at'
            using errcode = 'P0001', hint = 'The task ends failed / NoAnswer.';
    end if;
    update public.agent_task_requests t
       -- status is listed (unchanged) so that the wake-up trigger,
       -- agent_task_requests_notify, tells the bridge the row is due
       set status = 'pending',
           answers = coalesce(t.answers, '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
               'question', r.waiting_for -> 'question', 'answer', answer,
               'answered_at', now())),
           waiting_for = null,
           run_at = now()
     where t.id = task_id;
    return 'pending';
end
$$;

-- 5. Triggers -------------------------------------------------------------------------------
--
-- Triggers of the same kind fire in name order, which some of these rely on (said where).
-- BEFORE INSERT: 0_idempotency, admit, check_agent, check_request, check_request_shape.
-- BEFORE UPDATE: cancel_guard, check_agent, check_request, check_request_shape,
-- stream_end, touch. AFTER: notify, stream_delete, tenants_inserted, tenants_updated.

-- Idempotency keys (issue 26): a second insert with a key in use for the same user and
-- agent is refused with 23505 (409 through PostgREST), naming the task that has it. First
-- of the BEFORE INSERT triggers ("0_"), so a refused retry counts against no quota or day
-- budget, and a user at their active-task limit is told about the task they have. Under a
-- lock on (user, agent, key): of concurrent inserts with one key, the first commits and
-- the others then see it; the unique index backs it up (a repeatable read transaction's
-- snapshot cannot see the first). Rows without user_id share one key space per agent.
create function public.agent_task_requests_idempotency()
returns trigger
language plpgsql
security invoker
set search_path = ''
as $$
declare
    v_length integer := char_length(new.idempotency_key);
    v_task record;
begin
    if v_length < 1 or v_length > 200 then
        raise exception 'idempotency_key must be 1 to 200 characters long, got %', v_length
            using errcode = '22023',
                  hint = 'Use one short string per request, such as a UUID.';
    end if;
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        'agent_task_requests idempotency ' || coalesce(new.user_id::text, '-') || ' '
        || new.agent || ' ' || new.idempotency_key, 0));
    -- Runs as the inserting user: a user sees their own rows (RLS), the ones that matter.
    if new.user_id is null then
        select t.id, t.status, t.created_at into v_task
          from public.agent_task_requests t
         where t.user_id is null and t.agent = new.agent
           and t.idempotency_key = new.idempotency_key;
    else
        select t.id, t.status, t.created_at into v_task
          from public.agent_task_requests t
         where t.user_id = new.user_id and t.agent = new.agent
           and t.idempotency_key = new.idempotency_key;
    end if;
    if found then
        raise exception 'idempotency_key "%" is already used by task % (agent "%")',
            new.idempotency_key, v_task.id, new.agent
            using errcode = '23505',
                  detail = format('Task %s has this key: %s, created %s.',
                                  v_task.id, v_task.status, v_task.created_at),
                  hint = 'Follow that task instead of submitting again: select it by id, '
                         'or by agent and idempotency_key.';
    end if;
    return new;
end
$$;

create trigger agent_task_requests_0_idempotency
    before insert on public.agent_task_requests
    for each row when (new.idempotency_key is not null)
    execute function public.agent_task_requests_idempotency();

-- Admission: what a signed-in user may insert. Users are the roles row-level security
-- applies to (authenticated); the service role and the database owner bypass RLS and are
-- not limited. In order: the enterprise (from the JWT), the agent allow-list (it needs no
-- lock), the priority band, the run_at horizon, the quota of active rows and the day
-- budgets (under one per-user lock). Runs as the inserting user: it sees only the user's
-- own rows and limits, as RLS allows.
create function public.agent_task_requests_admit()
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
    v_budgeted boolean;
    v_spent jsonb;
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
                    max(l.allowed_agents) filter (where l.tenant = '*')),
           bool_or(l.token_budget is not null or l.cost_budget is not null)
      into v_max_active, v_min_priority, v_max_priority, v_horizon, v_max_rows, v_max_bytes,
           v_agents, v_budgeted
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

    -- The spend budgets (issue 25): refused once spent, saying which and when it resets.
    if v_budgeted then
        v_spent := agent_bridge.budget_exceeded(v_tenant, false);
        if v_spent is not null then
            raise exception '%', v_spent ->> 'message'
                using errcode = 'P0001',
                      detail = format('Tenant %s, %s budget per %s.', v_tenant,
                                      v_spent ->> 'budget', v_spent ->> 'period'),
                      hint = 'Wait for the reset, or ask the operator to raise '
                             || (v_spent ->> 'budget') || '_budget in agent_tenant_limits.';
        end if;
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

create trigger agent_task_requests_admit
    before insert on public.agent_task_requests
    for each row execute function public.agent_task_requests_admit();

-- A row with a cancel request never goes back to the queue or completes: whatever state
-- function moves it out of `processing` (complete, fail, release, rescue, schedule_retry
-- letting go of it), it ends `failed` with error.type Cancelled and its partial answer
-- (the streamed one folded in). So a handler that ignores cancellation has its result
-- discarded, a retry scheduled after the request is fenced out, and a holder that died
-- after the request is not run again by rescue. A requeue clears the request. Runs before
-- agent_task_requests_stream_end and _touch; rows never asked to stop (nearly all) do not
-- even call it.
create function public.agent_task_requests_cancel_guard()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
    message text := 'Cancelled on request while it was running.';
begin
    if old.status = 'failed' and new.status = 'pending' then
        new.cancel_requested_at := null;
    elsif old.status = 'processing'
          and (new.status <> 'processing' or new.worker is null)
          and (new.status <> 'failed' or new.error ->> 'type' is distinct from 'Cancelled') then
        new.status := 'failed';
        new.worker := null;
        new.error := jsonb_build_object('type', 'Cancelled', 'message', message,
                                        'retryable', false, 'at', now(),
                                        'attempt', old.attempts);
        new.response_payload := public.agent_task_cancelled_payload(
            agent_bridge.streamed_payload(old.id, old.attempts, old.response_payload), message);
        new.finished_at := now();
        new.lease_expires_at := null;
    end if;
    return new;
end
$$;

create trigger agent_task_requests_cancel_guard
    before update of status, worker on public.agent_task_requests
    for each row when (old.cancel_requested_at is not null)
    execute function public.agent_task_requests_cancel_guard();

-- Refuse a row for an agent nobody configured, at insert (and if a service changes
-- `agent` later), with the list of known ones, as a 400 through PostgREST (22023), so a
-- typo never waits in silence; a registered agent's max_attempts is given to its new
-- rows. Security definer: users may not read agent_bridge_agents themselves; the
-- function only reads it, with an empty search_path.
create function public.agent_task_requests_check_agent()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    configured integer;
    known text;
begin
    if new.agent is null or new.agent = 'default' then
        return new;  -- null: the not-null constraint answers
    end if;
    select a.max_attempts into configured
      from public.agent_bridge_agents a where a.name = new.agent;
    if not found then
        select string_agg(n, ', ' order by n) into known
          from (select 'default' as n
                union all select a.name from public.agent_bridge_agents a) names;
        raise exception 'unknown agent "%"; known agents: %', new.agent, known
            using errcode = '22023',
                  hint = 'Agents are the names in AGENTS, registered by agent-bridge run '
                         'when it starts.';
    end if;
    if tg_op = 'INSERT' and configured is not null then
        new.max_attempts := configured;
    end if;
    return new;
end
$$;

create trigger agent_task_requests_check_agent
    before insert or update of agent on public.agent_task_requests
    for each row execute function public.agent_task_requests_check_agent();

-- The payload is a JSON object within the size limit (the size as stored,
-- agent_bridge.payload_bytes). On INSERT a payload too large is not refused with an error
-- (an error rolls back, so nothing could be counted against the day budget): the row is
-- stored `failed` with error.type InvalidRequest, its payload replaced by {}, so the user
-- sees a readable error on the task, the budget counts it, and nobody claims it. On UPDATE
-- (the service changing a payload) it raises. A payload that is not a JSON object is
-- refused with an error: nothing could be stored for it. Change the limit with
--   alter database postgres set agent_bridge.max_request_bytes = '2097152';
create function public.agent_task_requests_check_request()
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

create trigger agent_task_requests_check_request
    before insert or update of request_payload on public.agent_task_requests
    for each row execute function public.agent_task_requests_check_request();

-- Runs after agent_task_requests_check_request (name order), so the payload is an object
-- within the size limit (or already {} on a failed row). run_at must be a finite time.
-- The depth is found by one jsonpath walk in C: `.**{N}` visits every value at most N
-- levels below the root and no deeper (so its recursion is bounded whatever the payload's
-- depth), and an exists-query stops at the first match. Depth counts objects and arrays
-- alike, the root object being level 1, so a container at level N + 1 (jsonpath level N)
-- is too deep. The path is lax so the search stops at the first match (strict mode
-- collects every match to look for errors); `.type()` does not unwrap arrays in lax mode,
-- where a filter would test an array's elements instead of the array. A payload too deep
-- fails the row on INSERT, as one too large does. Change the limit with
--   alter database postgres set agent_bridge.max_request_depth = '128';
create function public.agent_task_requests_check_shape()
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

create trigger agent_task_requests_check_request_shape
    before insert or update of request_payload, run_at on public.agent_task_requests
    for each row execute function public.agent_task_requests_check_shape();

-- A row that becomes pending wakes the bridge at once: a NOTIFY (payload: the row id) for
-- a LISTENing bridge (direct transport), and at most one `pending` Broadcast per
-- transaction for the Supabase transport (a bulk insert or a rescue of many rows wakes the
-- bridge once). Either way the bridge claims through agent_tasks_claim as usual.
create function public.agent_task_requests_notify()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if new.status = 'pending' then
        perform pg_notify('agent_task_requests', new.id::text);
        if current_setting('agent_bridge.wakeup_sent', true) is distinct from 'on' then
            perform set_config('agent_bridge.wakeup_sent', 'on', true);
            if agent_bridge.broadcasting() then
                perform realtime.send('{}'::jsonb, 'pending', 'agent_bridge:wakeups', true);
            end if;
        end if;
    end if;
    return null;
end
$$;

create trigger agent_task_requests_notify
    after insert or update of status on public.agent_task_requests
    for each row when (new.status = 'pending')
    execute function public.agent_task_requests_notify();

-- The end of an attempt: when the row leaves `processing` or its holder changes, its
-- chunks go. A state function that writes its own response_payload (complete, fail, a
-- cancel) keeps it; otherwise (back to pending, a retry, a takeover) the streamed answer
-- is folded in, as the row held it before chunks. Runs after
-- agent_task_requests_cancel_guard (name order), which folds the chunks itself.
-- A deleted processing row's chunks go too.
create function public.agent_task_requests_stream_end()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    if tg_op = 'DELETE' then
        delete from public.agent_task_chunks k where k.task_id = old.id;
        return old;
    end if;
    if new.response_payload is not distinct from old.response_payload then
        new.response_payload := agent_bridge.streamed_payload(old.id, old.attempts,
                                                              old.response_payload);
    end if;
    delete from public.agent_task_chunks k where k.task_id = old.id;
    return new;
end
$$;

create trigger agent_task_requests_stream_end
    before update of status, worker, attempts on public.agent_task_requests
    for each row
    when (old.status = 'processing' and old.worker is not null
          and (new.status is distinct from old.status or new.worker is distinct from old.worker
               or new.attempts is distinct from old.attempts))
    execute function public.agent_task_requests_stream_end();

create trigger agent_task_requests_stream_delete
    after delete on public.agent_task_requests
    for each row
    when (old.status = 'processing')
    execute function public.agent_task_requests_stream_end();

-- The tenants of rows that just became pending join the claim's rotation (or sleep until
-- their rows are due): agent_bridge.tenants_arrive, once per statement for inserts.
create function public.agent_task_requests_tenants_inserted()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    v_tenants text[];
    v_first timestamptz[];
begin
    -- (one pass over the rows, so the two arrays line up)
    select array_agg(x.tenant), array_agg(x.first_run_at) into v_tenants, v_first
      from (select n.tenant, min(n.run_at) as first_run_at from new_rows n
             where n.status = 'pending' group by n.tenant) x;
    perform agent_bridge.tenants_arrive(v_tenants, v_first);
    return null;
end
$$;

create trigger agent_task_requests_tenants_inserted
    after insert on public.agent_task_requests
    referencing new table as new_rows
    for each statement execute function public.agent_task_requests_tenants_inserted();

-- Rows back to pending (release, rescue, requeue), moved to another tenant, or moved
-- earlier (a pending row's run_at lowered, e.g. by the operator): the tenant may have to
-- wake sooner than it sleeps.
create function public.agent_task_requests_tenants_updated()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    perform agent_bridge.tenants_arrive(array[new.tenant], array[new.run_at]);
    return null;
end
$$;

create trigger agent_task_requests_tenants_updated
    after update of status, enterprise_id, user_id, run_at on public.agent_task_requests
    for each row
    when (new.status = 'pending'
          and (old.status is distinct from 'pending' or old.tenant is distinct from new.tenant
               or new.run_at < old.run_at))
    execute function public.agent_task_requests_tenants_updated();

-- updated_at, and finished_at and the lease kept in step with a status that a writer from
-- before agent-bridge (the guide's own worker, setting status alone) changed: without this
-- its updates would break the constraints while old and new workers overlap during an
-- upgrade. The state functions set both themselves, so for them this changes nothing.
create function public.agent_task_requests_touch()
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

create trigger agent_task_requests_touch
    before update on public.agent_task_requests
    for each row execute function public.agent_task_requests_touch();

-- The functions that send are security definer: a user's own insert or cancel fires
-- them, and realtime.send inserts into realtime.messages, which users may not write.
--
-- The `state` event: on a change of what a watcher shows (not on lease renewals, which
-- change only lease_expires_at and updated_at; the trigger's WHEN skips them without a call).
create function public.agent_task_requests_broadcast_state()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if agent_bridge.broadcasting() then
        perform realtime.send(agent_bridge.state_message(new), 'state',
                              'agent_task:' || new.id::text, true);
    end if;
    return null;
end
$$;

create trigger agent_task_requests_broadcast_state
    after update on public.agent_task_requests
    for each row
    when (old.status is distinct from new.status
          or old.attempts is distinct from new.attempts
          or old.cancel_requested_at is distinct from new.cancel_requested_at
          or old.error is distinct from new.error
          or old.response_payload is distinct from new.response_payload
          or old.waiting_for is distinct from new.waiting_for)
    execute function public.agent_task_requests_broadcast_state();

-- The `chunk` event: one message per piece, one trigger call per insert statement (the
-- worker writes a batch of pieces in one statement).
create function public.agent_task_chunks_broadcast()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if agent_bridge.broadcasting() then
        perform realtime.send(
                    jsonb_build_object('task_id', c.task_id, 'attempt', c.attempt,
                                       'seq', c.seq, 'answer_offset', c.answer_offset,
                                       'text', c.text, 'created_at', c.created_at),
                    'chunk', 'agent_task:' || c.task_id::text, true)
           from added c
          order by c.task_id, c.attempt, c.seq;
    end if;
    return null;
end
$$;

create trigger agent_task_chunks_broadcast
    after insert on public.agent_task_chunks
    referencing new table as added
    for each statement execute function public.agent_task_chunks_broadcast();

-- An attempt that ends, or changes holder, with its reservation unsettled: a holder that
-- had bound may have spent it all, so the tenant is charged the reservation (its tokens as
-- unreported_tokens); a row never bound gives it back. Security definer: a user's cancel
-- fires it, and users may not write agent_tenant_usage.
create function public.agent_task_requests_settle_spend()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    v jsonb := old.spend_reserved;
    v_tokens bigint := coalesce((v ->> 'tokens')::bigint, 0);
    v_cost numeric := coalesce((v ->> 'cost')::numeric, 0);
    v_charged boolean := old.worker is not null;
begin
    if new.spend_reserved is distinct from old.spend_reserved
       or (new.status = 'processing' and new.attempts = old.attempts
           and new.worker is not distinct from old.worker) then
        return new;  -- set or settled by this very write, or still held
    end if;
    perform agent_bridge.lock_usage(old.tenant, v ->> 'period',
                                    (v ->> 'period_start')::date);
    update public.agent_tenant_usage u
       set reserved_tokens = greatest(u.reserved_tokens - v_tokens, 0),
           reserved_cost = greatest(u.reserved_cost - v_cost, 0),
           unreported_tokens = u.unreported_tokens
                               + case when v_charged then v_tokens else 0 end,
           cost = u.cost + case when v_charged then v_cost else 0 end,
           attempts = u.attempts + case when v_charged then 1 else 0 end,
           updated_at = now()
     where u.tenant = old.tenant and u.period = v ->> 'period'
       and u.period_start = (v ->> 'period_start')::date;
    if v_charged then
        new.usage := agent_bridge.add_usage(new.usage, 0, 0, v_cost, v_tokens);
        perform agent_bridge.count_agent_usage(old.agent, 0, 0, v_tokens, v_cost);
    end if;
    new.spend_reserved := null;
    return new;
end
$$;

create trigger agent_task_requests_settle_spend
    before update on public.agent_task_requests
    for each row
    when (old.spend_reserved is not null)
    execute function public.agent_task_requests_settle_spend();

-- 6. Row-level security ---------------------------------------------------------------------
--
-- RLS is on for every table. The service role bypasses it; signed-in users
-- (authenticated) get only what a policy below allows, and anon nothing.

alter table public.agent_task_requests enable row level security;
alter table public.agent_task_chunks enable row level security;
alter table public.agent_bridge_agents enable row level security;
alter table public.agent_tenant_limits enable row level security;
alter table public.agent_task_tenants enable row level security;
alter table agent_bridge.user_day_usage enable row level security;
alter table agent_bridge.agent_usage enable row level security;

-- Users insert their own pending rows, and the failed rows the payload checks make of
-- them: a user cannot write `error` (no column grant) and no other trigger sets it on
-- insert, so the second branch admits only a row those checks failed (admit counted it
-- already).
create policy agent_task_requests_insert_own on public.agent_task_requests
    for insert to authenticated
    with check (
        user_id = (select auth.uid())
        and ((status = 'pending' and response_payload is null)
             or (status = 'failed' and error ->> 'type' = 'InvalidRequest'
                 and request_payload = '{}'::jsonb and attempts = 0))
    );

-- The admit trigger's enterprise rule as a policy, so no path around the trigger can
-- create a row for a foreign enterprise. (Restrictive: it narrows the policy above.)
create policy agent_task_requests_insert_enterprise on public.agent_task_requests
    as restrictive
    for insert to authenticated
    with check (enterprise_id is not distinct from
                nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''));

create policy agent_task_requests_select_own on public.agent_task_requests
    for select to authenticated
    using (user_id = (select auth.uid()));

-- Users read the chunks of the rows they may read (the row's own policy decides: the
-- subquery runs with the caller's rights); nobody but the service writes them.
create policy agent_task_chunks_select_visible on public.agent_task_chunks
    for select to authenticated
    using (exists (select 1 from public.agent_task_requests t where t.id = task_id));

-- A signed-in user may read the limits that apply to them (their tenant's and the
-- default), so a frontend can show them; nothing else.
create policy agent_tenant_limits_select_own on public.agent_tenant_limits
    for select to authenticated
    using (tenant = '*' or tenant = coalesce(
        nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''),
        (select auth.uid())::text));

alter table agent_bridge.realtime_broadcast enable row level security;

-- Who may join a task's topic. Created where realtime.messages exists (a Supabase
-- project, or the compat schema of the tests); elsewhere there is nothing to join.
do $$
begin
    if to_regclass('realtime.messages') is not null then
        create policy agent_task_broadcast_receive on realtime.messages
            for select to authenticated
            using (extension = 'broadcast'
                   and (select agent_bridge.may_receive((select realtime.topic()))));
    end if;
end
$$;

alter table public.agent_tenant_usage enable row level security;

create policy agent_tenant_usage_select_own on public.agent_tenant_usage
    for select to authenticated
    using (tenant = coalesce(
        nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''),
        (select auth.uid())::text));

-- 7. Grants ---------------------------------------------------------------------------------
--
-- Supabase grants anon and authenticated everything on new tables and functions by
-- default privileges, hence the revokes. service_role gets what the bridge and workers
-- use. Signed-in users get column grants: `agent_task_requests.worker`, the replica keys
-- and `agent_tenant_limits.note` are private, so a user cannot `select *` (PostgREST
-- `select=*` answers 403) and Realtime drops those columns from every event. A column a
-- later migration adds is private until that migration grants it.

revoke all on schema agent_bridge from public;
grant usage on schema agent_bridge to service_role;
-- The admit trigger runs as the inserting user, who needs the schema to reach
-- count_user_request and payload_bytes.
grant usage on schema agent_bridge to authenticated;

revoke all on table public.agent_task_requests from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_task_requests to service_role;
grant select (id, status, request_payload, response_payload, created_at, updated_at,
              attempts, max_attempts, priority, run_at, lease_expires_at, started_at,
              finished_at, error, user_id, enterprise_id, agent, tenant, cancel_requested_at,
              idempotency_key)
    on table public.agent_task_requests to authenticated;
-- Users choose these on insert; not the id (a duplicate would tell them another user's id
-- exists).
grant insert (status, request_payload, priority, run_at, user_id, enterprise_id, agent,
              idempotency_key)
    on table public.agent_task_requests to authenticated;

revoke all on table public.agent_task_chunks from public, anon, authenticated;
grant select, insert, delete on table public.agent_task_chunks to service_role;
grant select (task_id, attempt, seq, answer_offset, text, created_at)
    on table public.agent_task_chunks to authenticated;

revoke all on table public.agent_bridge_agents from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_bridge_agents to service_role;

revoke all on table public.agent_tenant_limits from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_tenant_limits to service_role;
grant select (tenant, max_active, min_priority, max_priority, run_at_horizon, max_processing,
              max_rows_per_day, max_request_bytes_per_day, allowed_agents)
    on table public.agent_tenant_limits to authenticated;

revoke all on table public.agent_task_tenants from public, anon, authenticated;
grant select, insert, update on table public.agent_task_tenants to service_role;
revoke all on sequence public.agent_task_claim_round, public.agent_task_tenant_arrival
    from public, anon, authenticated;
grant usage, select on sequence public.agent_task_claim_round, public.agent_task_tenant_arrival
    to service_role;

revoke all on table agent_bridge.user_day_usage from public, anon, authenticated;
grant select, insert, update, delete on table agent_bridge.user_day_usage to service_role;

-- Functions: the service role's, except where said below (and the schema version, in
-- section 8). The trigger functions admit, check_request, notify, tenants_inserted,
-- tenants_updated and touch keep PostgreSQL's default execute for PUBLIC: calling one
-- outside a trigger is an error.
do $$
declare
    fn text;
begin
    foreach fn in array array[
        'agent_bridge.check_seconds(text, double precision, boolean)',
        'agent_bridge.relax_commit()',
        'agent_bridge.streamed_answer(uuid, integer)',
        'agent_bridge.streamed_payload(uuid, integer, jsonb)',
        'agent_bridge.tenant_join_stamp()',
        'agent_bridge.tenant_next_run_at(text)',
        'agent_bridge.tenants_arrive(text[], timestamptz[])',
        'agent_bridge.check_prune(interval, integer)',
        'agent_bridge.claim_rows(integer, double precision, integer, text[], integer)',
        'agent_bridge.write_bind(text[], uuid[], integer[], text[], double precision[])',
        'agent_bridge.write_heartbeat(text[], uuid[], integer[], text[], double precision[])',
        'agent_bridge.write_append(text[], uuid[], integer[], text[], integer[], integer[], text[])',
        'agent_bridge.write_complete(text[], uuid[], integer[], text[], jsonb[])',
        'agent_bridge.write_fail(text[], uuid[], integer[], text[], jsonb[])',
        'agent_bridge.prune_finished(interval, integer)',
        'agent_bridge.count_prunable(interval)',
        'agent_bridge.prune_day_usage(integer, boolean)',
        'public.agent_tasks_claim(integer, double precision, integer, text[], integer)',
        'public.agent_task_start(uuid, integer, text, double precision, jsonb)',
        'public.agent_task_current(uuid)',
        'public.agent_task_heartbeat(uuid, integer, text, double precision)',
        'public.agent_task_progress(uuid, integer, text, jsonb)',
        'public.agent_task_append(uuid, integer, text, integer, integer, text)',
        'public.agent_task_complete(uuid, integer, text, jsonb)',
        'public.agent_task_fail(uuid, integer, text, jsonb)',
        'public.agent_task_schedule_retry(uuid, integer, text, jsonb, double precision, double precision)',
        'public.agent_task_release(uuid, integer)',
        'public.agent_tasks_rescue(integer)',
        'public.agent_tasks_requeue(uuid[], timestamptz, text, integer, integer)',
        'public.agent_task_cancelled_payload(jsonb, text)',
        'public.agent_task_request_cancel(uuid, integer, boolean)',
        'public.agent_task_cancelled(uuid, integer, text, jsonb)',
        'public.agent_tasks_cancel_requested(uuid[], integer[])',
        'public.agent_bridge_register_agents(jsonb)',
        'public.agent_task_tenants_activate(text[])',
        'public.agent_tasks_prune(interval, integer, boolean)',
        'public.agent_tasks_stats()',
        'public.agent_tasks_agent_stats()',
        'public.agent_tasks_write(text[], uuid[], integer[], text[], jsonb[], double precision[], double precision[], integer[], integer[], text[])'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

-- The admit trigger runs as the inserting user: these two are theirs too
-- (count_user_request refuses a call from outside a trigger).
revoke execute on function agent_bridge.count_user_request(bigint) from public, anon;
grant execute on function agent_bridge.count_user_request(bigint) to authenticated, service_role;
revoke execute on function agent_bridge.payload_bytes(jsonb) from public, anon;
grant execute on function agent_bridge.payload_bytes(jsonb) to authenticated, service_role;

-- Users cancel their own rows (the function checks ownership).
revoke execute on function agent_bridge.may_act_on(uuid) from public, anon, authenticated;
revoke execute on function public.cancel_agent_task(uuid) from public, anon;
grant execute on function public.cancel_agent_task(uuid) to authenticated, service_role;

-- Trigger functions nobody needs to call directly.
revoke execute on function public.agent_task_requests_cancel_guard() from public, anon, authenticated;
revoke execute on function public.agent_task_requests_check_agent() from public, anon, authenticated;
revoke execute on function public.agent_task_requests_check_shape() from public, anon, authenticated;
revoke execute on function public.agent_task_requests_stream_end() from public, anon, authenticated;
revoke execute on function public.agent_task_requests_idempotency() from public, anon, authenticated;

revoke all on table agent_bridge.realtime_broadcast from public, anon, authenticated;
grant select, update on table agent_bridge.realtime_broadcast to service_role;
revoke execute on function agent_bridge.broadcasting() from public, anon;
grant execute on function agent_bridge.broadcasting() to authenticated, service_role;
revoke execute on function agent_bridge.may_receive(text) from public, anon;
grant execute on function agent_bridge.may_receive(text) to authenticated, service_role;
revoke execute on function agent_bridge.state_message(public.agent_task_requests)
    from public, anon, authenticated;
revoke execute on function public.agent_task_requests_broadcast_state()
    from public, anon, authenticated;
revoke execute on function public.agent_task_chunks_broadcast() from public, anon, authenticated;

revoke all on table agent_bridge.agent_usage from public, anon, authenticated;
grant select, insert, update, delete on table agent_bridge.agent_usage to service_role;
revoke all on table public.agent_tenant_usage from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_tenant_usage to service_role;
grant select on table public.agent_tenant_usage to authenticated;
grant select (usage) on table public.agent_task_requests to authenticated;
grant select (token_budget, cost_budget, budget_period)
    on table public.agent_tenant_limits to authenticated;

do $$
declare
    fn text;
begin
    -- the admit trigger (as the inserting user) and agent_tenant_budget use these
    foreach fn in array array[
        'agent_bridge.budgets_exist()',
        'agent_bridge.budget_state(text)',
        'agent_bridge.budget_exceeded(text, boolean)'
    ] loop
        execute format('revoke execute on function %s from public, anon', fn);
        execute format('grant execute on function %s to authenticated, service_role', fn);
    end loop;
    foreach fn in array array[
        'agent_bridge.lock_usage(text, text, date)',
        'agent_bridge.spend_number(jsonb, text)',
        'agent_bridge.reserve_spend(integer[], uuid[], integer[], text[], jsonb[])',
        'agent_bridge.write_usage(text[], uuid[], integer[], text[], jsonb[], integer[])',
        'agent_bridge.add_usage(jsonb, bigint, bigint, numeric, bigint)',
        'public.agent_task_requests_settle_spend()',
        'public.agent_task_start(uuid, integer, text, double precision, jsonb)',
        'public.agent_task_report_usage(uuid, integer, text, jsonb, integer)',
        'public.agent_tenants_usage()',
        'public.agent_tasks_usage_totals()',
        'agent_bridge.count_agent_usage(text, bigint, bigint, bigint, numeric)',
        'public.agent_tasks_write(text[], uuid[], integer[], text[], jsonb[], double precision[], double precision[], integer[], integer[], text[])'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;
revoke execute on function public.agent_tenant_budget() from public, anon;
grant execute on function public.agent_tenant_budget() to authenticated, service_role;

-- Questions (section 4.9)
grant select (waiting_for, answers) on table public.agent_task_requests to authenticated;

revoke execute on function agent_bridge.no_answer_error(jsonb, integer)
    from public, anon, authenticated;
grant execute on function agent_bridge.no_answer_error(jsonb, integer) to service_role;
revoke execute on function public.agent_task_wait(uuid, integer, text, jsonb, double precision)
    from public, anon, authenticated;
grant execute on function public.agent_task_wait(uuid, integer, text, jsonb, double precision)
    to service_role;
revoke execute on function public.agent_task_answers(uuid, integer, text)
    from public, anon, authenticated;
grant execute on function public.agent_task_answers(uuid, integer, text) to service_role;
revoke execute on function public.answer_agent_task(uuid, jsonb) from public, anon;
grant execute on function public.answer_agent_task(uuid, jsonb) to authenticated, service_role;

-- 8. Publication and schema version ---------------------------------------------------------

-- Realtime: the guide's frontend subscribes to postgres_changes on the table, and follows
-- the chunks of its task.
alter publication supabase_realtime add table public.agent_task_requests;
alter publication supabase_realtime add table public.agent_task_chunks;

-- What the bridge asks to choose its wake-up path.
create function public.agent_bridge_broadcasting()
returns boolean
language sql
stable
security invoker
set search_path = ''
as $$ select agent_bridge.broadcasting() $$;

revoke execute on function public.agent_bridge_broadcasting() from public, anon, authenticated;
grant execute on function public.agent_bridge_broadcasting() to service_role;

-- What `agent-bridge check` compares with the version the running code expects
-- (bridge.migrate.SCHEMA_VERSION). 9: human in the loop.
create function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 9 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

-- PostgREST caches the functions and columns it can use; tell it to reload them.
notify pgrst, 'reload schema';
