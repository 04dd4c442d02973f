-- agent-bridge schema version 2: agents, tenants and quotas, cancellation, hardening.
-- `agent-bridge check` compares it with what the running code expects.
create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 2 $$;
