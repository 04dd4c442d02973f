-- agent-bridge: retention (issue 20). Idempotent.
--
-- Before: finished rows were never deleted, so one user could grow the table (and its
-- indexes, backups, the Realtime history) without limit. Now finished rows, `completed`
-- or `failed`, whose finished_at is older than an age are deleted in small batches, with
-- everything tied to them: their agent_task_chunks, and the per-user day counters
-- (agent_bridge.user_day_usage, where installed) of days before yesterday.
--
-- Who runs it: the bridge, on a thread and a connection of its own (AGENT_RETENTION_DAYS,
-- default 30; 0 keeps everything), `agent-bridge prune`, or a pg_cron job calling
-- public.agent_tasks_prune. Pending and processing rows are never deleted, whatever their
-- age.
--
-- Locking: a claim locks pending rows, processing rows and agent_task_tenants rows; a
-- prune locks only finished rows (FOR UPDATE SKIP LOCKED: it never waits for a row
-- another transaction holds, e.g. a requeue or a cancel) and never agent_task_tenants.
-- The two never wait for each other. A batch is one short transaction of at most
-- p_batch rows (10,000 at most), so nothing else that touches a finished row (a requeue,
-- a cancel of a finished row) waits longer than one batch either.

-- 1. The index the prune walks ---------------------------------------------------------

-- The oldest finished rows first, without reading pending, processing or recent rows:
-- each batch is a short range scan from the left of this index, whatever the table's
-- size. Partial, so pending and processing rows are not in it. Its cost: one index entry
-- written when a row finishes (the update to completed/failed already writes new
-- entries in the other indexes, since status is in their predicates: no HOT update is
-- lost), removed when the row is pruned. It serves the requeue's failed_since filter
-- too. On a large existing table, building it holds off writes while it builds: create
-- it first with `create index concurrently` under the same name, and this skips it.
create index if not exists agent_task_requests_finished_idx
    on public.agent_task_requests (finished_at)
    where status in ('completed', 'failed');

-- 2. Arguments -----------------------------------------------------------------------------

-- A negative age or a batch out of bounds is refused; a null one means "nothing to do", as
-- null arguments do for the other state functions.
create or replace function agent_bridge.check_prune(p_older_than interval, p_batch integer)
returns void
language plpgsql
immutable
security invoker
set search_path = ''
as $$
begin
    if p_older_than < interval '0' then
        raise exception 'p_older_than must be an age of 0 or more (e.g. ''30 days''), got %',
            p_older_than
            using errcode = '22023';
    end if;
    -- A batch is one transaction: bounded, so it stays short.
    if p_batch < 1 or p_batch > 10000 then
        raise exception 'p_batch must be between 1 and 10000, got %', p_batch
            using errcode = '22023';
    end if;
end
$$;

-- 3. Finished rows ---------------------------------------------------------------------------

-- One batch: at most p_batch finished rows whose finished_at is older than p_older_than,
-- the oldest first, with their chunks. Returns how many rows it deleted; fewer than
-- p_batch means none are left (but rows other transactions held at the time).
create or replace function agent_bridge.prune_finished(
    p_older_than interval, p_batch integer default 500)
returns integer
language plpgsql
volatile
security invoker
set search_path = ''
as $$
declare
    v_ids uuid[];
    v_deleted integer;
begin
    perform agent_bridge.check_prune(p_older_than, p_batch);
    if p_older_than is null or p_batch is null then
        return 0;
    end if;
    -- Locked here, skipping rows another transaction holds; a row requeued meanwhile
    -- (no longer finished) is re-checked under the lock and left alone.
    select coalesce(array_agg(d.id), '{}') into v_ids
      from (select t.id from public.agent_task_requests t
             where t.status in ('completed', 'failed')
               and t.finished_at < now() - p_older_than
             order by t.finished_at
             limit p_batch
               for update skip locked) d;
    if cardinality(v_ids) = 0 then
        return 0;
    end if;
    -- Chunks live only while their attempt runs, so a finished row normally has none;
    -- any left by a hand edit go with their row (the delete trigger of
    -- 20261130001000_stream.sql covers processing rows only).
    delete from public.agent_task_chunks k where k.task_id = any (v_ids);
    delete from public.agent_task_requests t where t.id = any (v_ids);
    get diagnostics v_deleted = row_count;
    return v_deleted;
