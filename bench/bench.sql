-- SQL of the benchmarks only (not part of agent-bridge), in named blocks: bench/sql.py.

-- done_trigger --
-- NOTIFY bench_done when a row of {table} ends in one of {statuses}, so a waiting benchmark wakes at once (a .format template).
create or replace function public.bench_notify_done() returns trigger
language plpgsql as $$
begin
    perform pg_notify('bench_done', new.id::text);
    return null;
end
$$;
drop trigger if exists bench_notify_done on public.{table};
create trigger bench_notify_done after update of status on public.{table}
    for each row when (new.status in ({statuses}))
    execute function public.bench_notify_done();

-- first_write_triggers --
-- NOTIFY bench_first when a task's first partial answer commits (a chunk at seq 0, or the row's first response_payload while it runs).
create or replace function public.bench_first_chunk() returns trigger
language plpgsql as $$
begin
    if new.seq = 0 then
        perform pg_notify('bench_first', new.task_id::text);
    end if;
    return null;
end
$$;
drop trigger if exists bench_first_chunk on public.agent_task_chunks;
create trigger bench_first_chunk after insert on public.agent_task_chunks
    for each row execute function public.bench_first_chunk();
create or replace function public.bench_first_payload() returns trigger
language plpgsql as $$
begin
    perform pg_notify('bench_first', new.id::text);
    return null;
end
$$;
drop trigger if exists bench_first_payload on public.agent_task_requests;
create trigger bench_first_payload after update of response_payload on public.agent_task_requests
    for each row when (new.status = 'processing' and old.response_payload is null
                       and new.response_payload is not null)
    execute function public.bench_first_payload();
alter table public.agent_task_requests set (autovacuum_enabled = false);
alter table public.agent_task_chunks set (autovacuum_enabled = false);

-- old_check_request --
-- Schema version 3's payload type and size check (20261124000000), for comparison.
create or replace function public.agent_task_requests_check_request()
returns trigger language plpgsql set search_path = '' as $$
declare
    max_bytes bigint := coalesce(
        nullif(current_setting('agent_bridge.max_request_bytes', true), '')::bigint, 1048576);
    size_bytes bigint;
begin
    if new.request_payload is null or jsonb_typeof(new.request_payload) <> 'object' then
        raise exception 'request_payload must be a JSON object such as {"prompt": "..."}, got %',
            coalesce(jsonb_typeof(new.request_payload), 'null') using errcode = '22023';
    end if;
    size_bytes := octet_length(new.request_payload::text);
    if size_bytes > max_bytes then
        raise exception 'request_payload is % bytes; the limit is % bytes', size_bytes, max_bytes
            using errcode = '22001';
    end if;
    return new;
end $$;

-- old_check_shape --
-- Schema version 3's run_at and depth check, the level-by-level walker (20261130000100), for comparison.
create or replace function public.agent_task_requests_check_shape()
returns trigger language plpgsql set search_path = '' as $$
declare
    max_depth integer := coalesce(
        nullif(current_setting('agent_bridge.max_request_depth', true), '')::integer, 64);
    doc jsonb := new.request_payload;
    level jsonb[];
    depth integer := 0;
begin
    if new.run_at is not null and not isfinite(new.run_at) then
        raise exception 'run_at must be a finite time, got %', new.run_at using errcode = '22023';
    end if;

    level := array[doc];
    while cardinality(level) > 0 loop
        depth := depth + 1;
        if depth > max_depth then
            raise exception
                'request_payload is nested more than % levels deep; the limit is % levels',
                max_depth, max_depth using errcode = '22023';
        end if;
        select coalesce(array_agg(c.value), '{}') into level
          from unnest(level) as v(doc)
         cross join lateral (
                select e.value from jsonb_each(
                    case when jsonb_typeof(v.doc) = 'object' then v.doc end) e
                union all
                select a.value from jsonb_array_elements(
                    case when jsonb_typeof(v.doc) = 'array' then v.doc end) a) c
         where jsonb_typeof(c.value) in ('object', 'array');
    end loop;

    return new;
end $$;

-- old_walker --
-- The same walker as a function: is `doc` nested deeper than `max_depth`?
create or replace function public.bench_old_too_deep(doc jsonb, max_depth integer)
returns boolean language plpgsql set search_path = '' as $$
declare
    level jsonb[];
    depth integer := 0;
begin

    level := array[doc];
    while cardinality(level) > 0 loop
        depth := depth + 1;
        if depth > max_depth then
            return true;
        end if;
        select coalesce(array_agg(c.value), '{}') into level
          from unnest(level) as v(doc)
         cross join lateral (
                select e.value from jsonb_each(
                    case when jsonb_typeof(v.doc) = 'object' then v.doc end) e
                union all
                select a.value from jsonb_array_elements(
                    case when jsonb_typeof(v.doc) = 'array' then v.doc end) a) c
         where jsonb_typeof(c.value) in ('object', 'array');
    end loop;

    return false;
end $$;
