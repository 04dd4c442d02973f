-- agent-bridge schema version 9: human in the loop (issue 26): agent_task_requests
-- .waiting_for and .answers; public.agent_task_wait (a handler asks), public.answer_agent_task
-- (its user answers), public.agent_task_answers; a due unanswered question ends the row
-- failed / NoAnswer at the claim. `agent-bridge check` compares it with what the running
-- code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 9 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

notify pgrst, 'reload schema';
