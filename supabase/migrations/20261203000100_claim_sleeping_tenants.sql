-- agent-bridge: the fair claim against hostile users at scale (issue 20, items 1 and 5).
-- Idempotent.
--
-- 1. Tenants with only future rows sleep. Before, every claim (each idle poll, each
--    insert's wake-up) walked and re-stamped every tenant that held nothing but rows
--    scheduled for later: 2,000 such tenants cost 56-98 ms and ~890 KB of WAL a claim.
--    Now such a tenant is inactive with `wake_at`, the earliest run_at of its pending
--    rows; the claim first wakes the sleepers that are due (one index range scan,
--    bounded), then walks only active tenants. A claim's cost no longer depends on how
--    many tenants have nothing due.
-- 2. New tenants no longer go first. A tenant's first stamp was "before everyone", so a
--    stream of sign-ups kept an established tenant from ever getting a turn. Now a
--    tenant that arrives, comes back after being idle, or wakes up joins the line at the
--    current round: behind every tenant already waiting, ahead of every tenant served
--    after it arrived. Nobody jumps the queue and nobody is starved.
--
-- The states of a row of agent_task_tenants:
--   active                        in the rotation: the claim visits it in (served, tenant)
--                                 order; it may have due rows
--   not active, wake_at = t       asleep: every pending row of it has run_at >= t
--   not active, wake_at is null   idle: no pending rows
-- The invariant (no lost wake-up): a tenant with a committed pending row is active, or
-- asleep with wake_at <= that row's run_at. Writers (the triggers) keep it for the rows
-- they make pending; the claim keeps it when it puts a tenant to sleep or deactivates it,
-- by the locking protocol of 20261130000300_tenants.sql (see tenants_arrive below).

-- 1. The column, its index, the join stamp ---------------------------------------------

alter table public.agent_task_tenants add column if not exists wake_at timestamptz;
comment on column public.agent_task_tenants.wake_at is
    'agent-bridge: set while the tenant is asleep (not active): no pending row of it is '
    'due before this time. Null while active or idle (no pending rows).';

do $$
begin
    if not exists (select 1 from pg_constraint
                    where conname = 'agent_task_tenants_wake_check') then
        alter table public.agent_task_tenants
            add constraint agent_task_tenants_wake_check check (wake_at is null or not active);
    end if;
end
$$;

-- The sleepers, earliest first: the claim reads the due ones off the front.
create index if not exists agent_task_tenants_wake_idx
    on public.agent_task_tenants (wake_at) where wake_at is not null;

-- Rounds are 2^20 stamps apart: a claim stamps the tenants it serves with the round's
-- first stamp, and tenants that join before the next claim take the stamps after it,
-- one each in order of arrival (modulo 2^20 - 1). So a tenant that joins goes behind the tenants just
-- served (they had their turn before it came), ahead of any tenant served later, and
-- joiners never tie with each other (ties would make every claim read all of them).
-- 2^63 / 2^20 rounds is ~278 years of 1,000 claims a second.
alter sequence public.agent_task_claim_round increment by 1048576;
-- A sequence never called hands out its start value first, which would stamp the first
-- round's tenants ahead of the tenants that joined before it: issue that value now.
do $$
begin
    if not (select r.is_called from public.agent_task_claim_round r) then
        perform nextval('public.agent_task_claim_round');
    end if;
end
$$;

-- The stamp of a tenant joining the line now (new, back from idle, or awake).
create or replace function agent_bridge.tenant_join_stamp()
returns bigint
language sql
volatile
security invoker
set search_path = ''
as $$
    select r.last_value + 1 + nextval('public.agent_task_tenant_arrival') % 1048575
      from public.agent_task_claim_round r
$$;
revoke execute on function agent_bridge.tenant_join_stamp() from public, anon, authenticated;
grant execute on function agent_bridge.tenant_join_stamp() to service_role;

alter table public.agent_task_tenants
    alter column served set default agent_bridge.tenant_join_stamp();

-- The earliest run_at of a tenant's pending rows, null if none: the first entry of each
-- priority in agent_task_requests_tenant_claim_idx (tenant, priority desc, run_at, ...),
-- one index probe per distinct priority the tenant has pending (users have one band,
-- by default the single priority 0), never a read of all its rows.
create or replace function agent_bridge.tenant_next_run_at(p_tenant text)
returns timestamptz
language sql
stable
security invoker
set search_path = ''
as $$
    with recursive heads as (
        (select t.priority, t.run_at from public.agent_task_requests t
          where t.tenant = p_tenant and t.status = 'pending'
          order by t.priority desc, t.run_at
          limit 1)
        union all
        select n.priority, n.run_at
          from heads h
         cross join lateral (
             select t.priority, t.run_at from public.agent_task_requests t
              where t.tenant = p_tenant and t.status = 'pending' and t.priority < h.priority
              order by t.priority desc, t.run_at
              limit 1) n
    )
    select min(h.run_at) from heads h
$$;
revoke execute on function agent_bridge.tenant_next_run_at(text) from public, anon, authenticated;
grant execute on function agent_bridge.tenant_next_run_at(text) to service_role;

-- 2. Writers: rows that become pending ----------------------------------------------------

-- The tenants of rows that just became pending (p_run_at: each row's run_at; null means
-- due now). A tenant with a due row is active; one whose new rows are all in the future
-- sleeps until the earliest, or sooner if it already sleeps until sooner; an active one
-- stays as it is (the claim puts it to sleep if it has nothing due).
--
-- Locking protocol with the claim (as in 20261130000300_tenants.sql): an active tenant's
-- row is held FOR KEY SHARE until this transaction ends; any other tenant's row is
-- locked by the upsert (ON CONFLICT DO UPDATE locks the row even when its WHERE leaves
-- it unchanged). The claim puts a tenant to sleep or deactivates it only under FOR
-- UPDATE SKIP LOCKED (which skips both) and only after re-reading, under that lock and
-- with a fresh snapshot, its pending rows. So a tenant never goes to sleep past (or is
-- deactivated despite) a pending row that is uncommitted: either the writer holds the
-- tenant and the claim leaves it active, or the writer's lock waits for the claim, then
-- finds the tenant inactive and upserts it here, waking it or lowering wake_at.
-- A joiner's stamp is the current round's (agent_bridge.tenant_join_stamp): a tenant
-- coming back never keeps a stamp older than that, so it cannot jump the queue.
create or replace function agent_bridge.tenants_arrive(p_tenants text[], p_run_at timestamptz[])
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    v_held text[];
begin
    if cardinality(p_tenants) is null or cardinality(p_tenants) = 0 then
        return;
    end if;
    select coalesce(array_agg(s.tenant), '{}') into v_held
      from (select s.tenant from public.agent_task_tenants s
             where s.tenant = any (p_tenants) and s.active
             order by s.tenant
               for key share) s;
    insert into public.agent_task_tenants as s (tenant, active, wake_at, served)
    select x.tenant, x.due, case when not x.due then x.first_run_at end,
           agent_bridge.tenant_join_stamp()
      from (select a.tenant,
                   bool_or(a.run_at is null or a.run_at <= now()) as due,
                   min(a.run_at) as first_run_at
              from unnest(p_tenants, p_run_at) a(tenant, run_at)
             where a.tenant is not null and a.tenant <> all (v_held)
             group by a.tenant) x
     order by x.tenant
    on conflict (tenant) do update
       set active = excluded.active,
           wake_at = case when excluded.active then null
                          else least(s.wake_at, excluded.wake_at) end,
           served = case when excluded.active then greatest(s.served, excluded.served)
                         else s.served end
     where not s.active
       and (excluded.active or s.wake_at is null or excluded.wake_at < s.wake_at);
end
$$;
revoke execute on function agent_bridge.tenants_arrive(text[], timestamptz[])
    from public, anon, authenticated;
grant execute on function agent_bridge.tenants_arrive(text[], timestamptz[]) to service_role;

-- The old entry point, kept for callers that know only the tenants: their rows count as
-- due now (an active tenant with nothing due is put to sleep by the next claim).
create or replace function public.agent_task_tenants_activate(p_tenants text[])
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
begin
    perform agent_bridge.tenants_arrive(p_tenants, null);
end
$$;
revoke execute on function public.agent_task_tenants_activate(text[])
    from public, anon, authenticated;
grant execute on function public.agent_task_tenants_activate(text[]) to service_role;

create or replace function public.agent_task_requests_tenants_inserted()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
    v_tenants text[];
    v_first timestamptz[];
begin
    -- (one pass over the rows, so the two arrays line up)
    select array_agg(x.tenant), array_agg(x.first_run_at) into v_tenants, v_first
      from (select n.tenant, min(n.run_at) as first_run_at from new_rows n
             where n.status = 'pending' group by n.tenant) x;
    perform agent_bridge.tenants_arrive(v_tenants, v_first);
    return null;
end
$$;

-- Rows back to pending (release, rescue, requeue), moved to another tenant, or moved
-- earlier (a pending row's run_at lowered, e.g. by the operator): the tenant may have to
-- wake sooner than it sleeps.
create or replace function public.agent_task_requests_tenants_updated()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    perform agent_bridge.tenants_arrive(array[new.tenant], array[new.run_at]);
    return null;
end
$$;

drop trigger if exists agent_task_requests_tenants_updated on public.agent_task_requests;
create trigger agent_task_requests_tenants_updated
    after update of status, enterprise_id, user_id, run_at on public.agent_task_requests
    for each row
    when (new.status = 'pending'
          and (old.status is distinct from 'pending' or old.tenant is distinct from new.tenant
               or new.run_at < old.run_at))
    execute function public.agent_task_requests_tenants_updated();

-- 3. The fair claim ---------------------------------------------------------------------

-- As in 20261130000300_tenants.sql (moved here by 20261130001100_commit_cost.sql), with:
-- 0. the due sleepers woken first, at most p_limit + 32 of them, earliest first (a crowd
--    due at the same instant is woken over a few claims, each waking more than it
--    serves), each joining the line at the current round;
-- 1. the walk over active tenants only; a tenant found with pending rows but none due is
--    put to sleep until its earliest (no longer re-stamped on every claim), and one with
--    none is deactivated, both under the locking protocol above.
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
    p_agents text[] default null)
returns table (id uuid, attempt integer, agent text)
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
        returning t.id, t.attempts, t.agent, t.tenant
    ),
    stamped as (
        update public.agent_task_tenants tt
           set served = v_round
          from (select s.tenant from public.agent_task_tenants s
                 where s.tenant in (select c.tenant from claimed c)
                   for no key update skip locked) s
         where tt.tenant = s.tenant
    )
    select c.id, c.attempts, c.agent
      from claimed c join picked p on p.id = c.id
     order by p.ord;
end
$$;

revoke execute on function agent_bridge.claim_rows(integer, double precision, integer, text[])
    from public, anon, authenticated;
grant execute on function agent_bridge.claim_rows(integer, double precision, integer, text[])
    to service_role;

-- PostgREST caches the functions it can call (see 20261130000900_reload_schema.sql).
notify pgrst, 'reload schema';
