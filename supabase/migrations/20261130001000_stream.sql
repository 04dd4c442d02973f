-- agent-bridge: streamed answers as appended chunks (issue 15). Idempotent.
--
-- Before: every partial answer rewrote the row's whole response_payload, so the bytes
-- written (WAL, and every Realtime UPDATE message, which carries the whole row) grew
-- with the square of the answer's length. Now a worker streaming `{"answer": text,
-- "partial": true}` appends only what is new, as a row of agent_task_chunks:
--
--   answer = left(answer, answer_offset) || text      (in seq order, per attempt)
--
-- An append has answer_offset = the length written so far (in characters); a handler
-- that rewrote earlier text gives the length of the common prefix; answer_offset 0
-- starts the answer over. The row itself is not written while the answer streams.
--
-- Chunks live only while their attempt runs: when the row leaves `processing`, or its
-- worker changes (a retry, another worker taking over), they are deleted in the same
-- transaction. Where the row used to keep the partial answer at that moment (back to
-- pending, a retry, a cancel), the chunks are first folded into response_payload as
-- {"answer": <rebuilt>, "partial": true}, so what a user saw is kept exactly as before.
--
-- No foreign key to agent_task_requests: `truncate agent_task_requests` must keep
-- working (tests, operators), and an insert need not lock the row a second time. A
-- trigger deletes a deleted row's chunks; the select policy hides any other orphan.

-- 1. The table -----------------------------------------------------------------------

create table if not exists public.agent_task_chunks (
    task_id uuid not null,
    attempt integer not null,
    seq integer not null check (seq >= 0),
    answer_offset integer not null check (answer_offset >= 0),
    text text not null,
    created_at timestamptz not null default now(),
    primary key (task_id, attempt, seq)
);

comment on table public.agent_task_chunks is
    'agent-bridge: the streamed answer of a running attempt, as appended pieces: answer = '
    'left(answer, answer_offset) || text, in seq order. Deleted when the attempt ends.';

-- Users read the chunks of the rows they may read (the row's own policy decides: the
-- subquery runs with the caller's rights); nobody but the service writes them.
alter table public.agent_task_chunks enable row level security;
revoke all on table public.agent_task_chunks from public, anon, authenticated;
grant select, insert, delete on table public.agent_task_chunks to service_role;
grant select on table public.agent_task_chunks to authenticated;

drop policy if exists agent_task_chunks_select_visible on public.agent_task_chunks;
create policy agent_task_chunks_select_visible on public.agent_task_chunks
    for select to authenticated
    using (exists (select 1 from public.agent_task_requests t where t.id = task_id));

-- 2. Helpers (not part of the API) ---------------------------------------------------

create schema if not exists agent_bridge;

-- The answer the chunks of (p_id, p_attempt) rebuild; null when there are none.
create or replace function agent_bridge.streamed_answer(p_id uuid, p_attempt integer)
returns text
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    answer text;
    c record;
begin
    for c in select k.answer_offset, k.text from public.agent_task_chunks k
              where k.task_id = p_id and k.attempt = p_attempt order by k.seq loop
        answer := left(coalesce(answer, ''), c.answer_offset) || c.text;
    end loop;
    return answer;
end
$$;

-- A row's response_payload with its streamed answer folded in: p_payload when nothing
-- was streamed, else {"answer": <rebuilt>, "partial": true}, what the row would hold had
-- every partial answer rewritten it.
create or replace function agent_bridge.streamed_payload(
    p_id uuid, p_attempt integer, p_payload jsonb)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    answer text := agent_bridge.streamed_answer(p_id, p_attempt);
begin
    if answer is null then
        return p_payload;
    end if;
    return jsonb_build_object('answer', answer, 'partial', true);
end
$$;

revoke execute on function agent_bridge.streamed_answer(uuid, integer) from public;
revoke execute on function agent_bridge.streamed_payload(uuid, integer, jsonb) from public;
grant execute on function agent_bridge.streamed_answer(uuid, integer) to service_role;
grant execute on function agent_bridge.streamed_payload(uuid, integer, jsonb) to service_role;

-- 3. The worker's append -------------------------------------------------------------

-- A piece of the streamed answer: fenced like agent_task_progress (the row processing,
-- at p_attempt, held by p_worker). The row is locked FOR SHARE, not written: a
-- concurrent state change waits for this insert and then deletes it with the others,
-- and an append that waited for a state change sees the new row and is refused.
create or replace function public.agent_task_append(
    p_id uuid, p_attempt integer, p_worker text, p_seq integer, p_offset integer,
    p_text text)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    r record;
begin
    select t.status::text as status, t.attempts, t.worker into r
      from public.agent_task_requests t
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
       for share;
    if not found then
        return query select * from public.agent_task_current(p_id);
        return;
    end if;
    if p_seq is null or p_seq < 0 or p_offset is null or p_offset < 0 or p_text is null then
        raise exception 'p_seq and p_offset must be 0 or more and p_text not null'
            using errcode = '22023';
    end if;
    insert into public.agent_task_chunks (task_id, attempt, seq, answer_offset, text)
    values (p_id, p_attempt, p_seq, p_offset, p_text);
    return query select true, r.status, r.attempts, r.worker;
end
$$;

-- A full partial write (any other shape of partial output) makes the row's payload the
-- answer again: the attempt's chunks go.
create or replace function public.agent_task_progress(
    p_id uuid, p_attempt integer, p_worker text, p_response jsonb)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    update public.agent_task_requests t
       set response_payload = p_response
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if found then
        delete from public.agent_task_chunks k where k.task_id = p_id;
    else
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- 4. The end of an attempt: fold, then clear ---------------------------------------------

-- When the row leaves `processing` or its holder changes. A state function that writes
-- its own response_payload (complete, fail, a cancel) keeps it; otherwise (back to
-- pending, a retry, a takeover) the streamed answer is folded in, as the row held it
-- before chunks. Runs after agent_task_requests_cancel_guard (BEFORE triggers fire in
-- name order), which folds the chunks itself.
create or replace function public.agent_task_requests_stream_end()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
    if tg_op = 'DELETE' then
        delete from public.agent_task_chunks k where k.task_id = old.id;
        return old;
    end if;
    if new.response_payload is not distinct from old.response_payload then
        new.response_payload := agent_bridge.streamed_payload(old.id, old.attempts,
                                                              old.response_payload);
    end if;
    delete from public.agent_task_chunks k where k.task_id = old.id;
    return new;
end
$$;

revoke execute on function public.agent_task_requests_stream_end() from public, anon, authenticated;

drop trigger if exists agent_task_requests_stream_end on public.agent_task_requests;
create trigger agent_task_requests_stream_end
    before update of status, worker, attempts on public.agent_task_requests
    for each row
    when (old.status = 'processing' and old.worker is not null
          and (new.status is distinct from old.status or new.worker is distinct from old.worker
               or new.attempts is distinct from old.attempts))
    execute function public.agent_task_requests_stream_end();

drop trigger if exists agent_task_requests_stream_delete on public.agent_task_requests;
create trigger agent_task_requests_stream_delete
    after delete on public.agent_task_requests
    for each row
    when (old.status = 'processing')
    execute function public.agent_task_requests_stream_end();

-- The cancel paths keep the partial answer from the row (20261130000400_cancel.sql);
-- while it streams, the answer is in the chunks. As before, plus the fold.
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
        new.response_payload := public.agent_task_cancelled_payload(
            agent_bridge.streamed_payload(old.id, old.attempts, old.response_payload), message);
        new.finished_at := now();
        new.lease_expires_at := null;
    end if;
    return new;
end
$$;

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
           response_payload = public.agent_task_cancelled_payload(
               agent_bridge.streamed_payload(t.id, t.attempts, t.response_payload), message),
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

-- The holder ends a cancelled attempt; p_response null keeps the row's partial answer,
-- the streamed one included.
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
               coalesce(p_response,
                        agent_bridge.streamed_payload(t.id, t.attempts, t.response_payload)),
               message),
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

revoke execute on function public.agent_task_requests_cancel_guard() from public, anon, authenticated;

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'public.agent_task_append(uuid, integer, text, integer, integer, text)',
        'public.agent_task_progress(uuid, integer, text, jsonb)',
        'public.agent_task_request_cancel(uuid, integer, boolean)',
        'public.agent_task_cancelled(uuid, integer, text, jsonb)'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

-- 5. Realtime: the frontend follows the chunks of its task --------------------------------

do $$
begin
    if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
       and not exists (select 1 from pg_publication_tables
                        where pubname = 'supabase_realtime'
                          and schemaname = 'public' and tablename = 'agent_task_chunks')
    then
        alter publication supabase_realtime add table public.agent_task_chunks;
    end if;
end
$$;

-- 6. Schema version 3: streamed chunks ------------------------------------------------------

create or replace function public.agent_bridge_schema_version()
returns integer
language sql
immutable
security invoker
set search_path = ''
as $$ select 3 $$;

revoke execute on function public.agent_bridge_schema_version() from public, anon, authenticated;
grant execute on function public.agent_bridge_schema_version() to service_role;

-- PostgREST caches the functions it can call (see 20261130000900_reload_schema.sql).
notify pgrst, 'reload schema';
