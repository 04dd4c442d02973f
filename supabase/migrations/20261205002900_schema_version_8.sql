-- agent-bridge schema version 8: idempotency keys (issue 26): agent_task_requests
-- .idempotency_key, unique per user and agent while the row exists; a second insert with
-- a key in use is refused (23505, 409 through PostgREST) naming the task that has it.
-- `agent-bridge check` compares it with what the running code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 8 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

notify pgrst, 'reload schema';
