-- Human in the loop (issue 26): a handler that must ask before it acts (send the email?
-- spend $40?) stops, waits as long as it takes without holding a worker, and goes on with
-- the answer.
--
--   processing ──wait (tasks.ask)──▶ pending, waiting_for = the question, run_at = deadline
--   pending, waiting ──answer_agent_task──▶ pending, due now (the answer recorded)
--   pending, waiting, deadline passed ──claim──▶ failed (NoAnswer), no worker involved
--   pending, waiting ──cancel──▶ failed (Cancelled)
--
-- A waiting row is `pending`: no worker holds it and no lease runs (a lease is what
-- `processing` means, and a processing row would hold one of its tenant's
-- max_processing slots for hours); it is queued again the moment it is answered, and
-- cancelling it ends it at once, as any queued row. What tells it apart is `waiting_for`
-- ({question, asked_at, expires_at, number}), which only a pending row may hold. Its
-- run_at is the question's deadline, so the tenant sleeps until then like any future
-- row, and the claim that finds it due ends it NoAnswer instead of sending it to a
-- worker (an answer makes it due at once and clears waiting_for).
--
-- The handler runs again from the top with the answers so far (`answers`, in order:
-- {question, answer, answered_at} each), which tasks.ask() returns one by one, so a
-- handler written top to bottom replays to where it stopped. Each answered question
-- costs one attempt of its own; the wait raises max_attempts by one, so asking never
-- uses up the attempts a crash may need.

alter table public.agent_task_requests
    -- {question, asked_at, expires_at, number}: what the task's handler asked its user and
    -- waits for (only on a pending row); users may read it.
    add column waiting_for jsonb,
    -- [{question, answer, answered_at}, ...]: the answers so far, in the order asked.
    add column answers jsonb,
    add constraint agent_task_requests_waiting_check
        check (waiting_for is null or status = 'pending'),
    add constraint agent_task_requests_answers_check
        check (answers is null or jsonb_typeof(answers) = 'array');

-- The error of a question that expired unanswered.
create function agent_bridge.no_answer_error(p_waiting jsonb, p_attempt integer)
returns jsonb
language sql
stable
security invoker
set search_path = ''
as $$
    select jsonb_build_object(
        'type', 'NoAnswer',
        'message', format('No answer came before the question expired (%s); the task '
                          'stopped there.', p_waiting ->> 'expires_at'),
        'retryable', false, 'at', now(), 'attempt', p_attempt,
        'question', p_waiting -> 'question');
$$;

-- The holder asks its user (p_waiting: {"question": ...}, at most 16 KiB) and lets the
-- attempt go: the row goes back to pending, waiting, until an answer or p_timeout_seconds.
-- Fenced like every write. With a cancel request on the row it ends failed / Cancelled
-- instead (agent_task_requests_cancel_guard).
create function public.agent_task_wait(
    p_id uuid, p_attempt integer, p_worker text, p_waiting jsonb,
    p_timeout_seconds double precision)
returns setof public.agent_task_write
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_size bigint;
begin
    if p_id is not null then
        perform agent_bridge.check_seconds('p_timeout_seconds', p_timeout_seconds, false);
        if jsonb_typeof(p_waiting) is distinct from 'object' or not p_waiting ? 'question' then
            raise exception 'p_waiting must be an object with a "question", got %',
                left(coalesce(p_waiting::text, 'null'), 100) using errcode = '22023';
        end if;
        v_size := agent_bridge.payload_bytes(p_waiting);
        if v_size > 16384 then
            raise exception 'the question is % bytes; at most 16384 bytes may be asked', v_size
                using errcode = '22023';
        end if;
    end if;
    return query
    update public.agent_task_requests t
       set status = 'pending',
           worker = null,
           lease_expires_at = null,
           run_at = now() + make_interval(secs => p_timeout_seconds),
           max_attempts = t.max_attempts + 1,
           waiting_for = case when t.cancel_requested_at is null then
               p_waiting || jsonb_build_object(
                   'asked_at', now(),
                   'expires_at', now() + make_interval(secs => p_timeout_seconds),
                   'number', coalesce(jsonb_array_length(t.answers), 0) + 1) end
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker
    returning true, t.status::text, t.attempts, t.worker;
    if not found then
        return query select * from public.agent_task_current(p_id);
    end if;
end
$$;

-- The answers so far, for the holder of (p_id, p_attempt) only ('[]' when none yet); no
-- row for anyone else. (Two columns: PostgREST sends a one-column table as bare values.) Read once per run, by the first tasks.ask() of a handler.
create function public.agent_task_answers(p_id uuid, p_attempt integer, p_worker text)
returns table (attempt integer, answers jsonb)
language sql
stable
security invoker
set search_path = ''
as $$
    select t.attempts, coalesce(t.answers, '[]'::jsonb)
      from public.agent_task_requests t
     where t.id = p_id and t.status = 'processing'
       and t.attempts = p_attempt and t.worker = p_worker;
