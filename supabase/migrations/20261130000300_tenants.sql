-- agent-bridge: many users, one table (issue 11): tenants, fair claim, quotas. Idempotent.
--
-- A row's tenant is its enterprise_id, else its user_id, else the one shared tenant
-- ('shared') of rows the service inserts without either. The claim takes turns
-- across tenants; the operator's table agent_tenant_limits caps what a signed-in
-- user may ask for and how many rows of one tenant may be processing at once.

-- 1. The tenant of a row -----------------------------------------------------------

alter table public.agent_task_requests
    add column if not exists tenant text
        generated always as (coalesce(nullif(enterprise_id, ''), user_id::text, 'shared')) stored;

-- A tenant's due rows in its own order (priority, then age), for the fair claim; the
-- second serves claims limited to some agents without reading the others' rows.
create index if not exists agent_task_requests_tenant_claim_idx
    on public.agent_task_requests (tenant, priority desc, run_at, created_at)
    where status = 'pending';
create index if not exists agent_task_requests_tenant_agent_claim_idx
    on public.agent_task_requests (tenant, agent, priority desc, run_at, created_at)
    where status = 'pending';
-- How many rows a tenant has processing (TENANT_CONCURRENCY), and a user's active
-- rows (the quota), without reading finished history.
create index if not exists agent_task_requests_tenant_processing_idx
    on public.agent_task_requests (tenant)
    where status = 'processing';
create index if not exists agent_task_requests_user_active_idx
    on public.agent_task_requests (user_id)
    where status in ('pending', 'processing');

-- 2. The operator's limits -----------------------------------------------------------

-- One row per tenant that differs from the default, plus the default row '*'. A null
-- in a tenant's row means "as the '*' row"; a null in the '*' row means the built-in
-- value (20 active rows, priority 0..0, 7 days, TENANT_CONCURRENCY).
create table if not exists public.agent_tenant_limits (
    tenant text primary key,
    max_active integer check (max_active >= 0),
    min_priority integer,
    max_priority integer,
    run_at_horizon interval check (run_at_horizon >= interval '0'),
    max_processing integer check (max_processing >= 0),
    note text,
    check (min_priority <= max_priority)
);
comment on table public.agent_tenant_limits is
    'agent-bridge limits per tenant (enterprise_id, else user id); the row ''*'' is the default. '
    'max_active: pending+processing rows one signed-in user may have; min/max_priority: the '
    'priority band users may choose; run_at_horizon: how far ahead users may schedule; '
    'max_processing: rows of the tenant processing at once (0 = no cap, null = '
    'TENANT_CONCURRENCY). Null = as the ''*'' row.';

insert into public.agent_tenant_limits (tenant, max_active, min_priority, max_priority,
                                        run_at_horizon, max_processing, note)
values ('*', 20, 0, 0, interval '7 days', null, 'default for every tenant')
on conflict (tenant) do nothing;

alter table public.agent_tenant_limits enable row level security;
revoke all on table public.agent_tenant_limits from public, anon, authenticated;
grant select, insert, update, delete on table public.agent_tenant_limits to service_role;
-- A signed-in user may read the limits that apply to them (their tenant's and the
-- default), so a frontend can show them; nothing else.
grant select on table public.agent_tenant_limits to authenticated;

drop policy if exists agent_tenant_limits_select_own on public.agent_tenant_limits;
create policy agent_tenant_limits_select_own on public.agent_tenant_limits
    for select to authenticated
    using (tenant = '*' or tenant = coalesce(
        nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''),
        (select auth.uid())::text));

-- 3. Tenants with work: the claim's round-robin ------------------------------------

