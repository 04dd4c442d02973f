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

alter table public.agent_tenant_limits
    add column token_budget bigint
        constraint agent_tenant_limits_token_budget_check check (token_budget >= 0),
    add column cost_budget numeric(20, 6)
        constraint agent_tenant_limits_cost_budget_check check (cost_budget >= 0),
    add column budget_period text
        constraint agent_tenant_limits_budget_period_check
        check (budget_period in ('day', 'month'));

comment on column public.agent_tenant_limits.token_budget is
    'Tokens (input + output) the tenant may spend per budget_period (null = as ''*''; null in '
    '''*'' = no token budget).';
comment on column public.agent_tenant_limits.cost_budget is
    'Cost, in the unit handlers report (e.g. USD), the tenant may spend per budget_period '
    '(null = as ''*''; null in ''*'' = no cost budget).';
comment on column public.agent_tenant_limits.budget_period is
    '''day'' or ''month'' (UTC) (null = as ''*''; null in ''*'' = month).';

alter table public.agent_task_requests
    -- {input_tokens, output_tokens, cost[, unreported_tokens]}: what the task's attempts
    -- spent, summed; users may read it.
    add column usage jsonb,
    -- {tokens, cost, period, period_start}: what the running attempt's bind reserved;
    -- private to the service.
    add column spend_reserved jsonb,
    -- attempt * 100000 + run of the last usage report applied: a report is counted once.
    add column usage_mark bigint;

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

alter table public.agent_tenant_usage enable row level security;
alter table agent_bridge.agent_usage enable row level security;

create policy agent_tenant_usage_select_own on public.agent_tenant_usage
    for select to authenticated
    using (tenant = coalesce(
        nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''),
        (select auth.uid())::text));

-- Whether any tenant has a budget: the checks below are skipped (one probe of a small
-- table) where none has.
create function agent_bridge.budgets_exist()
returns boolean
language sql
stable
security invoker
set search_path = ''
as $$
    select exists (select 1 from public.agent_tenant_limits l
                    where l.token_budget is not null or l.cost_budget is not null)
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
language sql
volatile
security invoker
set search_path = ''
as $$
    insert into agent_bridge.agent_usage as a (agent, input_tokens, output_tokens,
                                                unreported_tokens, cost)
    values (p_agent, p_in, p_out, p_unreported, p_cost)
    on conflict (agent) do update
       set input_tokens = a.input_tokens + excluded.input_tokens,
           output_tokens = a.output_tokens + excluded.output_tokens,
           unreported_tokens = a.unreported_tokens + excluded.unreported_tokens,
           cost = a.cost + excluded.cost
$$;

-- A task's usage with more added.
create function agent_bridge.add_usage(
    p_usage jsonb, p_in bigint, p_out bigint, p_cost numeric, p_unreported bigint)
returns jsonb
language sql
immutable
set search_path = ''
as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'input_tokens', coalesce((p_usage ->> 'input_tokens')::bigint, 0) + p_in,
        'output_tokens', coalesce((p_usage ->> 'output_tokens')::bigint, 0) + p_out,
        'cost', coalesce((p_usage ->> 'cost')::numeric, 0) + p_cost,
        'unreported_tokens', nullif(coalesce((p_usage ->> 'unreported_tokens')::bigint, 0)
                                    + p_unreported, 0)))
$$;

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

-- The start returns the grant: its result gains `budget`.
drop function public.agent_task_start(uuid, integer, text, double precision);

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

-- The batch gains kind 'usage' and returns the binds' grants.
drop function public.agent_tasks_write(text[], uuid[], integer[], text[], jsonb[],
    double precision[], double precision[], integer[], integer[], text[]);

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
                               'fail', 'retry', 'cancelled', 'usage'] then
        select k.ord, k.kind into v_bad
          from unnest(p_kinds) with ordinality k(kind, ord)
         where k.kind is null
            or k.kind not in ('bind', 'start', 'heartbeat', 'append', 'progress', 'complete',
                              'fail', 'retry', 'cancelled', 'usage')
         order by k.ord
         limit 1;
        raise exception 'p_kinds[%] is %, not a kind of write', v_bad.ord,
            coalesce('"' || v_bad.kind || '"', 'null')
            using errcode = '22023',
                  hint = 'The kinds are bind, start, heartbeat, append, progress, complete, '
                         'fail, retry, cancelled and usage.';
    end if;
    -- (a null id is a write to no row, as in the functions: nothing to check)
    if n = 1 then
        if p_ids[1] is not null and p_kinds[1] in ('bind', 'start', 'heartbeat', 'retry') then
            perform agent_bridge.check_seconds('p_seconds[1]', p_seconds[1], false);
            if p_kinds[1] = 'retry' then
                perform agent_bridge.check_seconds('p_delays[1]', p_delays[1], true);
            end if;
        end if;
    elsif v_kinds && array['bind', 'start', 'heartbeat', 'retry'] then
        perform agent_bridge.check_seconds(format('p_seconds[%s]', u.ord), u.secs, false),
                case when u.kind = 'retry'
                     then agent_bridge.check_seconds(format('p_delays[%s]', u.ord), u.delay,
                                                     true) end
           from unnest(p_kinds, p_ids, p_seconds, p_delays)
                with ordinality u(kind, id, secs, delay, ord)
          where u.kind in ('bind', 'start', 'heartbeat', 'retry') and u.id is not null
          order by u.ord;
    end if;

    if not v_kinds && array['complete', 'fail', 'retry', 'cancelled'] then
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
    if v_kinds && array['retry', 'cancelled'] then
        for r in select u.ord::integer as ord, u.kind, u.id, u.attempt, u.worker, u.doc,
                        u.delay, u.secs
                   from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs, p_delays, p_seconds)
                        with ordinality u(kind, id, attempt, worker, doc, delay, secs, ord)
                  where u.kind in ('retry', 'cancelled')
                  order by u.kind = 'cancelled', u.ord loop
            if r.kind = 'retry' then
                select * into v_one
                  from public.agent_task_schedule_retry(r.id, r.attempt, r.worker, r.doc,
                                                        r.delay, r.secs);
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

create or replace function public.agent_tasks_claim(
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

notify pgrst, 'reload schema';
