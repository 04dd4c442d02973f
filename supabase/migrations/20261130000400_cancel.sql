-- agent-bridge: cancellation (issue 12). Idempotent.
--
--   pending ──cancel──────────────────────────────▶ failed (Cancelled)
--   processing, no live holder (not started, between
--     retries, holder's lease gone) ──cancel──────▶ failed (Cancelled)
--   processing, held ──cancel──▶ cancel_requested_at set + NOTIFY agent_task_cancel
--       └─ the holder stops its handler ──agent_task_cancelled──▶ failed (Cancelled)
--   completed / failed: unchanged
--
-- A cancelled row keeps the partial answer streamed so far in response_payload,
-- marked {"partial": true, "cancelled": true, "error": "..."}.

-- 1. The column -------------------------------------------------------------------

-- When cancellation was asked for (null: never). Cleared when an operator requeues.
alter table public.agent_task_requests
    add column if not exists cancel_requested_at timestamptz;

-- 2. The row's end ------------------------------------------------------------------

-- The response_payload of a cancelled row: {"cancelled": true, "error": message}
-- (the message where the guide's frontend looks for errors), plus the partial answer
-- streamed so far, if any (the given one, else what the row holds) marked
-- "partial": true.
create or replace function public.agent_task_cancelled_payload(p_partial jsonb, p_message text)
returns jsonb
language sql
immutable
security invoker
set search_path = ''
as $$
    select case when jsonb_typeof(p_partial) = 'object' and p_partial ? 'answer'
                then p_partial || jsonb_build_object('partial', true)
                else '{}'::jsonb end
           || jsonb_build_object('cancelled', true, 'error', p_message);
$$;

-- A row with a cancel request never goes back to the queue or completes: whatever
-- state function moves it out of `processing` (complete, fail, release, rescue,
-- schedule_retry letting go of it), it ends `failed` with error.type Cancelled and
-- its partial answer. So a handler that ignores cancellation has its result
-- discarded, a retry scheduled after the request is fenced out, and a holder that
-- died after the request is not run again by rescue. A requeue clears the request.
create or replace function public.agent_task_requests_cancel_guard()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
    message text := 'Cancelled on request while it was running.';
begin
    if old.status = 'failed' and new.status = 'pending' then
        new.cancel_requested_at := null;
    elsif old.status = 'processing'
          and (new.status <> 'processing' or new.worker is null)
          and (new.status <> 'failed' or new.error ->> 'type' is distinct from 'Cancelled') then
        new.status := 'failed';
        new.worker := null;
        new.error := jsonb_build_object('type', 'Cancelled', 'message', message,
                                        'retryable', false, 'at', now(),
                                        'attempt', old.attempts);
        new.response_payload := public.agent_task_cancelled_payload(old.response_payload,
                                                                    message);
        new.finished_at := now();
        new.lease_expires_at := null;
    end if;
    return new;
end
$$;

-- BEFORE triggers run in name order: this one before agent_task_requests_touch.
-- Rows never asked to stop (nearly all) do not even call it.
drop trigger if exists agent_task_requests_cancel_guard on public.agent_task_requests;
create trigger agent_task_requests_cancel_guard
    before update of status, worker on public.agent_task_requests
    for each row when (old.cancel_requested_at is not null)
    execute function public.agent_task_requests_cancel_guard();

-- 3. Asking for cancellation (the core; service_role only) -------------------------

-- Cancel row p_id; with p_attempt, only while the row is at that attempt (an
-- operator revoking one Celery job must not cancel a later attempt). p_holder_gone:
-- the caller knows the holder is dead (Celery terminated its process), so the row
-- ends now instead of waiting for it. Returns the row's status afterwards; null if
-- there is no such row.
create or replace function public.agent_task_request_cancel(
    p_id uuid, p_attempt integer default null, p_holder_gone boolean default false)
returns text
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    r public.agent_task_requests;
    message text;
begin
    select * into r from public.agent_task_requests t where t.id = p_id for update;
    if not found then
        return null;
    end if;
    if (p_attempt is not null and r.attempts <> p_attempt)
       or r.status not in ('pending', 'processing') then
        return r.status;
    end if;
    if r.status = 'processing' and r.worker is not null and r.lease_expires_at >= now()
       and not coalesce(p_holder_gone, false) then
        -- A live worker holds it: record the request and tell that worker.
        if r.cancel_requested_at is null then
            update public.agent_task_requests t set cancel_requested_at = now()
             where t.id = p_id;
            perform pg_notify('agent_task_cancel', p_id::text || ':' || r.attempts);
        end if;
        return 'processing';
    end if;
    message := case
        when r.status = 'pending' then 'Cancelled on request before it started.'
        when r.worker is null and r.started_at is not null
            then 'Cancelled on request while waiting to retry.'
        when r.worker is null then 'Cancelled on request before it started.'
        else 'Cancelled on request while it was running.' end;
    update public.agent_task_requests t
       set status = 'failed',
           cancel_requested_at = coalesce(t.cancel_requested_at, now()),
           error = jsonb_build_object('type', 'Cancelled', 'message', message,
                                      'retryable', false, 'at', now(),
                                      'attempt', t.attempts),
           response_payload = public.agent_task_cancelled_payload(t.response_payload, message),
           worker = null,
           finished_at = now(),
           lease_expires_at = null
     where t.id = p_id;
    if r.worker is not null then
        -- (a holder that survived what its caller thought killed it stops too)
        perform pg_notify('agent_task_cancel', p_id::text || ':' || r.attempts);
    end if;
    return 'failed';
end
$$;

-- 4. The contract: users cancel their own rows, the service role any row -------------

-- supabase.rpc('cancel_agent_task', { task_id }) -> the row's status after the call:
-- 'failed' (it ended now), 'processing' (its worker is stopping it; it ends
-- 'failed' shortly), 'completed' or 'failed' (already finished: unchanged), or null:
-- no such row, or a row the caller may not cancel. A signed-in user may cancel
-- exactly the rows they own (user_id = auth.uid()); roles that bypass RLS
-- (service_role, the table owner) any row. Security definer, because users have
-- no UPDATE on the table: the ownership check below is what RLS would be.
create or replace function public.cancel_agent_task(task_id uuid)
returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    -- The caller: the role PostgREST switched to, else the login role. (Inside a
    -- security definer function current_user is the owner; the `role` setting is not.)
    caller name := coalesce(nullif(current_setting('role'), 'none'), session_user);
    sees_all boolean;
    owner_id uuid;
begin
    select r.rolsuper or r.rolbypassrls
           or pg_catalog.pg_has_role(caller, c.relowner, 'MEMBER')
      into sees_all
      from pg_catalog.pg_roles r, pg_catalog.pg_class c
     where r.rolname = caller and c.oid = 'public.agent_task_requests'::pg_catalog.regclass;
    if not coalesce(sees_all, false) then
        select t.user_id into owner_id from public.agent_task_requests t where t.id = task_id;
        if owner_id is null or owner_id is distinct from (select auth.uid()) then
            return null;  -- exactly as for an id that does not exist
        end if;
    end if;
    return public.agent_task_request_cancel(task_id);
end
$$;

-- 5. The worker's side ------------------------------------------------------------------

-- The holder ends a cancelled attempt: fenced like every write; p_response is the
-- partial answer it had (null: keep what the row holds).
create or replace function public.agent_task_cancelled(
    p_id uuid, p_attempt integer, p_worker text, p_response jsonb)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    message text := 'Cancelled on request while it was running.';
begin
    return query
    update public.agent_task_requests t
       set status = 'failed',
           cancel_requested_at = coalesce(t.cancel_requested_at, now()),
           error = jsonb_build_object('type', 'Cancelled', 'message', message,
                                      'retryable', false, 'at', now(), 'attempt', p_attempt),
           response_payload = public.agent_task_cancelled_payload(
               coalesce(p_response, t.response_payload), message),
           worker = null,
           finished_at = now(),
           lease_expires_at = null
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- Which of the attempts a worker process holds have been asked to stop: one call
-- per process per CANCEL_POLL_INTERVAL in Supabase mode (direct mode LISTENs on
-- agent_task_cancel and calls this only after (re)connecting).
create or replace function public.agent_tasks_cancel_requested(p_ids uuid[], p_attempts integer[])
returns table (id uuid, attempt integer)
language sql
stable
security invoker
set search_path = ''
as $$
    select t.id, t.attempts
      from unnest(p_ids, p_attempts) as h(id, attempt)
      join public.agent_task_requests t on t.id = h.id and t.attempts = h.attempt
     where t.cancel_requested_at is not null;
$$;

-- 6. Grants ---------------------------------------------------------------------------

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'public.agent_task_request_cancel(uuid, integer, boolean)',
        'public.agent_task_cancelled(uuid, integer, text, jsonb)',
        'public.agent_tasks_cancel_requested(uuid[], integer[])',
        'public.agent_task_cancelled_payload(jsonb, text)'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

revoke execute on function public.cancel_agent_task(uuid) from public, anon;
grant execute on function public.cancel_agent_task(uuid) to authenticated, service_role;
revoke execute on function public.agent_task_requests_cancel_guard() from public, anon, authenticated;