-- One row per tenant seen with a pending row. `active`: it may have pending rows
-- (set by the triggers below whenever a row becomes pending; cleared only by the
-- claim once it has seen none). `served`: the claim round that last gave it rows;
-- the claim serves the least recently served tenants first. A tenant never served
-- has a negative stamp in order of arrival, so newcomers go first, first come first
-- served among themselves (and ties stay as small as one claim's batch).
create sequence if not exists public.agent_task_claim_round;
create sequence if not exists public.agent_task_tenant_arrival;
create table if not exists public.agent_task_tenants (
    tenant text primary key,
    active boolean not null default true,
    served bigint not null
        default nextval('public.agent_task_tenant_arrival') - 4611686018427387904
);
create index if not exists agent_task_tenants_turn_idx
    on public.agent_task_tenants (served, tenant) where active;

alter table public.agent_task_tenants enable row level security;
revoke all on table public.agent_task_tenants from public, anon, authenticated;
grant select, insert, update on table public.agent_task_tenants to service_role;
revoke all on sequence public.agent_task_claim_round, public.agent_task_tenant_arrival
    from public, anon, authenticated;
grant usage, select on sequence public.agent_task_claim_round, public.agent_task_tenant_arrival
    to service_role;

-- Rows already pending before this migration (an upgrade) have tenants with work;
-- they arrive in the order of their first row.
insert into public.agent_task_tenants (tenant)
select t.tenant from public.agent_task_requests t where t.status = 'pending'
 group by t.tenant order by max(t.priority) desc, min(t.run_at), min(t.created_at)
on conflict (tenant) do update set active = true;

-- Marks the tenants of rows that just became pending as active. Locking protocol
-- with the claim: an active tenant's row is held FOR KEY SHARE until this
-- transaction ends, and the claim deactivates a tenant only under FOR UPDATE (which
-- conflicts) and only after re-reading, under that lock, that it has no pending
-- rows. So a tenant is never deactivated while a pending row of it is uncommitted.
-- Claims' `served` updates take a lock that does not conflict with KEY SHARE.
create or replace function public.agent_task_tenants_activate(p_tenants text[])
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    v_held text[];
begin
    select coalesce(array_agg(s.tenant), '{}') into v_held
      from (select s.tenant from public.agent_task_tenants s
             where s.tenant = any (p_tenants) and s.active
             order by s.tenant
               for key share) s;
    -- The rest are new or inactive; ON CONFLICT DO UPDATE locks the row even when
    -- its WHERE finds it active by now, so each ends up held as well.
    insert into public.agent_task_tenants as s (tenant)
    select x.tenant from unnest(p_tenants) x(tenant)
     where x.tenant is not null and x.tenant <> all (v_held)
     group by x.tenant order by x.tenant
    on conflict (tenant) do update set active = true where not s.active;
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
begin
    perform public.agent_task_tenants_activate(array(
        select distinct n.tenant from new_rows n where n.status = 'pending'));
    return null;
end
$$;

drop trigger if exists agent_task_requests_tenants_inserted on public.agent_task_requests;
create trigger agent_task_requests_tenants_inserted
    after insert on public.agent_task_requests
    referencing new table as new_rows
    for each statement execute function public.agent_task_requests_tenants_inserted();

-- Rows back to pending (release, rescue, requeue) or moved to another tenant.
create or replace function public.agent_task_requests_tenants_updated()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
    perform public.agent_task_tenants_activate(array[new.tenant]);
    return null;
end
$$;

drop trigger if exists agent_task_requests_tenants_updated on public.agent_task_requests;
create trigger agent_task_requests_tenants_updated
    after update of status, enterprise_id, user_id on public.agent_task_requests
    for each row
    when (new.status = 'pending'
          and (old.status is distinct from 'pending' or old.tenant is distinct from new.tenant))
    execute function public.agent_task_requests_tenants_updated();

-- 4. Admission: what a signed-in user may insert --------------------------------------

-- Users are the roles row-level security applies to (authenticated); the service
-- role and the database owner bypass RLS and are not limited. Runs as the inserting
-- user: it sees only the user's own rows and limits, as RLS allows.
create or replace function public.agent_task_requests_admit()
returns trigger
language plpgsql
security invoker
set search_path = ''
as $$
declare
    v_uid uuid;
    v_enterprise text;
    v_tenant text;
    v_max_active integer;
    v_min_priority integer;
    v_max_priority integer;
    v_horizon interval;
    v_active integer;
begin
    if (select r.rolbypassrls or r.rolsuper from pg_catalog.pg_roles r
         where r.rolname = current_user) then
        return new;
    end if;
    v_uid := auth.uid();
    v_enterprise := nullif((auth.jwt() -> 'app_metadata' ->> 'enterprise_id'), '');

    -- The enterprise is the one in the user's JWT (app_metadata, which users cannot edit).
    if new.enterprise_id is null or new.enterprise_id = '' then
        new.enterprise_id := v_enterprise;
    elsif new.enterprise_id is distinct from v_enterprise then
        raise exception 'enterprise_id "%" is not your enterprise', new.enterprise_id
            using errcode = '42501',
                  hint = case when v_enterprise is null
                      then 'Your account has no app_metadata.enterprise_id; leave enterprise_id out.'
                      else 'Leave enterprise_id out: it is filled in from your account.' end;
    end if;

    v_tenant := coalesce(v_enterprise, v_uid::text, 'shared');
    select coalesce(max(l.max_active) filter (where l.tenant = v_tenant),
                    max(l.max_active) filter (where l.tenant = '*'), 20),
           coalesce(max(l.min_priority) filter (where l.tenant = v_tenant),
                    max(l.min_priority) filter (where l.tenant = '*'), 0),
           coalesce(max(l.max_priority) filter (where l.tenant = v_tenant),
                    max(l.max_priority) filter (where l.tenant = '*'), 0),
           coalesce(max(l.run_at_horizon) filter (where l.tenant = v_tenant),
                    max(l.run_at_horizon) filter (where l.tenant = '*'), interval '7 days')
      into v_max_active, v_min_priority, v_max_priority, v_horizon
      from public.agent_tenant_limits l
     where l.tenant in (v_tenant, '*');

    if new.priority is null or new.priority < v_min_priority or new.priority > v_max_priority then
        raise exception 'priority % is not allowed: your tasks may use priority % to %',
            coalesce(new.priority::text, 'null'), v_min_priority, v_max_priority
            using errcode = '22023',
                  hint = 'Leave priority out; the operator sets the band in agent_tenant_limits.';
    end if;

    if new.run_at is null or not isfinite(new.run_at) then
        raise exception 'run_at must be a finite time, got %', coalesce(new.run_at::text, 'null')
            using errcode = '22023';
    end if;
    if new.run_at < now() then
        new.run_at := now();  -- a past time means now: it never jumps ahead of earlier rows
    elsif new.run_at > now() + v_horizon then
        raise exception 'run_at % is too far ahead: tasks may be scheduled at most % ahead',
            new.run_at, v_horizon
            using errcode = '22023';
    end if;

    -- The quota. One user's inserts take turns here, so two at once cannot both
    -- take the last place; rows inserted earlier by the same statement count too.
    perform pg_catalog.pg_advisory_xact_lock(
        pg_catalog.hashtextextended('agent_task_requests quota ' || coalesce(v_uid::text, ''), 0));
    select count(*) into v_active
      from (select 1 from public.agent_task_requests t
             where t.user_id = v_uid and t.status in ('pending', 'processing')
             limit v_max_active) x;
    if v_active >= v_max_active then
        raise exception 'too many active tasks: the limit is % pending or processing tasks per user',
            v_max_active
            using errcode = 'P0001',
                  detail = format('You have %s tasks that are pending or processing.', v_active),
                  hint = 'Wait for a task to finish, or ask the operator to raise max_active.';
    end if;
    return new;
end
$$;

drop trigger if exists agent_task_requests_admit on public.agent_task_requests;
create trigger agent_task_requests_admit
    before insert on public.agent_task_requests
    for each row execute function public.agent_task_requests_admit();

-- The same rule as a policy, so no path around the trigger can create a row for a
-- foreign enterprise. (Restrictive: it narrows agent_task_requests_insert_own.)
drop policy if exists agent_task_requests_insert_enterprise on public.agent_task_requests;
create policy agent_task_requests_insert_enterprise on public.agent_task_requests
    as restrictive
    for insert to authenticated
    with check (enterprise_id is not distinct from
                nullif((select auth.jwt()) -> 'app_metadata' ->> 'enterprise_id', ''));

-- Users cannot choose a row's id (a duplicate would tell them another user's id exists).
revoke insert (id) on table public.agent_task_requests from authenticated;