$$;

-- Whether the caller may act on task p_id as its user (cancel_agent_task, answer_agent_task):
-- roles that bypass RLS (service_role, the table owner) on any row, a signed-in user on the
-- rows they own (user_id = auth.uid()); false for a row that does not exist. Called from
-- those security definer functions, where current_user is the owner: the caller is the role
-- PostgREST switched to (the `role` setting, which a definer function does not change), else
-- the login role. Users may not execute it themselves.
create function agent_bridge.may_act_on(p_id uuid)
returns boolean
language plpgsql
stable
security invoker
set search_path = ''
as $$
declare
    caller name := coalesce(nullif(current_setting('role'), 'none'), session_user);
    sees_all boolean;
    owner_id uuid;
begin
    select r.rolsuper or r.rolbypassrls
           or pg_catalog.pg_has_role(caller, c.relowner, 'MEMBER')
      into sees_all
      from pg_catalog.pg_roles r, pg_catalog.pg_class c
     where r.rolname = caller and c.oid = 'public.agent_task_requests'::pg_catalog.regclass;
    if coalesce(sees_all, false) then
        return true;
    end if;
    select t.user_id into owner_id from public.agent_task_requests t where t.id = p_id;
    -- (never null: a caller without a user id is refused, not let through by a null)
    return owner_id is not null and owner_id is not distinct from (select auth.uid());
end
$$;

-- cancel_agent_task's ownership check, now shared with answer_agent_task.
create or replace function public.cancel_agent_task(task_id uuid)
returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
begin
    if not agent_bridge.may_act_on(task_id) then
        return null;  -- exactly as for an id that does not exist
    end if;
    return public.agent_task_request_cancel(task_id);
end
$$;

-- supabase.rpc('answer_agent_task', { task_id, answer }) -> 'pending': the answer (any
-- JSON value, at most 64 KiB) is recorded and the task queued again, to run on from its
-- question. A signed-in user may answer exactly the rows they own (user_id = auth.uid()),
-- as with cancel_agent_task; roles that bypass RLS any row. Refused with a message that
-- says why (P0001, 400 through PostgREST): no such task of the caller's, not waiting for
-- an answer (never asked, already answered, finished), or the question expired; and
-- (22023, 400) an answer that is SQL null or too large. Security definer, because users
-- have no UPDATE on the table: the ownership check below is what RLS would be.
create function public.answer_agent_task(task_id uuid, answer jsonb)
returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    r public.agent_task_requests;
    v_size bigint;
begin
    if not agent_bridge.may_act_on(task_id) then
        -- exactly as for an id that does not exist
        raise exception 'no agent task % of yours', task_id using errcode = 'P0001';
    end if;
    if answer is null then
        raise exception 'answer must be a JSON value (a SQL null is not one)'
            using errcode = '22023';
    end if;
    v_size := agent_bridge.payload_bytes(answer);
    if v_size > 65536 then
        raise exception 'the answer is % bytes; at most 65536 bytes may be sent', v_size
            using errcode = '22023',
                  hint = 'Answer with less, or store large data elsewhere and send a reference.';
    end if;
    select * into r from public.agent_task_requests t where t.id = task_id for update;
    if not found then
        raise exception 'no agent task % of yours', task_id using errcode = 'P0001';
    end if;
    if r.waiting_for is null then
        raise exception 'agent task % is not waiting for an answer: %', task_id,
            case when r.status = 'pending' and r.answers is not null
                     then 'it has its answer and is queued to go on'
                 when r.status = 'pending' then 'it is queued and has asked nothing'
                 when r.status = 'processing' then 'it is running'
                 else 'it has finished (' || r.status || ')' end
            using errcode = 'P0001';
    end if;
    if r.run_at <= now() then
        raise exception 'the question of agent task % expired at %', task_id,
            r.waiting_for ->> 'expires_at'
            using errcode = 'P0001', hint = 'The task ends failed / NoAnswer.';
    end if;
    update public.agent_task_requests t
       -- status is listed (unchanged) so that the wake-up trigger,
       -- agent_task_requests_notify, tells the bridge the row is due
       set status = 'pending',
           answers = coalesce(t.answers, '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
               'question', r.waiting_for -> 'question', 'answer', answer,
               'answered_at', now())),
           waiting_for = null,
           run_at = now()
     where t.id = task_id;
    return 'pending';
end
$$;

