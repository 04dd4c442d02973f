-- agent-bridge schema version 5: one commit where there were four (issue 23): the claim
-- returns what the worker needs (the row's columns, and its payload under a size cap),
-- and public.agent_tasks_write applies a batch of the worker's writes in one call and one
-- commit. `agent-bridge check` compares it with what the running code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 5 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

notify pgrst, 'reload schema';
