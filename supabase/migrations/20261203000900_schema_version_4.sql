-- agent-bridge schema version 4: hostile users at scale (issue 20): sleeping tenants and
-- arrival at the current round in the claim, day budgets and the agent allow-list at insert,
-- private columns and DELETE events that carry nothing identifying, retention.
-- `agent-bridge check` compares it with what the running code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 4 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

notify pgrst, 'reload schema';