-- The claim: a waiting row found due (its question expired) ends failed / NoAnswer.
create or replace function agent_bridge.claim_rows(
    p_limit integer,
    p_lease_seconds double precision,
    p_tenant_concurrency integer default 0,
    p_agents text[] default null,
    p_inline_bytes integer default 0)
returns table (id uuid, attempt integer, agent text, request_payload jsonb,
               max_attempts integer, priority integer, user_id uuid, enterprise_id text,
               created_at timestamptz)
language plpgsql
volatile
security invoker
set search_path = ''
-- Re-planning these statements on every call (custom plans) costs more than running
-- them; every statement is written to walk indexes whatever its parameters.
set plan_cache_mode = force_generic_plan
-- ... and the planner is held to that when the statistics are stale (a bulk arrival
-- before ANALYZE): no scan of a whole table, no bitmap of every tenant's rows.
set enable_seqscan = off
set enable_bitmapscan = off
as $$
#variable_conflict use_column
declare
    v_limit integer := greatest(coalesce(p_limit, 0), 0);
    v_default_cap integer;
    v_round bigint;
    -- the tenants taking part, in turn order, with how many rows each may take
    v_tenants text[] := '{}';
    v_served bigint[] := '{}';
    v_allow integer[] := '{}';
    -- passed over: nothing pending (deactivate), or only future rows (to sleep)
    v_idle text[] := '{}';
    v_later text[] := '{}';
    v_locked text[];
    v_chunk_tenants text[];
    v_chunk_served bigint[];
    v_after_served bigint;
    v_after_tenant text;
    v_tie_served bigint;
    v_share integer;
    r record;
