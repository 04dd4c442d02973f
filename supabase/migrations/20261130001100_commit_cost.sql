-- agent-bridge: fewer waits for the disk and fewer index writes on the hot path (issue 15).
-- Idempotent.
--
-- Every write waits for its commit to reach the disk (synchronous_commit = on), and on
-- the path from insert to "handler started" that wait comes twice: the claim and the
-- start. Neither needs it. Both are fenced and leased, so if the server crashes before
-- they reach the disk (at most a fraction of a second of commits, never a torn one),
-- what is lost is recovered as a crash of the bridge or worker is:
--
-- - a lost claim leaves the row pending; a job already sent for it is refused at start
--   (the row is not processing), or, if the row was claimed again meanwhile with the
--   same attempt number, only one of the two jobs can start it (the start is fenced by
--   worker while the lease runs);
-- - a lost start (or lease renewal, or streamed chunk) leaves the row without its
--   worker: that worker's heartbeats and outcome are refused, the lease runs out, and
--   the rescue runs the task again as the next attempt.
--
-- Outcomes (complete, fail, retry, cancel), releases and rescues keep waiting for the
-- disk: a completed task is never run again, and nothing is lost.
-- `set_config(..., true)` lasts to the end of the caller's transaction (the function has
-- no SET clause for it), so the commit right after the call is the one relaxed.

create or replace function agent_bridge.relax_commit()
returns void
language sql
volatile
security invoker
set search_path = ''
as $$ select set_config('synchronous_commit', 'off', true) $$;

revoke execute on function agent_bridge.relax_commit() from public;
grant execute on function agent_bridge.relax_commit() to service_role;

-- 1. The claim: the body of 20261130000300_tenants.sql, moved to the private schema, and
-- a wrapper with the same signature (PostgREST's and the bridge's entry point).
do $$
begin
    if to_regprocedure('agent_bridge.claim_rows(integer, double precision, integer, text[])')
       is null then
        alter function public.agent_tasks_claim(integer, double precision, integer, text[])
            set schema agent_bridge;
        alter function agent_bridge.agent_tasks_claim(integer, double precision, integer, text[])
            rename to claim_rows;
    end if;
end
$$;

revoke execute on function agent_bridge.claim_rows(integer, double precision, integer, text[])
    from public, anon, authenticated;
grant execute on function agent_bridge.claim_rows(integer, double precision, integer, text[])
    to service_role;

create or replace function public.agent_tasks_claim(
    p_limit integer,
    p_lease_seconds double precision,
    p_tenant_concurrency integer default 0,
    p_agents text[] default null)
returns table (id uuid, attempt integer, agent text)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    perform agent_bridge.relax_commit();
    return query select c.id, c.attempt, c.agent
                   from agent_bridge.claim_rows(p_limit, p_lease_seconds,
                                                p_tenant_concurrency, p_agents) c;
end
$$;

revoke execute on function public.agent_tasks_claim(integer, double precision, integer, text[])
    from public, anon, authenticated;
grant execute on function public.agent_tasks_claim(integer, double precision, integer, text[])
    to service_role;

-- 2. The start (as in 20261130000200_agents.sql, plus the relaxed commit).
create or replace function public.agent_task_start(
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
    perform agent_bridge.relax_commit();
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

-- 3. The lease renewal (as in 20261130000100_hardening.sql, plus the relaxed commit).
create or replace function public.agent_task_heartbeat(
    p_id uuid, p_attempt integer, p_worker text, p_lease_seconds double precision)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    if p_id is not null then
        perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    end if;
    perform agent_bridge.relax_commit();
    return query
    update public.agent_task_requests t
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;


-- 4. Fewer index writes for the start and lease renewals. An UPDATE that changes no indexed
-- column, and finds room on its page, is a HOT update: no index is written at all. The start
-- and the renewals change only worker, started_at, lease_expires_at and updated_at, but an
-- index on lease_expires_at (for the rescue) made every one of them write all the row's
-- indexes. The rescue finds expired leases through the index of processing rows by tenant
-- instead (it runs every few seconds over the rows being processed, a bounded set), and the
-- table leaves a tenth of each page free for the updated versions.
drop index if exists public.agent_task_requests_lease_idx;
alter table public.agent_task_requests set (fillfactor = 90);

-- PostgREST caches the functions it can call (see 20261130000900_reload_schema.sql).
notify pgrst, 'reload schema';
