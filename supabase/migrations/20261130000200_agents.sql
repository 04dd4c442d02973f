-- agent-bridge: several agents, one table (issue 13). Idempotent.

-- The agent a row is for; its jobs go to the Celery queue agent_tasks.<agent>
-- (`default` keeps agent_tasks). Old inserts, without it, go to `default`.
alter table public.agent_task_requests
    add column if not exists agent text not null default 'default';

-- 1. The agents a bridge serves ----------------------------------------------------

-- Registered by `agent-bridge run` from its AGENTS setting each time it starts
-- (agent_bridge_register_agents). `default` (AGENT_HANDLER) is always known and is
-- not listed here. Before any bridge has registered, only `default` is accepted.
create table if not exists public.agent_bridge_agents (
    name text primary key
        check (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$' and name <> 'default'),
    queue text not null,
    -- max_attempts given to the agent's new rows; null keeps the table default.
    max_attempts integer check (max_attempts is null or max_attempts >= 1),
    registered_at timestamptz not null default now()
);

alter table public.agent_bridge_agents enable row level security;
revoke all on table public.agent_bridge_agents from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_bridge_agents to service_role;

-- 2. Refuse a row for an agent nobody configured ------------------------------------

-- At insert (and if a service changes `agent` later): an unknown agent is refused with
-- the list of known ones, as a 400 through PostgREST (22023), so a typo never waits in
-- silence. Security definer: users may not read agent_bridge_agents themselves; the
-- function only reads it, with an empty search_path.
create or replace function public.agent_task_requests_check_agent()
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

revoke execute on function public.agent_task_requests_check_agent() from public, anon, authenticated;

drop trigger if exists agent_task_requests_check_agent on public.agent_task_requests;
create trigger agent_task_requests_check_agent
    before insert or update of agent on public.agent_task_requests
    for each row execute function public.agent_task_requests_check_agent();

-- Users choose the agent on insert, like the payload.
grant insert (agent) on table public.agent_task_requests to authenticated;

-- 3. State functions ----------------------------------------------------------------

-- The bridge's AGENTS, replacing what was registered before: p_agents is
-- {"<name>": {"queue": "...", "max_attempts": n | null}, ...} (null: change nothing).
-- Returns what is now registered. Rows of an agent that is dropped stay as they are (pending rows wait
-- until it is configured again); new inserts for it are refused.
drop function if exists public.agent_bridge_register_agents(jsonb);
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

-- Counts per agent for `agent-bridge status` and the bridge's per-agent metrics.
drop function if exists public.agent_tasks_agent_stats();
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

-- agent_task_start, as before plus the row's `agent` (the worker runs that agent's
-- handler with its limits). The return type changes, so the old one is dropped first.
-- The body is the current one otherwise; its fencing is unchanged.
drop function if exists public.agent_task_start(uuid, integer, text, double precision);
create function public.agent_task_start(
    p_id uuid, p_attempt integer, p_worker text, p_lease_seconds double precision)
returns table (
    applied boolean, status text, attempts integer, worker text,
    request_payload jsonb, max_attempts integer, priority integer,
    user_id uuid, enterprise_id text, created_at timestamptz, agent text)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
declare
    r public.agent_task_requests;
begin
    if p_id is not null then
        perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    end if;
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
            r.user_id, r.enterprise_id, r.created_at, r.agent;
    else
        return query select false, t.status::text, t.attempts, t.worker,
            null::jsonb, t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at,
            t.agent
          from public.agent_task_requests t where t.id = p_id;
    end if;
end
$$;

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'public.agent_bridge_register_agents(jsonb)',
        'public.agent_tasks_agent_stats()',
        'public.agent_task_start(uuid, integer, text, double precision)'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;