begin
    if v_limit = 0 then
        return;
    end if;
    perform agent_bridge.check_seconds('p_lease_seconds', p_lease_seconds, false);
    select l.max_processing into v_default_cap
      from public.agent_tenant_limits l where l.tenant = '*';
    v_default_cap := coalesce(v_default_cap, p_tenant_concurrency, 0);

    -- 0. Wake the sleepers that are due. Skips a tenant a writer holds (it is woken by
    -- the next claim, or by the writer itself); waking is never unsafe.
    update public.agent_task_tenants tt
       set active = true, wake_at = null, served = greatest(tt.served, w.stamp)
      from (select d.tenant, agent_bridge.tenant_join_stamp() as stamp
              from (select s.tenant from public.agent_task_tenants s
                     where s.wake_at is not null and s.wake_at <= now() and not s.active
                     order by s.wake_at
                     limit v_limit + 32
                       for no key update skip locked) d) w
     where tt.tenant = w.tenant;

    -- 1. Whose turn it is: walk the active tenants in (served, tenant) order, a chunk
    -- at a time, until p_limit of them have a due row and room under their cap.
    loop
        select coalesce(array_agg(s.tenant order by s.served, s.tenant), '{}'),
               coalesce(array_agg(s.served order by s.served, s.tenant), '{}')
          into v_chunk_tenants, v_chunk_served
          from (select tt.tenant, tt.served from public.agent_task_tenants tt
                 where tt.active
                   and (v_after_tenant is null
                        or (tt.served, tt.tenant) > (v_after_served, v_after_tenant))
                 order by tt.served, tt.tenant
                 limit v_limit - cardinality(v_tenants) + 4) s;
        exit when cardinality(v_chunk_tenants) = 0;
        -- Whether each has a due row (of the agents asked for) and room for it: one
        -- probe of that tenant's index entries each, as LATERAL ... LIMIT 1, which the
        -- planner can turn neither into a join nor into a hash of every tenant's rows
        -- (an EXISTS can be both, and was, with statistics from before a bulk arrival).
        -- The tenant's limits are looked up the same way, never hashed whole.
        for r in
            select c.tenant, c.served, room.n as allowance,
                   coalesce(mine.found, theirs.found, false) as found
              from unnest(v_chunk_tenants, v_chunk_served) with ordinality
                   c(tenant, served, ord)
              left join lateral (
                 select l.max_processing from public.agent_tenant_limits l
                  where l.tenant = c.tenant limit 1) l on true
             cross join lateral (
                 select case when coalesce(l.max_processing, v_default_cap) > 0
                        then coalesce(l.max_processing, v_default_cap) - (
                             select count(*) from (
                                 select 1 from public.agent_task_requests p
                                  where p.tenant = c.tenant and p.status = 'processing'
                                  limit coalesce(l.max_processing, v_default_cap)) x)::integer
                        else v_limit end as n) room
              left join lateral (
                 select true as found from public.agent_task_requests t
                  where p_agents is null and room.n > 0
                    and t.tenant = c.tenant and t.status = 'pending' and t.run_at <= now()
                  limit 1) mine on true
              left join lateral (
                 select true as found from unnest(p_agents) g(name)
                  cross join lateral (
                      select 1 from public.agent_task_requests t
                       where t.tenant = c.tenant and t.agent = g.name
                         and t.status = 'pending' and t.run_at <= now()
                       limit 1) x
                  where room.n > 0
                  limit 1) theirs on true
             order by c.ord
        loop
            v_after_served := r.served;
            v_after_tenant := r.tenant;
            if r.found then
                v_tenants := v_tenants || r.tenant;
                v_served := v_served || r.served;
                v_allow := v_allow || r.allowance;
                exit when cardinality(v_tenants) = v_limit;
            elsif not exists (select 1 from public.agent_task_requests t
                               where t.tenant = r.tenant and t.status = 'pending') then
                v_idle := v_idle || r.tenant;
            elsif not exists (select 1 from public.agent_task_requests t
                               where t.tenant = r.tenant and t.status = 'pending'
                                 and t.run_at <= now()) then
                v_later := v_later || r.tenant;
            end if;  -- else at its cap, or due rows only for other agents: keeps its place
        end loop;
        exit when cardinality(v_tenants) = v_limit
               or cardinality(v_chunk_tenants) < v_limit - cardinality(v_tenants) + 4;
    end loop;

    v_round := nextval('public.agent_task_claim_round');
    if cardinality(v_idle) + cardinality(v_later) > 0 then
        if current_setting('transaction_isolation') = 'read committed' then
            -- Lock first (skipping tenants a writer holds), then look again with a fresh
            -- snapshot: a row committed before the lock is seen; a writer after it waits
            -- for this transaction and then wakes the tenant or lowers its wake_at. A
            -- tenant found with a due row by now stays active. Two statements: a
            -- statement's snapshot is taken when it starts, so one that locked and looked
            -- would miss the row of a writer that committed between the two (and so
            -- released its hold on the tenant): that tenant would sleep past its row.
            select coalesce(array_agg(s.tenant), '{}') into v_locked
              from (select s.tenant from public.agent_task_tenants s
                     where s.tenant = any (v_idle || v_later) and s.active
                     order by s.tenant
                       for update skip locked) s;
            update public.agent_task_tenants tt
               set active = false, wake_at = n.next_run_at
              from (select q.tenant, agent_bridge.tenant_next_run_at(q.tenant) as next_run_at
                      from unnest(v_locked) q(tenant)) n
             where tt.tenant = n.tenant
               and (n.next_run_at is null or n.next_run_at > now());
        elsif cardinality(v_later) > 0 then
            -- No fresh snapshot to check with: leave them active, at the back of the line.
            update public.agent_task_tenants tt
               set served = v_round
              from (select s.tenant from public.agent_task_tenants s
                     where s.tenant = any (v_later)
                       for no key update skip locked) s
             where tt.tenant = s.tenant;
        end if;
    end if;

    if cardinality(v_tenants) = 0 then
        return;
    end if;

    -- The rest of the last tenant's tie (same `served`), since priority decides
    -- among tenants whose turn it equally is.
    if cardinality(v_tenants) = v_limit then
        v_tie_served := v_served[v_limit];
        select v_tenants || coalesce(array_agg(x.tenant order by x.tenant), '{}'),
               v_served || coalesce(array_agg(x.served order by x.tenant), '{}'),
               v_allow || coalesce(array_agg(x.allowance order by x.tenant), '{}')
          into v_tenants, v_served, v_allow
          from (select tt.tenant, tt.served, room.n as allowance
                  from public.agent_task_tenants tt
                  left join lateral (
                     select l.max_processing from public.agent_tenant_limits l
                      where l.tenant = tt.tenant limit 1) l on true
                 cross join lateral (
                     select case when coalesce(l.max_processing, v_default_cap) > 0
                            then coalesce(l.max_processing, v_default_cap) - (
                                 select count(*) from (
                                     select 1 from public.agent_task_requests p
                                      where p.tenant = tt.tenant and p.status = 'processing'
                                      limit coalesce(l.max_processing, v_default_cap)) y)::integer
                            else v_limit end as n) room
                 cross join lateral (
                     select 1 from public.agent_task_requests t
                      where t.tenant = tt.tenant and t.status = 'pending' and t.run_at <= now()
                        and (p_agents is null or t.agent = any (p_agents))
                      limit 1) due
                 where tt.active and tt.served = v_tie_served and tt.tenant > v_after_tenant) x
         where x.allowance > 0;
    end if;

    -- 2. The rows: each tenant's first rows in its own order, ranked; rank 1 of every
    -- tenant goes before rank 2 of any, and so on. Within a rank: least recently
    -- served tenant first, then priority, then age. No tenant needs more than
    -- p_limit minus one row for each other tenant taking part.
    v_share := greatest(v_limit - least(cardinality(v_tenants), v_limit) + 1, 1);
    return query
    with candidates as (
        select w.id, w.priority, w.run_at, w.created_at, c.tenant, c.served,
               row_number() over (partition by c.tenant
                                  order by w.priority desc, w.run_at, w.created_at) as rank
          from unnest(v_tenants, v_served, v_allow) c(tenant, served, allowance)
         cross join lateral (
             select h.id, h.priority, h.run_at, h.created_at from (
                 -- Locked here, skipping rows another claim holds, so concurrent
                 -- bridges share even one tenant's backlog. (A locking clause is not
                 -- allowed on a UNION arm itself, hence the wrapping subqueries.)
                 (select * from (
                  select t.id, t.priority, t.run_at, t.created_at
                    from public.agent_task_requests t
                   where p_agents is null and t.tenant = c.tenant
                     and t.status = 'pending' and t.run_at <= now()
                   order by t.priority desc, t.run_at, t.created_at
                   limit least(c.allowance, v_share)
                     for update skip locked) mine)
                 union all
                 (select a.id, a.priority, a.run_at, a.created_at
                    from unnest(p_agents) g(name)
                   cross join lateral (
                       select t.id, t.priority, t.run_at, t.created_at
                         from public.agent_task_requests t
                        where t.tenant = c.tenant and t.agent = g.name
                          and t.status = 'pending' and t.run_at <= now()
                        order by t.priority desc, t.run_at, t.created_at
                        limit least(c.allowance, v_share)
                          for update skip locked) a)
             ) h order by h.priority desc, h.run_at, h.created_at
             limit least(c.allowance, v_share)) w
    ),
    picked as (
        select k.id,
               row_number() over (order by k.rank, k.served, k.priority desc, k.run_at,
                                           k.created_at, k.tenant) as ord
          from candidates k
         order by k.rank, k.served, k.priority desc, k.run_at, k.created_at, k.tenant
         limit v_limit
    ),
    locked as (
        select t.id from public.agent_task_requests t
         where t.id in (select p.id from picked p) and t.status = 'pending'
           for update skip locked
    ),
    claimed as (
        -- A row waiting for an answer is due only once its question expired (run_at is
        -- the deadline; an answer makes it due at once and clears waiting_for): it ends
        -- failed / NoAnswer here, without reaching a worker, whose handler would only
        -- replay to the same question.
        update public.agent_task_requests t
           set status = case when t.waiting_for is null then 'processing' else 'failed' end,
               attempts = t.attempts + case when t.waiting_for is null then 1 else 0 end,
               lease_expires_at = case when t.waiting_for is null
                                       then now() + make_interval(secs => p_lease_seconds) end,
               worker = null,
               started_at = case when t.waiting_for is null then null else t.started_at end,
               finished_at = case when t.waiting_for is not null then now() end,
               error = case when t.waiting_for is null then t.error
                            else agent_bridge.no_answer_error(t.waiting_for, t.attempts) end,
               response_payload = case when t.waiting_for is null then t.response_payload
                   else jsonb_build_object('error', agent_bridge.no_answer_error(
                            t.waiting_for, t.attempts) ->> 'message') end,
               waiting_for = null
          from locked
         where t.id = locked.id
        -- (the payload is measured only when asked for: its size is read from its
        -- header, and a value stored compressed is measured as text)
        returning t.id, t.attempts, t.agent, t.tenant, t.status,
                  case when p_inline_bytes > 0 then
                      case when agent_bridge.payload_bytes(t.request_payload) <= p_inline_bytes
                                -- deeper than the default insert limit (an operator may
                                -- raise it) only at start: a decoder's recursion limit
                                -- must fail that one task, not the whole claim
                                and not jsonb_path_exists(t.request_payload,
                                    'lax $.**{64}.type() ? (@ == "object" || @ == "array")')
                           then t.request_payload end
                  end as request_payload,
                  t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at
    ),
    stamped as (
        update public.agent_task_tenants tt
           set served = v_round
          from (select s.tenant from public.agent_task_tenants s
                 where s.tenant in (select c.tenant from claimed c)
                   for no key update skip locked) s
         where tt.tenant = s.tenant
    )
    select c.id, c.attempts, c.agent, c.request_payload, c.max_attempts, c.priority,
           c.user_id, c.enterprise_id, c.created_at
      from claimed c join picked p on p.id = c.id
     where c.status = 'processing'
     order by p.ord;
