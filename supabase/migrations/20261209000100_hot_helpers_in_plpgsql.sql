-- The small helpers every task meets, in PL/pgSQL (issue 23: Postgres CPU per task, and the
-- claim's time on PostgreSQL 15). No interface changes; schema version stays 9.
--
-- A SQL function with a SET clause (ours all have `set search_path = ''`) is never inlined,
-- and before PostgreSQL 18 each statement that calls one parses and plans its body again;
-- PL/pgSQL keeps its plans for the session. Measured on PostgreSQL 15 (pg_stat_user_functions,
-- the bridge and a prefork worker, one insert every 30 ms): agent_bridge.budgets_exist(),
-- run by every claim, polls included, 96 microseconds a call; agent_bridge.payload_bytes(),
-- run at every insert and every claimed row, 53; the same bodies in PL/pgSQL 1-2. The
-- others here run when a tenant joins the line or falls asleep, and at every outcome that
-- reports usage. Same bodies, same volatility, same grants (CREATE OR REPLACE keeps them).

create or replace function agent_bridge.payload_bytes(p_payload jsonb)
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

create or replace function agent_bridge.budgets_exist()
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

create or replace function agent_bridge.tenant_join_stamp()
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

create or replace function agent_bridge.tenant_next_run_at(p_tenant text)
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

create or replace function agent_bridge.count_agent_usage(
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

create or replace function agent_bridge.add_usage(
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

notify pgrst, 'reload schema';