end
$$;

-- How many finished rows prune_finished would delete now (all batches together).
create or replace function agent_bridge.count_prunable(p_older_than interval)
returns bigint
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
    perform agent_bridge.check_prune(p_older_than, 1);
    -- (null: no row is older than an unknown age)
    return (select count(*) from public.agent_task_requests t
             where t.status in ('completed', 'failed')
               and t.finished_at < now() - p_older_than);
end
$$;

-- 4. Per-user day counters ----------------------------------------------------------------

-- At most p_batch rows of agent_bridge.user_day_usage for days before yesterday (UTC);
-- 0 where that table is not installed. p_dry_run: how many there are, deleting none.
-- Definer: the counters are the database's own bookkeeping; a prune must not depend on
-- the caller's grants on them (nor fail where that table is private).
create or replace function agent_bridge.prune_day_usage(
    p_batch integer default 500, p_dry_run boolean default false)
returns integer
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
    v_before date := (now() at time zone 'utc')::date - 1;
    v_deleted integer;
begin
    perform agent_bridge.check_prune(interval '0', p_batch);
    if to_regclass('agent_bridge.user_day_usage') is null then
        return 0;
    end if;
    if coalesce(p_dry_run, false) then
        return (select count(*) from agent_bridge.user_day_usage u where u.day < v_before);
    end if;
    if p_batch is null then
        return 0;
    end if;
    -- Only old days: today's counters (which inserts update, under lock) are not read.
    delete from agent_bridge.user_day_usage u
     where u.ctid = any (array(select x.ctid from agent_bridge.user_day_usage x
                                where x.day < v_before
                                limit p_batch
                                  for update skip locked));
    get diagnostics v_deleted = row_count;
    return v_deleted;
end
$$;

-- 5. The call the bridge, `agent-bridge prune` and pg_cron make --------------------------------

-- One batch of each (at most p_batch finished rows with their chunks, and at most p_batch
-- old day counters), in the caller's transaction; call it again while either count
-- equals p_batch. p_dry_run: how many there are in all, deleting nothing. A null
-- p_older_than does nothing.
create or replace function public.agent_tasks_prune(
    p_older_than interval, p_batch integer default 500, p_dry_run boolean default false)
returns table (tasks bigint, day_usage bigint)
language plpgsql
volatile
security invoker
set search_path = ''
as $$
begin
    perform agent_bridge.check_prune(p_older_than, p_batch);
    if p_older_than is null then
        return query select 0::bigint, 0::bigint;
    elsif coalesce(p_dry_run, false) then
        return query select agent_bridge.count_prunable(p_older_than),
                            agent_bridge.prune_day_usage(p_batch, true)::bigint;
    else
        return query select agent_bridge.prune_finished(p_older_than, p_batch)::bigint,
                            agent_bridge.prune_day_usage(p_batch, false)::bigint;
    end if;
end
$$;

do $$
declare
    fn text;
begin
    foreach fn in array array[
        'agent_bridge.check_prune(interval, integer)',
        'agent_bridge.prune_finished(interval, integer)',
        'agent_bridge.count_prunable(interval)',
        'agent_bridge.prune_day_usage(integer, boolean)',
        'public.agent_tasks_prune(interval, integer, boolean)'
    ] loop
        execute format('revoke execute on function %s from public, anon, authenticated', fn);
        execute format('grant execute on function %s to service_role', fn);
    end loop;
end
$$;

-- PostgREST caches the functions it can call (see 20261130000900_reload_schema.sql).
notify pgrst, 'reload schema';