-- 5. The fair claim -------------------------------------------------------------------

drop function if exists public.agent_tasks_claim(integer, double precision);

-- Claim up to p_limit due pending rows, taking turns across tenants: the tenants
-- least recently served go first, one row each per turn; a tenant's own rows go in
-- priority order (then run_at, created_at), and priority breaks ties between
-- tenants whose turn it equally is. A tenant may have at most its cap of rows
-- processing (agent_tenant_limits.max_processing, else p_tenant_concurrency; 0 = no
-- cap). p_agents: only rows of these agents (null: any). Rows come back in the
-- order they should run. Each claimed row's attempts goes up by one; that number
-- fences every later write.
--
-- Cost: about p_limit index probes (one per tenant whose turn it is), whatever the
-- backlog; more only while many tenants are at their cap or hold only future rows.
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
-- Re-planning these statements on every call (custom plans) costs more than running
-- them; every statement is written to walk indexes whatever its parameters.
set plan_cache_mode = force_generic_plan
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
    -- passed over: nothing pending (deactivate), or only future rows (to the back)
    v_idle text[] := '{}';
    v_later text[] := '{}';
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
        for r in
            select c.tenant, c.served, room.n as allowance, head.found,
                   case when head.found is null then exists (
                       select 1 from public.agent_task_requests t
                        where t.tenant = c.tenant and t.status = 'pending') end as pending,
                   case when head.found is null then exists (
                       select 1 from public.agent_task_requests t
                        where t.tenant = c.tenant and t.status = 'pending'
                          and t.run_at <= now()) end as due
              from unnest(v_chunk_tenants, v_chunk_served) with ordinality
                   c(tenant, served, ord)
              left join public.agent_tenant_limits l on l.tenant = c.tenant
             cross join lateral (
                 select case when coalesce(l.max_processing, v_default_cap) > 0
                        then coalesce(l.max_processing, v_default_cap) - (
                             select count(*) from (
                                 select 1 from public.agent_task_requests p
                                  where p.tenant = c.tenant and p.status = 'processing'
                                  limit coalesce(l.max_processing, v_default_cap)) x)::integer
                        else v_limit end as n) room
              left join lateral (
                 select true as found
                  where room.n > 0
                    and ((p_agents is null and exists (
                             select 1 from public.agent_task_requests t
                              where t.tenant = c.tenant and t.status = 'pending'
                                and t.run_at <= now()))
                      or exists (
                             select 1 from unnest(p_agents) g(name)
                              where exists (
                                  select 1 from public.agent_task_requests t
                                   where t.tenant = c.tenant and t.agent = g.name
                                     and t.status = 'pending' and t.run_at <= now())))) head
                on true
             order by c.ord
        loop
            v_after_served := r.served;
            v_after_tenant := r.tenant;
            if r.found then
                v_tenants := v_tenants || r.tenant;
                v_served := v_served || r.served;
                v_allow := v_allow || r.allowance;
                exit when cardinality(v_tenants) = v_limit;
            elsif not r.pending then
                v_idle := v_idle || r.tenant;
            elsif not r.due then
                v_later := v_later || r.tenant;
            end if;  -- else at its cap, or due rows only for other agents: keeps its place
        end loop;
        exit when cardinality(v_tenants) = v_limit
               or cardinality(v_chunk_tenants) < v_limit - cardinality(v_tenants) + 4;
    end loop;

    v_round := nextval('public.agent_task_claim_round');
    if cardinality(v_later) > 0 then
        update public.agent_task_tenants tt
           set served = v_round
          from (select s.tenant from public.agent_task_tenants s
                 where s.tenant = any (v_later)
                   for no key update skip locked) s
         where tt.tenant = s.tenant;
    end if;
    if cardinality(v_idle) > 0
       and current_setting('transaction_isolation') = 'read committed' then
        -- Lock first (skipping tenants an insert holds), then look again with a fresh
        -- snapshot: a row committed before the lock is seen; an insert after it waits
        -- for this transaction and then re-activates the tenant.
        select coalesce(array_agg(s.tenant), '{}') into v_idle
          from (select s.tenant from public.agent_task_tenants s
                 where s.tenant = any (v_idle) and s.active
                 order by s.tenant
                   for update skip locked) s;
        update public.agent_task_tenants tt
           set active = false
         where tt.tenant = any (v_idle)
           and not exists (select 1 from public.agent_task_requests t
                            where t.tenant = tt.tenant and t.status = 'pending');
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
          from (select tt.tenant, tt.served,
                       case when coalesce(l.max_processing, v_default_cap) > 0
                       then coalesce(l.max_processing, v_default_cap) - (
                            select count(*) from (
                                select 1 from public.agent_task_requests p
                                 where p.tenant = tt.tenant and p.status = 'processing'
                                 limit coalesce(l.max_processing, v_default_cap)) y)::integer
                       else v_limit end as allowance
                  from public.agent_task_tenants tt
                  left join public.agent_tenant_limits l on l.tenant = tt.tenant
                 where tt.active and tt.served = v_tie_served and tt.tenant > v_after_tenant
                   and exists (select 1 from public.agent_task_requests t
                                where t.tenant = tt.tenant and t.status = 'pending'
                                  and t.run_at <= now()
                                  and (p_agents is null or t.agent = any (p_agents)))) x
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

revoke execute on function public.agent_tasks_claim(integer, double precision, integer, text[])
    from public, anon, authenticated;
grant execute on function public.agent_tasks_claim(integer, double precision, integer, text[])
    to service_role;
