-- Realtime Broadcast from the database (issue 24): the writes a browser follows (a row's
-- state, a streamed piece) and the bridge's wake-up also go out as Broadcast messages, sent
-- with realtime.send in the transaction of the write, so a message exists only if the write
-- committed. Realtime then checks a subscriber once, at join (the policy on
-- realtime.messages below), instead of once per change and subscriber as postgres_changes
-- does.
--
-- Topics (private channels):
--   agent_task:<id>         events `state` (the row's state, as the user may see it) and
--                           `chunk` (one piece of a streamed answer); readers: those who may
--                           select the row.
--   agent_bridge:wakeups    event `pending` (a row became pending); readers: the service
--                           role only (it bypasses RLS; no policy names this topic).
--
-- Broadcasting is on where Realtime reads the database: a Supabase project. A plain
-- PostgreSQL has no Realtime server to deliver (and prune) realtime.messages, so it stays
-- off there; the realtime schema bridge/sql/supabase_compat.sql creates for tests does not
-- count. An operator switches it with
--   update agent_bridge.realtime_broadcast set enabled = true;   -- or false

create table agent_bridge.realtime_broadcast (
    only_row boolean primary key default true check (only_row),
    enabled boolean not null
);

comment on table agent_bridge.realtime_broadcast is
    'Whether state changes, streamed pieces and wake-ups are sent as Realtime Broadcast.';

insert into agent_bridge.realtime_broadcast (enabled)
select to_regclass('realtime.messages') is not null
   and to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null
   and coalesce(obj_description(to_regnamespace('realtime'), 'pg_namespace'), '')
       <> 'agent-bridge compat';

alter table agent_bridge.realtime_broadcast enable row level security;
revoke all on table agent_bridge.realtime_broadcast from public, anon, authenticated;
grant select, update on table agent_bridge.realtime_broadcast to service_role;

-- Security definer: the receive policy evaluates it as the subscriber, who may not read
-- the flag table.
create function agent_bridge.broadcasting()
returns boolean
language sql
stable
security definer
set search_path = ''
as $$
    select coalesce((select enabled from agent_bridge.realtime_broadcast), false)
       and to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null
$$;

-- The receive rule for a task's topic, evaluated as the subscriber (security invoker):
-- the row must be one the subscriber may select, which the table's own policies decide.
create function agent_bridge.may_receive(p_topic text)
returns boolean
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
    if p_topic is null
       or p_topic !~ '^agent_task:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       or not agent_bridge.broadcasting() then
        return false;
    end if;
    return exists (select 1 from public.agent_task_requests r
                    where r.id = substr(p_topic, 12)::uuid);
end
$$;

-- A row's state as its user may see it, for the `state` event: the columns a user may
-- select, without request_payload (the user wrote it; it never changes). An answer or
-- error too big for one message is left out and named in `omitted`: the client reads the
-- row for it.
create function agent_bridge.state_message(p_row public.agent_task_requests)
returns jsonb
language plpgsql
stable
set search_path = ''
as $$
declare
    v_state jsonb := jsonb_build_object(
        'id', p_row.id, 'status', p_row.status, 'attempts', p_row.attempts,
        'max_attempts', p_row.max_attempts, 'priority', p_row.priority,
        'run_at', p_row.run_at, 'lease_expires_at', p_row.lease_expires_at,
        'started_at', p_row.started_at, 'finished_at', p_row.finished_at,
        'created_at', p_row.created_at, 'updated_at', p_row.updated_at,
        'user_id', p_row.user_id, 'enterprise_id', p_row.enterprise_id,
        'agent', p_row.agent);
    v_result jsonb := jsonb_build_object('response_payload', p_row.response_payload,
                                         'error', p_row.error);
begin
    if octet_length(v_result::text) > 65536 then
        return v_state || jsonb_build_object('response_payload', null, 'error', null,
                                             'omitted', jsonb_build_array('response_payload', 'error'));
    end if;
    return v_state || v_result;
end
$$;

-- The functions that send are security definer: a user's own insert or cancel fires
-- them, and realtime.send inserts into realtime.messages, which users may not write.
--
-- The `state` event: on a change of what a watcher shows (not on lease renewals, which
-- change only lease_expires_at and updated_at; the trigger's WHEN skips them without a call).
create function public.agent_task_requests_broadcast_state()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if agent_bridge.broadcasting() then
        perform realtime.send(agent_bridge.state_message(new), 'state',
                              'agent_task:' || new.id::text, true);
    end if;
    return null;
end
$$;

create trigger agent_task_requests_broadcast_state
    after update on public.agent_task_requests
    for each row
    when (old.status is distinct from new.status
          or old.attempts is distinct from new.attempts
          or old.cancel_requested_at is distinct from new.cancel_requested_at
          or old.error is distinct from new.error
          or old.response_payload is distinct from new.response_payload)
    execute function public.agent_task_requests_broadcast_state();

-- The `chunk` event: one message per piece, one trigger call per insert statement (the
-- worker writes a batch of pieces in one statement).
create function public.agent_task_chunks_broadcast()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if agent_bridge.broadcasting() then
        perform realtime.send(
                    jsonb_build_object('task_id', c.task_id, 'attempt', c.attempt,
                                       'seq', c.seq, 'answer_offset', c.answer_offset,
                                       'text', c.text, 'created_at', c.created_at),
                    'chunk', 'agent_task:' || c.task_id::text, true)
           from added c
          order by c.task_id, c.attempt, c.seq;
    end if;
    return null;
end
$$;

create trigger agent_task_chunks_broadcast
    after insert on public.agent_task_chunks
    referencing new table as added
    for each statement execute function public.agent_task_chunks_broadcast();

-- The bridge's wake-up: as before a NOTIFY for the direct transport, and now at most one
-- `pending` Broadcast per transaction for the Supabase transport (a bulk insert or a
-- rescue of many rows wakes the bridge once).
create or replace function public.agent_task_requests_notify()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    if new.status = 'pending' then
        perform pg_notify('agent_task_requests', new.id::text);
        if current_setting('agent_bridge.wakeup_sent', true) is distinct from 'on' then
            perform set_config('agent_bridge.wakeup_sent', 'on', true);
            if agent_bridge.broadcasting() then
                perform realtime.send('{}'::jsonb, 'pending', 'agent_bridge:wakeups', true);
            end if;
        end if;
    end if;
    return null;
end
$$;

-- Who may join a task's topic. Created where realtime.messages exists (a Supabase
-- project, or the compat schema of the tests); elsewhere there is nothing to join.
do $$
begin
    if to_regclass('realtime.messages') is not null then
        create policy agent_task_broadcast_receive on realtime.messages
            for select to authenticated
            using (extension = 'broadcast'
                   and (select agent_bridge.may_receive((select realtime.topic()))));
    end if;
end
$$;

-- What the bridge asks to choose its wake-up path.
create function public.agent_bridge_broadcasting()
returns boolean
language sql
stable
security invoker
set search_path = ''
as $$ select agent_bridge.broadcasting() $$;

revoke execute on function agent_bridge.broadcasting() from public, anon;
grant execute on function agent_bridge.broadcasting() to authenticated, service_role;
revoke execute on function agent_bridge.may_receive(text) from public, anon;
grant execute on function agent_bridge.may_receive(text) to authenticated, service_role;
revoke execute on function agent_bridge.state_message(public.agent_task_requests)
    from public, anon, authenticated;
revoke execute on function public.agent_task_requests_broadcast_state()
    from public, anon, authenticated;
revoke execute on function public.agent_task_chunks_broadcast() from public, anon, authenticated;
revoke execute on function public.agent_bridge_broadcasting() from public, anon, authenticated;
grant execute on function public.agent_bridge_broadcasting() to service_role;

notify pgrst, 'reload schema';
