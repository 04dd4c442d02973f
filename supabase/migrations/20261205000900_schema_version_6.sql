-- agent-bridge schema version 6: state changes, streamed pieces and the bridge's wake-up
-- are also sent as Realtime Broadcast (issue 24); the bridge asks
-- public.agent_bridge_broadcasting() which wake-up path to follow. `agent-bridge check`
-- compares it with what the running code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 6 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

notify pgrst, 'reload schema';
