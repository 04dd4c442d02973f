-- agent-bridge: one commit where there were four (issue 23). Idempotent.
--
-- Before: a task cost the database a commit for each of its worker's writes: the start
-- (which also read the payload), every lease renewal, every streamed chunk, and the
-- outcome; each a round trip and, for most, a wait for the disk. With many tasks in
-- flight that is thousands of tiny transactions a second, one per write, while the
-- rows they touch sit side by side. Now:
--
-- 1. The claim returns what the worker needs: besides (id, attempt, agent), each claimed
--    row's max_attempts, priority, user_id, enterprise_id and created_at, and its
--    request_payload when that is at most p_inline_bytes (a new trailing argument,
--    default 0: never), read straight from the claim's UPDATE ... RETURNING, no second
--    lookup. A worker given those in its job only binds itself to the row at start
--    (the same fenced write, without reading the payload back).
-- 2. public.agent_tasks_write applies a batch of the worker's writes (binds, starts,
--    heartbeats, appends, progress, completes, failures, retries, cancels), of any
--    number of rows, in one call and one commit. Each write is exactly its single-row
--    function's, fenced per row; the hot kinds are one statement each however many
--    rows they touch (UPDATE/INSERT ... FROM unnest(...)). The commit is relaxed only
--    for a batch without outcomes, as for the writes alone.
--
-- The single-row functions (agent_task_start, _heartbeat, _append, _complete, _fail,
-- _progress, _schedule_retry, _cancelled) stay as they are: a batch of one write is
-- sent to its single-row function (by the batch, and by the worker's writer without the
-- arrays), which costs less than the set-based statements for one row. The set-based
-- writes (agent_bridge.write_bind, write_heartbeat, write_append, write_complete,
-- write_fail) repeat their fencing rules for many rows; tests/sql/test_batched_writes.py
-- holds each kind equal to its single-row function on every state a row can be in.

-- 1. The claim returns what the worker needs -------------------------------------------
--
-- Its result type changes, so both functions are dropped and created again (with the
-- same grants). p_inline_bytes is a trailing argument with a default: a call without it
-- (an older bridge, by position or by name) claims as before and gets more columns.

drop function if exists public.agent_tasks_claim(integer, double precision, integer, text[]);
drop function if exists agent_bridge.claim_rows(integer, double precision, integer, text[]);

-- Claim up to p_limit due pending rows, taking turns across tenants: the tenants least
-- recently served go first, one row each per turn; a tenant's own rows go in priority
-- order (then run_at, created_at), and priority breaks ties between tenants whose turn it
-- equally is. A tenant may have at most its cap of rows processing
-- (agent_tenant_limits.max_processing, else p_tenant_concurrency; 0 = no cap). p_agents:
-- only rows of these agents (null: any). Rows come back in the order they should run.
-- Each claimed row's attempts goes up by one; that number fences every later write.
-- Each comes back with what the worker needs to start it: the row's max_attempts,
-- priority, user_id, enterprise_id, created_at and agent, and its request_payload when
-- that is at most p_inline_bytes (agent_bridge.payload_bytes; 0: never), else null (the
-- worker then reads it at start).
--
-- 0. the due sleepers are woken first, at most p_limit + 32 of them, earliest first (a
--    crowd due at the same instant is woken over a few claims, each waking more than it
--    serves), each joining the line at the current round;
-- 1. the walk visits active tenants only; a tenant found with pending rows but none due is
--    put to sleep until its earliest, and one with none is deactivated, both under the
--    locking protocol of agent_bridge.tenants_arrive;
-- 2. the rows: rank 1 of every tenant before rank 2 of any, and so on.
--
-- Cost: about p_limit index probes (one per tenant whose turn it is), whatever the
-- backlog and however many tenants sleep; plus one probe for the sleepers, one write per
-- tenant woken or put to sleep (each happens once per batch of due rows, not per claim),
-- and more only while many active tenants sit at their cap. Every statement walks an
-- index whatever its parameters and statistics (see the SET clauses and the walk).
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
        update public.agent_task_requests t
           set status = 'processing',
               attempts = t.attempts + 1,
               lease_expires_at = now() + make_interval(secs => p_lease_seconds),
               worker = null,
               started_at = null
          from locked
         where t.id = locked.id
        -- (the payload is measured only when asked for: its size is read from its
        -- header, and a value stored compressed is measured as text)
        returning t.id, t.attempts, t.agent, t.tenant,
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
     order by p.ord;