end
$$;

-- The worker's batched writes: kind 'wait' (p_docs: what is asked, p_seconds: its timeout).
create or replace function public.agent_tasks_write(
    p_kinds text[],
    p_ids uuid[],
    p_attempts integer[],
    p_workers text[],
    p_docs jsonb[],
    p_seconds double precision[],
    p_delays double precision[],
    p_seqs integer[],
    p_offsets integer[],
    p_texts text[])
returns table (ord integer, applied boolean, status text, attempts integer, worker text,
               request_payload jsonb, max_attempts integer, priority integer, user_id uuid,
               enterprise_id text, created_at timestamptz, agent text, budget jsonb)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
#variable_conflict use_column
declare
    n integer := coalesce(cardinality(p_kinds), 0);
    v_kinds text[];
    v_done agent_bridge.write_result[] := '{}';
    v_one public.agent_task_write;
    v_bad record;
    r record;
    v_budgets jsonb;
    v_refused integer[];
begin
    -- The checks are plain expressions where they can be: most calls carry one write (a
    -- prefork child's), and each query here is a statement more per task.
    -- (a null array counts as empty: a call of nulls does nothing, as null arguments do
    -- for the other state functions)
    if coalesce(cardinality(p_ids), 0) <> n or coalesce(cardinality(p_attempts), 0) <> n
       or coalesce(cardinality(p_workers), 0) <> n or coalesce(cardinality(p_docs), 0) <> n
       or coalesce(cardinality(p_seconds), 0) <> n or coalesce(cardinality(p_delays), 0) <> n
       or coalesce(cardinality(p_seqs), 0) <> n or coalesce(cardinality(p_offsets), 0) <> n
       or coalesce(cardinality(p_texts), 0) <> n then
        raise exception 'p_kinds, p_ids, p_attempts, p_workers, p_docs, p_seconds, p_delays, '
                        'p_seqs, p_offsets and p_texts must be arrays of one length (one '
                        'element per write), got lengths %',
            array_to_string(array[cardinality(p_kinds), cardinality(p_ids),
                cardinality(p_attempts), cardinality(p_workers), cardinality(p_docs),
                cardinality(p_seconds), cardinality(p_delays), cardinality(p_seqs),
                cardinality(p_offsets), cardinality(p_texts)], ', ', 'null')
            using errcode = '22023';
    end if;
    if n = 0 then
        return;
    elsif n = 1 then
        v_kinds := p_kinds;
    else
        select array_agg(distinct k.kind) into v_kinds from unnest(p_kinds) k(kind);
    end if;
    if array_position(v_kinds, null) is not null
       or not v_kinds <@ array['bind', 'start', 'heartbeat', 'append', 'progress', 'complete',
                               'fail', 'retry', 'cancelled', 'usage', 'wait'] then
        select k.ord, k.kind into v_bad
          from unnest(p_kinds) with ordinality k(kind, ord)
         where k.kind is null
            or k.kind not in ('bind', 'start', 'heartbeat', 'append', 'progress', 'complete',
                              'fail', 'retry', 'cancelled', 'usage', 'wait')
         order by k.ord
         limit 1;
        raise exception 'p_kinds[%] is %, not a kind of write', v_bad.ord,
            coalesce('"' || v_bad.kind || '"', 'null')
            using errcode = '22023',
                  hint = 'The kinds are bind, start, heartbeat, append, progress, complete, '
                         'fail, retry, cancelled, usage and wait.';
    end if;
    -- (a null id is a write to no row, as in the functions: nothing to check)
    if n = 1 then
        if p_ids[1] is not null
           and p_kinds[1] in ('bind', 'start', 'heartbeat', 'retry', 'wait') then
            perform agent_bridge.check_seconds('p_seconds[1]', p_seconds[1], false);
            if p_kinds[1] = 'retry' then
                perform agent_bridge.check_seconds('p_delays[1]', p_delays[1], true);
            end if;
        end if;
    elsif v_kinds && array['bind', 'start', 'heartbeat', 'retry', 'wait'] then
        perform agent_bridge.check_seconds(format('p_seconds[%s]', u.ord), u.secs, false),
                case when u.kind = 'retry'
                     then agent_bridge.check_seconds(format('p_delays[%s]', u.ord), u.delay,
                                                     true) end
           from unnest(p_kinds, p_ids, p_seconds, p_delays)
                with ordinality u(kind, id, secs, delay, ord)
          where u.kind in ('bind', 'start', 'heartbeat', 'retry', 'wait') and u.id is not null
          order by u.ord;
    end if;

    if not v_kinds && array['complete', 'fail', 'retry', 'cancelled', 'wait'] then
        perform agent_bridge.relax_commit();
    end if;

    -- One write (a prefork child's, a quiet worker's): its single-row function, which does
    -- exactly what the set-based statements below do for one row, at less than half the
    -- cost (no arrays to unpack and join back). A missing row gives the empty answer.
    if n = 1 then
        if p_kinds[1] in ('bind', 'start') then
            return query
            select 1, coalesce(s.applied, false), s.status, s.attempts, s.worker,
                   case when p_kinds[1] = 'start' then s.request_payload end,
                   s.max_attempts, s.priority, s.user_id, s.enterprise_id, s.created_at,
                   s.agent, s.budget
              from (select) one
              left join public.agent_task_start(p_ids[1], p_attempts[1], p_workers[1],
                                                p_seconds[1], p_docs[1]) s on true;
            return;
        end if;
        case p_kinds[1]
            when 'heartbeat' then
                select * into v_one from public.agent_task_heartbeat(
                    p_ids[1], p_attempts[1], p_workers[1], p_seconds[1]);
            when 'append' then
                select * into v_one from public.agent_task_append(
                    p_ids[1], p_attempts[1], p_workers[1], p_seqs[1], p_offsets[1], p_texts[1]);
            when 'progress' then
                select * into v_one from public.agent_task_progress(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
            when 'complete' then
                select * into v_one from public.agent_task_complete(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
            when 'fail' then
                select * into v_one from public.agent_task_fail(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
            when 'retry' then
                select * into v_one from public.agent_task_schedule_retry(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1], p_delays[1],
                    p_seconds[1]);
            when 'wait' then
                select * into v_one from public.agent_task_wait(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1], p_seconds[1]);
            when 'usage' then
                select * into v_one from public.agent_task_report_usage(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1], p_seqs[1]);
            else
                select * into v_one from public.agent_task_cancelled(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
        end case;
        return query select 1, coalesce(v_one.applied, false), v_one.status, v_one.attempts,
                            v_one.worker, null::jsonb, null::integer, null::integer,
                            null::uuid, null::text, null::timestamptz, null::text, null::jsonb;
        return;
    end if;

    if v_kinds && array['bind', 'start'] then
        v_done := v_done || array(select w from agent_bridge.write_bind(
            p_kinds, p_ids, p_attempts, p_workers, p_seconds) w);
        -- What the binds' handlers declared they may spend, reserved (issue 25); a bind
        -- whose tenant has nothing left is refused, its row failed.
        select jsonb_object_agg(g.ord::text, g.budget),
               array_agg(g.ord) filter (where g.refusal is not null)
          into v_budgets, v_refused
          from agent_bridge.reserve_spend(
                   array(select d.ord from unnest(v_done) d
                          where p_kinds[d.ord] in ('bind', 'start')),
                   p_ids, p_attempts, p_workers, p_docs) g;
        if v_refused is not null then
            v_done := array(select d from unnest(v_done) d where d.ord <> all (v_refused));
        end if;
    end if;
    if 'usage' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_usage(
            p_kinds, p_ids, p_attempts, p_workers, p_docs, p_seqs) w);
    end if;
    if 'heartbeat' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_heartbeat(
            p_kinds, p_ids, p_attempts, p_workers, p_seconds) w);
    end if;
    if 'append' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_append(
            p_kinds, p_ids, p_attempts, p_workers, p_seqs, p_offsets, p_texts) w);
    end if;
    if 'progress' = any (v_kinds) then
        for r in select u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc
                   from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs)
                        with ordinality u(kind, id, attempt, worker, doc, ord)
                  where u.kind = 'progress'
                  order by u.ord loop
            select * into v_one
              from public.agent_task_progress(r.id, r.attempt, r.worker, r.doc);
            if v_one.applied then
                v_done := v_done || row(r.ord, true, v_one.status, v_one.attempts, v_one.worker,
                                        null, null, null, null, null, null, null
                                       )::agent_bridge.write_result;
            end if;
        end loop;
    end if;
    if 'complete' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_complete(
            p_kinds, p_ids, p_attempts, p_workers, p_docs) w);
    end if;
    if 'fail' = any (v_kinds) then
        v_done := v_done || array(select w from agent_bridge.write_fail(
            p_kinds, p_ids, p_attempts, p_workers, p_docs) w);
    end if;
    if v_kinds && array['retry', 'cancelled', 'wait'] then
        for r in select u.ord::integer as ord, u.kind, u.id, u.attempt, u.worker, u.doc,
                        u.delay, u.secs
                   from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs, p_delays, p_seconds)
                        with ordinality u(kind, id, attempt, worker, doc, delay, secs, ord)
                  where u.kind in ('retry', 'cancelled', 'wait')
                  order by u.kind = 'cancelled', u.ord loop
            if r.kind = 'retry' then
                select * into v_one
                  from public.agent_task_schedule_retry(r.id, r.attempt, r.worker, r.doc,
                                                        r.delay, r.secs);
            elsif r.kind = 'wait' then
                select * into v_one
                  from public.agent_task_wait(r.id, r.attempt, r.worker, r.doc, r.secs);
            else
                select * into v_one
                  from public.agent_task_cancelled(r.id, r.attempt, r.worker, r.doc);
            end if;
            if v_one.applied then
                v_done := v_done || row(r.ord, true, v_one.status, v_one.attempts, v_one.worker,
                                        null, null, null, null, null, null, null
                                       )::agent_bridge.write_result;
            end if;
        end loop;
    end if;

    -- One row per write: the applied ones as they left the row, the others as it is now.
    return query
    select u.ord::integer,
           d.ord is not null,
           case when d.ord is not null then d.status else t.status::text end,
           case when d.ord is not null then d.attempts else t.attempts end,
           case when d.ord is not null then d.worker else t.worker end,
           d.request_payload,
           case when d.ord is not null then d.max_attempts
                when u.kind in ('bind', 'start') then t.max_attempts end,
           case when d.ord is not null then d.priority
                when u.kind in ('bind', 'start') then t.priority end,
           case when d.ord is not null then d.user_id
                when u.kind in ('bind', 'start') then t.user_id end,
           case when d.ord is not null then d.enterprise_id
                when u.kind in ('bind', 'start') then t.enterprise_id end,
           case when d.ord is not null then d.created_at
                when u.kind in ('bind', 'start') then t.created_at end,
           case when d.ord is not null then d.agent
                when u.kind in ('bind', 'start') then t.agent end,
           case when d.ord is not null then v_budgets -> u.ord::text end
      from unnest(p_kinds, p_ids) with ordinality u(kind, id, ord)
      left join unnest(v_done) d on d.ord = u.ord
      left join public.agent_task_requests t on d.ord is null and t.id = u.id
     order by u.ord;
