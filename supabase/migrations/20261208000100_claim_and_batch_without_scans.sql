-- Two statements every task meets, without a scan of the whole table (issue 23: Postgres CPU
-- per task). No interface changes; schema version stays 9.
--
-- 1. The claim locks and updates the rows it picked by primary key (`id = any (array(...))`).
--    As joins, planned with statistics from when the table was small (a quiet table, then a
--    burst), they hashed the picked rows against every row and every pending row of the
--    table at each claim: 69-74 microseconds of CPU per claimed row, 40-47 after, in claims
--    of 50 from 4,000 pending rows (the same without statistics: about 60).
-- 2. agent_tasks_write answers from the writes themselves when all of them applied (the
--    usual case): its closing statement, which reads the table for writes that did not
--    apply, got a fresh custom plan at every call, about 0.1 ms per batch: a bind and an
--    outcome in one call cost 716-760 microseconds of CPU, 610-640 after.

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
-- ... and, since a disabled scan is costed at 1e10 before PostgreSQL 18, far above
-- jit_above_cost, a server with JIT would compile every statement here, and every trigger
-- the claim's UPDATE fires, once per row (13-15 ms a row on PostgreSQL 15; issue 23).
set jit = off
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
    -- The picked rows by primary key (`= any (array(...))`, one probe each): as a join,
    -- with statistics from when the table was small, the plan hashed them against every
    -- row of the table, and every pending row, at every claim (issue 23).
    locked as (
        select t.id from public.agent_task_requests t
         where t.id = any (array(select p.id from picked p)) and t.status = 'pending'
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
         where t.id = any (array(select l.id from locked l))
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
    -- When every write applied, the answer is what they returned: the statement that reads
    -- the table for the others is planned afresh at every call (its custom plan wins), a
    -- tenth of a millisecond per batch (issue 23).
    if cardinality(v_done) = n then
        return query
        select d.ord, true, d.status, d.attempts, d.worker, d.request_payload, d.max_attempts,
               d.priority, d.user_id, d.enterprise_id, d.created_at, d.agent,
               v_budgets -> d.ord::text
          from unnest(v_done) d
         order by d.ord;
        return;
    end if;
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

notify pgrst, 'reload schema';