end
$$;

-- The entry point (PostgREST's and the bridge's): the claim above, with a relaxed commit.
create or replace function public.agent_tasks_claim(
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
as $$
begin
    perform agent_bridge.relax_commit();
    return query select c.id, c.attempt, c.agent, c.request_payload, c.max_attempts,
                        c.priority, c.user_id, c.enterprise_id, c.created_at
                   from agent_bridge.claim_rows(p_limit, p_lease_seconds,
                                                p_tenant_concurrency, p_agents,
                                                p_inline_bytes) c;
end
$$;

revoke execute on function agent_bridge.claim_rows(integer, double precision, integer, text[], integer)
    from public, anon, authenticated;
grant execute on function agent_bridge.claim_rows(integer, double precision, integer, text[], integer)
    to service_role;
revoke execute on function public.agent_tasks_claim(integer, double precision, integer, text[], integer)
    from public, anon, authenticated;
grant execute on function public.agent_tasks_claim(integer, double precision, integer, text[], integer)
    to service_role;

-- 2. The set-based writes ---------------------------------------------------------------
--
-- The fencing says `coalesce(t.status, '') = 'processing'`, the same test as `t.status =
-- 'processing'` (status is never null) that no partial index's predicate matches: so the
-- planner reaches each row of a batch by its primary key whatever the statistics say.
-- With the plain test and statistics from a time with few rows processing, it walked the
-- whole processing index once per batch, or per row (500 heartbeats among 2,000
-- processing rows: 280 ms instead of 13).

-- One write of a batch as the write helpers (agent_bridge.write_*) return it: the write's
-- place in its batch (1-based), whether it applied, and the row as the write left it;
-- request_payload and the columns after it only where said (binds and starts).
do $$
begin
    if to_regtype('agent_bridge.write_result') is null then
        create type agent_bridge.write_result as (
            ord integer,
            applied boolean,
            status text,
            attempts integer,
            worker text,
            request_payload jsonb,
            max_attempts integer,
            priority integer,
            user_id uuid,
            enterprise_id text,
            created_at timestamptz,
            agent text
        );
    end if;
end
$$;

-- The binds and starts of a batch (p_kinds 'bind' and 'start'; other elements are
-- skipped): agent_task_start's fenced UPDATE, one statement for all of them. A row per
-- write applied, with the row's columns; a start's with its request_payload too. One row
-- written more than once: the writes of one (attempt, worker) are one write (the last of
-- them gives the lease) and all apply; of several (attempt, worker) pairs the first the
-- row admits applies and the others are refused, as they would be one after another (the
-- first takes the row, with a fresh lease). p_seconds are checked by the caller.
create or replace function agent_bridge.write_bind(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[],
    p_seconds double precision[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with w as (
        select u.ord::integer as ord, u.kind, u.id, u.attempt, u.worker, u.secs
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_seconds)
               with ordinality u(kind, id, attempt, worker, secs, ord)
         where u.kind in ('bind', 'start')
    ),
    pairs as (
        select w.id, w.attempt, w.worker, min(w.ord) as first_ord,
               (array_agg(w.secs order by w.ord desc))[1] as secs,
               bool_or(w.kind = 'start') as wants_payload
          from w
         group by w.id, w.attempt, w.worker
    ),
    chosen as (
        select distinct on (p.id) p.id, p.attempt, p.worker, p.secs, p.wants_payload
          from pairs p
          join public.agent_task_requests c
            on c.id = p.id and coalesce(c.status, '') = 'processing'
           and c.attempts = p.attempt
           and (c.worker is null or c.worker = p.worker or c.lease_expires_at < now())
         order by p.id, p.first_ord
    ),
    bound as (
        update public.agent_task_requests t
           set worker = chosen.worker,
               started_at = coalesce(t.started_at, now()),
               lease_expires_at = now() + make_interval(secs => chosen.secs)
          from chosen
         where t.id = chosen.id
           and coalesce(t.status, '') = 'processing'
           and t.attempts = chosen.attempt
           and (t.worker is null or t.worker = chosen.worker or t.lease_expires_at < now())
        returning t.id, chosen.attempt as asked_attempt, chosen.worker as asked_worker,
                  t.status::text as status, t.attempts, t.worker,
                  case when chosen.wants_payload then t.request_payload end as payload,
                  t.max_attempts, t.priority, t.user_id, t.enterprise_id, t.created_at,
                  t.agent
    )
    select w.ord, true, b.status, b.attempts, b.worker,
           case when w.kind = 'start' then b.payload end,
           b.max_attempts, b.priority, b.user_id, b.enterprise_id, b.created_at, b.agent
      from w
      join bound b
        on b.id = w.id and b.asked_attempt = w.attempt
       and b.asked_worker is not distinct from w.worker;
end
$$;

-- The heartbeats of a batch (p_kinds 'heartbeat'): agent_task_heartbeat's fenced UPDATE,
-- one statement for all of them. A row per write applied. Several heartbeats of one
-- (row, attempt, worker) are one renewal (the last gives the lease) and all apply, as
-- they would one after another. p_seconds are checked by the caller.
create or replace function agent_bridge.write_heartbeat(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[],
    p_seconds double precision[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with w as (
        select u.ord::integer as ord, u.id, u.attempt, u.worker, u.secs
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_seconds)
               with ordinality u(kind, id, attempt, worker, secs, ord)
         where u.kind = 'heartbeat'
    ),
    pairs as (
        select distinct on (w.id, w.attempt, w.worker) w.id, w.attempt, w.worker, w.secs
          from w
         order by w.id, w.attempt, w.worker, w.ord desc
    ),
    renewed as (
        update public.agent_task_requests t
           set lease_expires_at = now() + make_interval(secs => pairs.secs)
          from pairs
         where t.id = pairs.id and coalesce(t.status, '') = 'processing'
           and t.attempts = pairs.attempt and t.worker = pairs.worker
        returning t.id, t.status::text as status, t.attempts, t.worker
    )
    select w.ord, true, r.status, r.attempts, r.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from w
      join renewed r on r.id = w.id and r.attempts = w.attempt and r.worker = w.worker;
end
$$;

-- The appends of a batch (p_kinds 'append'): agent_task_append for all of them. The rows
-- are locked FOR SHARE (in id order) where the append's fencing holds, and the chunks of
-- those appends go in with one multi-row INSERT. A row per append applied. The arguments
-- of an append that applies are checked (any bad one fails the call), as
-- agent_task_append checks them; one that is refused is not.
create or replace function agent_bridge.write_append(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[],
    p_seqs integer[], p_offsets integer[], p_texts text[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_ords integer[];
    v_ids uuid[];
    v_attempts integer[];
    v_workers text[];
    v_seqs integer[];
    v_offsets integer[];
    v_texts text[];
    v_bad integer;
begin
    -- (aggregates of one query see its rows in one order: the arrays line up)
    select array_agg(x.ord), array_agg(x.id), array_agg(x.attempt), array_agg(x.worker),
           array_agg(x.seq), array_agg(x.answer_offset), array_agg(x.text)
      into v_ords, v_ids, v_attempts, v_workers, v_seqs, v_offsets, v_texts
      from (select u.ord::integer as ord, u.id, u.attempt, u.worker, u.seq,
                   u.answer_offset, u.text
              from unnest(p_kinds, p_ids, p_attempts, p_workers, p_seqs, p_offsets, p_texts)
                   with ordinality u(kind, id, attempt, worker, seq, answer_offset, text, ord)
              join public.agent_task_requests t
                on t.id = u.id and coalesce(t.status, '') = 'processing'
               and t.attempts = u.attempt and t.worker = u.worker
             where u.kind = 'append'
             order by t.id
               for share of t) x;
    if v_ords is null then
        return;
    end if;
    select a.ord into v_bad
      from unnest(v_ords, v_seqs, v_offsets, v_texts) a(ord, seq, answer_offset, text)
     where a.seq is null or a.seq < 0 or a.answer_offset is null or a.answer_offset < 0
        or a.text is null
     order by a.ord
     limit 1;
    if found then
        raise exception 'p_seq and p_offset must be 0 or more and p_text not null'
            using errcode = '22023', detail = format('The append at position %s.', v_bad);
    end if;
    insert into public.agent_task_chunks (task_id, attempt, seq, answer_offset, text)
    select a.id, a.attempt, a.seq, a.answer_offset, a.text
      from unnest(v_ids, v_attempts, v_seqs, v_offsets, v_texts)
           a(id, attempt, seq, answer_offset, text);
    return query
    select a.ord, true, 'processing'::text, a.attempt, a.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from unnest(v_ords, v_attempts, v_workers) a(ord, attempt, worker);
end
$$;

-- The completes of a batch (p_kinds 'complete', p_docs the responses):
-- agent_task_complete's fenced UPDATE, one statement for all of them. A row per write
-- applied. Of several completes of one (row, attempt, worker) the first applies and the
-- others are refused, as they would be one after another (the row is no longer
-- processing).
create or replace function agent_bridge.write_complete(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[], p_docs jsonb[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with firsts as (
        select distinct on (u.id, u.attempt, u.worker)
               u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs)
               with ordinality u(kind, id, attempt, worker, doc, ord)
         where u.kind = 'complete'
         order by u.id, u.attempt, u.worker, u.ord
    ),
    done as (
        update public.agent_task_requests t
           set status = 'completed',
               response_payload = firsts.doc,
               error = null,
               finished_at = now(),
               lease_expires_at = null
          from firsts
         where t.id = firsts.id and coalesce(t.status, '') = 'processing'
           and t.attempts = firsts.attempt and t.worker = firsts.worker
        returning firsts.ord, t.status::text as status, t.attempts, t.worker
    )
    select d.ord, true, d.status, d.attempts, d.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from done d;
end
$$;

-- The final failures of a batch (p_kinds 'fail', p_docs the errors): agent_task_fail's
-- fenced UPDATE, one statement for all of them. A row per write applied; of several
-- failures of one (row, attempt, worker) the first applies, as with completes.
create or replace function agent_bridge.write_fail(
    p_kinds text[], p_ids uuid[], p_attempts integer[], p_workers text[], p_docs jsonb[])
returns setof agent_bridge.write_result
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    return query
    with firsts as (
        select distinct on (u.id, u.attempt, u.worker)
               u.ord::integer as ord, u.id, u.attempt, u.worker, u.doc
          from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs)
               with ordinality u(kind, id, attempt, worker, doc, ord)
         where u.kind = 'fail'
         order by u.id, u.attempt, u.worker, u.ord
    ),
    done as (
        update public.agent_task_requests t
           set status = 'failed',
               error = firsts.doc || jsonb_build_object('at', now(), 'attempt', firsts.attempt),
               response_payload = jsonb_build_object('error', firsts.doc ->> 'message'),
               finished_at = now(),
               lease_expires_at = null
          from firsts
         where t.id = firsts.id and coalesce(t.status, '') = 'processing'
           and t.attempts = firsts.attempt and t.worker = firsts.worker
        returning firsts.ord, t.status::text as status, t.attempts, t.worker
    )
    select d.ord, true, d.status, d.attempts, d.worker,
           null::jsonb, null::integer, null::integer, null::uuid, null::text,
           null::timestamptz, null::text
      from done d;
end
$$;

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'agent_bridge.write_bind(text[], uuid[], integer[], text[], double precision[])',
        'agent_bridge.write_heartbeat(text[], uuid[], integer[], text[], double precision[])',
        'agent_bridge.write_append(text[], uuid[], integer[], text[], integer[], integer[], text[])',
        'agent_bridge.write_complete(text[], uuid[], integer[], text[], jsonb[])',
        'agent_bridge.write_fail(text[], uuid[], integer[], text[], jsonb[])'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

-- 3. The single-row writes, as calls of the set-based ones -----------------------------
--
-- Same names, arguments and results (and grants) as before.

-- A worker starts (or, after a Celery retry, restarts) its attempt. Refused when the
-- attempt is stale, or when another live worker already holds this attempt (a duplicate
-- broker delivery). Returns the payload the worker needs and the row's `agent` (the
-- worker runs that agent's handler with its limits). The write is agent_bridge.write_bind's.

-- The holder of an attempt renews its lease while its handler runs (the write is
-- agent_bridge.write_heartbeat's).

-- A piece of the streamed answer: fenced like agent_task_progress (the row processing,
-- at p_attempt, held by p_worker). The row is locked FOR SHARE, not written: a
-- concurrent state change waits for this insert and then deletes it with the others,
-- and an append that waited for a state change sees the new row and is refused.
-- answer_offset is the length written so far (in characters) for an append, the length
-- of the common prefix when a handler rewrote earlier text, 0 to start over. The write
-- is agent_bridge.write_append's.

-- The write is agent_bridge.write_complete's.

-- Final failure. p_error is {type, message, retryable, ...}; the message is also put
-- in response_payload.error, where the guide's frontend looks for it. The write is
-- agent_bridge.write_fail's.

-- 4. The batch ----------------------------------------------------------------------------

-- Many writes of the worker's attempts in one call, one commit (issue 23): element i of
-- each array is write i. p_kinds[i] is one of
--   bind       agent_task_start's write, without the payload  p_seconds: the lease
--   start      agent_task_start                               p_seconds: the lease
--   heartbeat  agent_task_heartbeat                           p_seconds: the lease
--   append     agent_task_append                              p_seqs, p_offsets, p_texts
--   progress   agent_task_progress                            p_docs: the response
--   complete   agent_task_complete                            p_docs: the response
--   fail       agent_task_fail                                p_docs: the error
--   retry      agent_task_schedule_retry                      p_docs: the error,
--                                                             p_delays, p_seconds
--   cancelled  agent_task_cancelled                           p_docs: the partial (or null)
-- with p_ids, p_attempts, p_workers the write's row, attempt and worker, and null in the
-- arrays a kind does not use. Each write is exactly its function's, fenced per row.
--
-- Returns one row per write, in order, ord = i: whether it applied, and the row as that
-- write left it; for a write refused, the row as the call leaves it (applied false, and
-- null columns if there is no such row). request_payload is a start's, when it applied;
-- max_attempts .. agent are filled for binds and starts (applied or refused, as
-- agent_task_start fills them), null for the other kinds.
--
-- Order: binds and starts, heartbeats, appends, progress, then the outcomes (complete,
-- fail, retry, cancelled). So an attempt's chunks and its outcome may share a call: the
-- outcome comes last and the chunks go with the attempt (agent_task_requests_stream_end).
-- Binds, heartbeats, appends (one multi-row INSERT of chunks), completes and failures are
-- one statement each, whatever their number (agent_bridge.write_*); progress, retries,
-- cancels and starts are rare, and run one by one.
--
-- Writes of one kind to one row in one call apply as they would one after another:
-- heartbeats (and binds) of one attempt and worker all apply, the last giving the lease;
-- of two completes (or failures) of one attempt the first applies and the second is
-- refused; appends each insert their chunk (one seq twice fails the call, 23505, as the
-- second agent_task_append would).
--
-- Arguments are checked as the functions check them (lease and delay seconds, an applied
-- append's seq, offset and text), and so are the arrays' lengths (a null array counts as
-- empty) and the kinds (22023): one bad write fails the whole call, which changes
-- nothing; the caller then sends the writes one by one. The commit is relaxed
-- (agent_bridge.relax_commit) only for a call without outcomes: an outcome waits for the
-- disk, as it does alone.
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
               enterprise_id text, created_at timestamptz, agent text)
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
                               'fail', 'retry', 'cancelled'] then
        select k.ord, k.kind into v_bad
          from unnest(p_kinds) with ordinality k(kind, ord)
         where k.kind is null
            or k.kind not in ('bind', 'start', 'heartbeat', 'append', 'progress', 'complete',
                              'fail', 'retry', 'cancelled')
         order by k.ord
         limit 1;
        raise exception 'p_kinds[%] is %, not a kind of write', v_bad.ord,
            coalesce('"' || v_bad.kind || '"', 'null')
            using errcode = '22023',
                  hint = 'The kinds are bind, start, heartbeat, append, progress, complete, '
                         'fail, retry and cancelled.';
    end if;
    -- (a null id is a write to no row, as in the functions: nothing to check)
    if n = 1 then
        if p_ids[1] is not null and p_kinds[1] in ('bind', 'start', 'heartbeat', 'retry') then
            perform agent_bridge.check_seconds('p_seconds[1]', p_seconds[1], false);
            if p_kinds[1] = 'retry' then
                perform agent_bridge.check_seconds('p_delays[1]', p_delays[1], true);
            end if;
        end if;
    elsif v_kinds && array['bind', 'start', 'heartbeat', 'retry'] then
        perform agent_bridge.check_seconds(format('p_seconds[%s]', u.ord), u.secs, false),
                case when u.kind = 'retry'
                     then agent_bridge.check_seconds(format('p_delays[%s]', u.ord), u.delay,
                                                     true) end
           from unnest(p_kinds, p_ids, p_seconds, p_delays)
                with ordinality u(kind, id, secs, delay, ord)
          where u.kind in ('bind', 'start', 'heartbeat', 'retry') and u.id is not null
          order by u.ord;
    end if;

    if not v_kinds && array['complete', 'fail', 'retry', 'cancelled'] then
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
                   s.agent
              from (select) one
              left join public.agent_task_start(p_ids[1], p_attempts[1], p_workers[1],
                                                p_seconds[1]) s on true;
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
            else
                select * into v_one from public.agent_task_cancelled(
                    p_ids[1], p_attempts[1], p_workers[1], p_docs[1]);
        end case;
        return query select 1, coalesce(v_one.applied, false), v_one.status, v_one.attempts,
                            v_one.worker, null::jsonb, null::integer, null::integer,
                            null::uuid, null::text, null::timestamptz, null::text;
        return;
    end if;

    if v_kinds && array['bind', 'start'] then
        v_done := v_done || array(select w from agent_bridge.write_bind(
            p_kinds, p_ids, p_attempts, p_workers, p_seconds) w);
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
    if v_kinds && array['retry', 'cancelled'] then
        for r in select u.ord::integer as ord, u.kind, u.id, u.attempt, u.worker, u.doc,
                        u.delay, u.secs
                   from unnest(p_kinds, p_ids, p_attempts, p_workers, p_docs, p_delays, p_seconds)
                        with ordinality u(kind, id, attempt, worker, doc, delay, secs, ord)
                  where u.kind in ('retry', 'cancelled')
                  order by u.kind = 'cancelled', u.ord loop
            if r.kind = 'retry' then
                select * into v_one
                  from public.agent_task_schedule_retry(r.id, r.attempt, r.worker, r.doc,
                                                        r.delay, r.secs);
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
                when u.kind in ('bind', 'start') then t.agent end
      from unnest(p_kinds, p_ids) with ordinality u(kind, id, ord)
      left join unnest(v_done) d on d.ord = u.ord
      left join public.agent_task_requests t on d.ord is null and t.id = u.id
     order by u.ord;
end
$$;

revoke execute on function public.agent_tasks_write(text[], uuid[], integer[], text[], jsonb[],
    double precision[], double precision[], integer[], integer[], text[])
    from public, anon, authenticated;
grant execute on function public.agent_tasks_write(text[], uuid[], integer[], text[], jsonb[],
    double precision[], double precision[], integer[], integer[], text[])
    to service_role;

notify pgrst, 'reload schema';
