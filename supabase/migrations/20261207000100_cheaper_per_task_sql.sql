-- Less work per task in the state changes every task makes (issue 23: Postgres CPU per task).
--
-- 1. The NOTIFY trigger fires only for a row that becomes pending. It fired on every status
--    change (the claim, every outcome) and returned at once unless the row was pending: a
--    PL/pgSQL call per change for nothing.
-- 2. agent_bridge.broadcasting() (read by the state trigger of every claim and outcome) and
--    agent_bridge.relax_commit() (every claim, start and renewal) in PL/pgSQL. A SQL function
--    that cannot be inlined (these have SET clauses) is parsed and planned again on every
--    call before PostgreSQL 18; PL/pgSQL keeps its plans for the session. On PostgreSQL 15:
--    10.4 and 4.6 microseconds a call before, 2-3 after.
drop trigger agent_task_requests_notify on public.agent_task_requests;
create trigger agent_task_requests_notify
    after insert or update of status on public.agent_task_requests
    for each row when (new.status = 'pending')
    execute function public.agent_task_requests_notify();

create or replace function agent_bridge.broadcasting()
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

create or replace function agent_bridge.relax_commit()
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

notify pgrst, 'reload schema';
