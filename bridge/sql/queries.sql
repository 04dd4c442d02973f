-- Every call the store makes, one named block each: `-- name --`, a line saying
-- what it does, then the statement. Each calls one SQL function from the
-- migration; the Supabase transport calls the same function through rpc() with
-- the same named parameters, so both transports run the same code in Postgres.

-- claim --
-- Claim up to p_limit due pending rows, taking turns across tenants; each gets attempts + 1 and a lease; a payload of at most p_inline_bytes comes with its row.
select * from public.agent_tasks_claim(p_limit => %(p_limit)s::integer, p_lease_seconds => %(p_lease_seconds)s::double precision, p_tenant_concurrency => %(p_tenant_concurrency)s::integer, p_agents => %(p_agents)s::text[], p_inline_bytes => %(p_inline_bytes)s::integer)

-- start --
-- A worker takes its attempt: fenced; returns the request payload.
select * from public.agent_task_start(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_lease_seconds => %(p_lease_seconds)s::double precision, p_spend => %(p_spend)s::jsonb)

-- bind --
-- A worker takes its attempt when its message carried the payload: start's fence, reading nothing back (no payload sent and parsed again).
select applied, status, attempts, worker, budget from public.agent_task_start(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_lease_seconds => %(p_lease_seconds)s::double precision, p_spend => %(p_spend)s::jsonb)

-- heartbeat --
-- The holder renews its lease while the handler runs.
select * from public.agent_task_heartbeat(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_lease_seconds => %(p_lease_seconds)s::double precision)

-- progress --
-- Partial output into response_payload while the handler streams.
select * from public.agent_task_progress(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_response => %(p_response)s::jsonb)

-- append --
-- A piece of the streamed answer (answer = answer[:p_offset] + p_text), fenced like progress; the row is not written.
select * from public.agent_task_append(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_seq => %(p_seq)s::integer, p_offset => %(p_offset)s::integer, p_text => %(p_text)s::text)

-- complete --
-- The handler's answer: processing -> completed.
select * from public.agent_task_complete(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_response => %(p_response)s::jsonb)

-- fail --
-- Final failure: processing -> failed, with the error.
select * from public.agent_task_fail(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_error => %(p_error)s::jsonb)

-- schedule_retry --
-- A transient error: record it and stretch the lease over the backoff.
select * from public.agent_task_schedule_retry(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_error => %(p_error)s::jsonb, p_delay_seconds => %(p_delay_seconds)s::double precision, p_lease_seconds => %(p_lease_seconds)s::double precision)

-- wait --
-- The handler asks its user (p_waiting: {question}): processing -> pending, waiting for an answer until p_timeout_seconds.
select * from public.agent_task_wait(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_waiting => %(p_waiting)s::jsonb, p_timeout_seconds => %(p_timeout_seconds)s::double precision)

-- answers --
-- The answers so far ([{question, answer, answered_at}]), for the attempt's holder only (no row for anyone else).
select * from public.agent_task_answers(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text)

-- write_batch --
-- A worker process's waiting writes in one call and one transaction: arrays in (one element per write), one row per write out (ord), each fenced by (attempt, worker).
select * from public.agent_tasks_write(p_kinds => %(p_kinds)s::text[], p_ids => %(p_ids)s::uuid[], p_attempts => %(p_attempts)s::integer[], p_workers => %(p_workers)s::text[], p_docs => %(p_docs)s::jsonb[], p_seconds => %(p_seconds)s::double precision[], p_delays => %(p_delays)s::double precision[], p_seqs => %(p_seqs)s::integer[], p_offsets => %(p_offsets)s::integer[], p_texts => %(p_texts)s::text[])

-- release --
-- Enqueueing failed: processing -> pending without waiting for the lease.
select * from public.agent_task_release(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer)

-- rescue --
-- Expired leases -> pending, or failed once attempts are used up.
select * from public.agent_tasks_rescue(p_limit => %(p_limit)s::integer)

-- requeue --
-- Operator retry: failed rows -> pending with fresh attempts, at most p_limit (oldest first).
select * from public.agent_tasks_requeue(p_ids => %(p_ids)s::uuid[], p_failed_since => %(p_failed_since)s::timestamptz, p_error_type => %(p_error_type)s::text, p_more_attempts => %(p_more_attempts)s::integer, p_limit => %(p_limit)s::integer)

-- stats --
-- Counts by status, expired leases and the oldest due row's age.
select * from public.agent_tasks_stats()

-- register_agents --
-- The bridge's AGENTS, replacing those registered before; returns what is registered.
select * from public.agent_bridge_register_agents(p_agents => %(p_agents)s::jsonb)

-- agent_stats --
-- Counts per agent: backlog, processing, failures.
select * from public.agent_tasks_agent_stats()

-- cancel --
-- cancel_agent_task: pending -> failed now; a held row gets a cancel request. The status after.
select public.cancel_agent_task(task_id => %(task_id)s::uuid) as cancel_agent_task

-- request_cancel --
-- Cancel one attempt (Celery revoke); p_holder_gone ends it now. The status after.
select public.agent_task_request_cancel(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_holder_gone => %(p_holder_gone)s::boolean) as agent_task_request_cancel

-- report_usage --
-- What one run of the attempt spent ({input_tokens, output_tokens, cost}), counted once per (attempt, run); gives back the bind's reservation.
select * from public.agent_task_report_usage(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_usage => %(p_usage)s::jsonb, p_run => %(p_run)s::integer)

-- tenants_usage --
-- Every tenant with spend on record or a budget of its own, in its current period: budgets, spend, reservations, what is left.
select * from public.agent_tenants_usage()

-- usage_totals --
-- Every agent's spend since the start: tokens in, out and charged unreported, and cost (the bridge's Prometheus counters).
select * from public.agent_tasks_usage_totals()

-- cancelled --
-- The holder ends a cancelled attempt: processing -> failed (Cancelled), partial answer kept.
select * from public.agent_task_cancelled(p_id => %(p_id)s::uuid, p_attempt => %(p_attempt)s::integer, p_worker => %(p_worker)s::text, p_response => %(p_response)s::jsonb)

-- cancel_requested --
-- Which of the given (id, attempt) pairs have been asked to stop.
select * from public.agent_tasks_cancel_requested(p_ids => %(p_ids)s::uuid[], p_attempts => %(p_attempts)s::integer[])

-- schema_version --
-- The schema version the migration installed.
select public.agent_bridge_schema_version() as agent_bridge_schema_version

-- broadcasting --
-- Whether the database sends Realtime Broadcast (state changes, streamed pieces, the bridge's wake-ups).
select public.agent_bridge_broadcasting() as agent_bridge_broadcasting

-- prune --
-- Retention: at most p_batch finished rows older than p_older_than deleted (chunks too), and old day counters; p_dry_run counts all instead.
select * from public.agent_tasks_prune(p_older_than => %(p_older_than)s::interval, p_batch => %(p_batch)s::integer, p_dry_run => %(p_dry_run)s::boolean)