end
$$;

-- A cancel while waiting ends the row at once, and says so.
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
        when r.waiting_for is not null then 'Cancelled on request while waiting for an answer.'
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
           lease_expires_at = null,
           waiting_for = null
     where t.id = p_id;
    if r.worker is not null then
        -- (a holder that survived what its caller thought killed it stops too)
        perform pg_notify('agent_task_cancel', p_id::text || ':' || r.attempts);
    end if;
    return 'failed';
end
$$;

-- The `state` event carries waiting_for and answers.
create or replace function agent_bridge.state_message(p_row public.agent_task_requests)
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
        'agent', p_row.agent, 'waiting_for', p_row.waiting_for);
    v_result jsonb := jsonb_build_object('response_payload', p_row.response_payload,
                                         'error', p_row.error, 'answers', p_row.answers);
begin
    if octet_length(v_result::text) > 65536 then
        return v_state || jsonb_build_object('response_payload', null, 'error', null,
                                             'answers', null,
                                             'omitted', jsonb_build_array('response_payload',
                                                                          'error', 'answers'));
    end if;
    return v_state || v_result;
end
$$;

-- A Broadcast `state` event when a question is asked or answered, too.
drop trigger agent_task_requests_broadcast_state on public.agent_task_requests;
create trigger agent_task_requests_broadcast_state
    after update on public.agent_task_requests
    for each row
    when (old.status is distinct from new.status
          or old.attempts is distinct from new.attempts
          or old.cancel_requested_at is distinct from new.cancel_requested_at
          or old.error is distinct from new.error
          or old.response_payload is distinct from new.response_payload
          or old.waiting_for is distinct from new.waiting_for)
    execute function public.agent_task_requests_broadcast_state();

grant select (waiting_for, answers) on table public.agent_task_requests to authenticated;

revoke execute on function agent_bridge.may_act_on(uuid) from public, anon, authenticated;

revoke execute on function agent_bridge.no_answer_error(jsonb, integer)
    from public, anon, authenticated;
grant execute on function agent_bridge.no_answer_error(jsonb, integer) to service_role;
revoke execute on function public.agent_task_wait(uuid, integer, text, jsonb, double precision)
    from public, anon, authenticated;
grant execute on function public.agent_task_wait(uuid, integer, text, jsonb, double precision)
    to service_role;
revoke execute on function public.agent_task_answers(uuid, integer, text)
    from public, anon, authenticated;
grant execute on function public.agent_task_answers(uuid, integer, text) to service_role;
revoke execute on function public.answer_agent_task(uuid, jsonb) from public, anon;
grant execute on function public.answer_agent_task(uuid, jsonb) to authenticated, service_role;

notify pgrst, 'reload schema';
