-- Row operations, in the format of queries.sql: `-- name --`, a line saying what it
-- does, then the statement. The direct transport runs them as written; the Supabase
-- transport runs the same operation through the table API (bridge/store/supabase.py),
-- the way the frontend does, since PostgREST runs no ad-hoc SQL.

-- insert_task --
-- Insert a request exactly as the frontend does: pending, {prompt, context}, priority, agent.
insert into public.agent_task_requests (status, request_payload, priority, agent) values ('pending', %(request_payload)s::jsonb, %(priority)s::integer, %(agent)s::text) returning id

-- get_task --
-- One row's state and outcome, for `submit --wait` and `dev --demo`.
select id, status, attempts, response_payload, error from public.agent_task_requests where id = %(id)s::uuid

-- installed --
-- Whether the table exists, and which of the given public functions do not (direct mode only).
select to_regclass('public.agent_task_requests') is not null as has_table, array(select f from unnest(%(functions)s::text[]) f where not exists (select 1 from pg_catalog.pg_proc p join pg_catalog.pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public' and p.proname = f) order by f) as missing_functions

-- show_task --
-- One row in full but its request, for `agent-bridge show`: state, attempts, error, answer, timings, a question it waits on.
select id, status, agent, priority, attempts, max_attempts, created_at, run_at, started_at, finished_at, updated_at, lease_expires_at, worker, cancel_requested_at, error, response_payload, waiting_for, jsonb_array_length(answers) as answered from public.agent_task_requests where id = %(id)s::uuid

-- latest_failures --
-- The most recently failed rows with their errors, newest first, for `agent-bridge status`.
select id, agent, attempts, finished_at, error from public.agent_task_requests where status = 'failed' order by finished_at desc nulls last, id limit %(limit)s::integer

-- find_ids --
-- Up to `limit` ids from `low` to `high` (a short id's range: its prefix padded with 0s and with fs), for the CLI.
select id from public.agent_task_requests where id >= %(low)s::uuid and id <= %(high)s::uuid order by id limit %(limit)s::integer

-- get_chunks --
-- The chunks of one attempt's streamed answer after seq `after`, in order (at most `limit`), for `--follow`.
select seq, answer_offset, text from public.agent_task_chunks where task_id = %(id)s::uuid and attempt = %(attempt)s::integer and seq > %(after)s::integer order by seq limit %(limit)s::integer

-- insert_keyed_task --
-- Insert a request as insert_task does, with an idempotency key: a key in use (this agent, the service's rows or the user's) is refused with 23505.
insert into public.agent_task_requests (status, request_payload, priority, agent, idempotency_key) values ('pending', %(request_payload)s::jsonb, %(priority)s::integer, %(agent)s::text, %(idempotency_key)s::text) returning id

-- keyed_task --
-- The row of the service's own (no user_id) that has this agent and idempotency key, for `submit --idempotency-key`.
select id from public.agent_task_requests where user_id is null and agent = %(agent)s::text and idempotency_key = %(idempotency_key)s::text
