-- agent-bridge schema version 7: spend control (issue 25): token and cost budgets per
-- tenant and period (agent_tenant_limits), usage per task and per tenant
-- (agent_tenant_usage), reservations at the bind and usage reports in the outcome's
-- transaction (public.agent_tasks_write kind 'usage'). `agent-bridge check` compares it
-- with what the running code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 7 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

notify pgrst, 'reload schema';
