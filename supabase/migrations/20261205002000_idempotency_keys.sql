-- Idempotency keys (issue 26): a browser that retries a submit after a timeout, or a
-- webhook delivered twice, must not start a second (paid) task.
--
-- `idempotency_key` (text, optional, 1 to 200 characters) is unique per user and agent
-- while the row exists. Rows without user_id (the service's own inserts: the CLI, a
-- backend with the service key) share one key space per agent; a service inserting on a
-- user's behalf sets user_id and so shares that user's. A second insert with a key in use
-- creates no row: it is refused with 23505 (409 through PostgREST), and the message names
-- the task that has the key (the inserting user's own row, which they may read).
--
-- The check is a BEFORE INSERT trigger that fires before admit (triggers of a kind fire in
-- name order): a refused retry counts against no quota or day budget, and a user at their
-- active-task limit retrying a submit is told about the task they have, not about the
-- limit. Under a lock on (user, agent, key), so of concurrent inserts with one key the
-- first commits and the others see it; the unique index backs it up (e.g. in a repeatable
-- read transaction, whose snapshot cannot see the first).

alter table public.agent_task_requests
    -- The submitter's key for this request: unique per (user_id, agent) while the row exists.
    add column idempotency_key text
        constraint agent_task_requests_idempotency_key_check
        check (char_length(idempotency_key) between 1 and 200);

create unique index agent_task_requests_idempotency_key_idx
    on public.agent_task_requests (user_id, agent, idempotency_key) nulls not distinct
    where idempotency_key is not null;

create function public.agent_task_requests_idempotency()
returns trigger
language plpgsql
security invoker
set search_path = ''
as $$
declare
    v_length integer := char_length(new.idempotency_key);
    v_task record;
begin
    if v_length < 1 or v_length > 200 then
        raise exception 'idempotency_key must be 1 to 200 characters long, got %', v_length
            using errcode = '22023',
                  hint = 'Use one short string per request, such as a UUID.';
    end if;
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        'agent_task_requests idempotency ' || coalesce(new.user_id::text, '-') || ' '
        || new.agent || ' ' || new.idempotency_key, 0));
    -- Runs as the inserting user: a user sees their own rows (RLS), the ones that matter.
    if new.user_id is null then
        select t.id, t.status, t.created_at into v_task
          from public.agent_task_requests t
         where t.user_id is null and t.agent = new.agent
           and t.idempotency_key = new.idempotency_key;
    else
        select t.id, t.status, t.created_at into v_task
          from public.agent_task_requests t
         where t.user_id = new.user_id and t.agent = new.agent
           and t.idempotency_key = new.idempotency_key;
    end if;
    if found then
        raise exception 'idempotency_key "%" is already used by task % (agent "%")',
            new.idempotency_key, v_task.id, new.agent
            using errcode = '23505',
                  detail = format('Task %s has this key: %s, created %s.',
                                  v_task.id, v_task.status, v_task.created_at),
                  hint = 'Follow that task instead of submitting again: select it by id, '
                         'or by agent and idempotency_key.';
    end if;
    return new;
end
$$;

-- "0_": before agent_task_requests_admit.
create trigger agent_task_requests_0_idempotency
    before insert on public.agent_task_requests
    for each row when (new.idempotency_key is not null)
    execute function public.agent_task_requests_idempotency();

revoke execute on function public.agent_task_requests_idempotency()
    from public, anon, authenticated;

-- Users may choose the key on insert and read it back.
grant select (idempotency_key) on table public.agent_task_requests to authenticated;
grant insert (idempotency_key) on table public.agent_task_requests to authenticated;

notify pgrst, 'reload schema';
