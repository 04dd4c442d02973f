-- Scheduled agents with Supabase Cron (pg_cron): paste into the SQL editor of your project.
-- Each cron.schedule(job_name, schedule, command) call saves a job; the command between the
-- $$ is what pg_cron runs at each tick, as the role that scheduled it (postgres in the SQL
-- editor), in this database. Schedules are in UTC (pg_cron's cron.timezone, GMT by default).
-- Scheduling a name again replaces that job. The commands are plain INSERTs into
-- agent_task_requests: the bridge claims the rows like any other. See
-- docs/how-to/scheduled-agents.md; tests/sql/test_scheduled_agents.py runs each command
-- below, as this file holds it, against a migrated database.
--
-- Needs: the pg_cron extension (Dashboard > Integrations > Cron), and an agent named
-- `report` in the bridge's AGENTS (or change 'report' below to an agent you run; an
-- unknown agent fails the run, shown in cron.job_run_details).

-- 1. One task on a schedule: a briefing for the tenant `acme`, weekdays at 06:00 UTC.
--    Every run inserts one pending row.
select cron.schedule('acme-morning-briefing', '0 6 * * 1-5', $$
    insert into public.agent_task_requests (status, agent, enterprise_id, request_payload)
    values ('pending', 'report', 'acme', jsonb_build_object(
        'prompt', 'Write the morning briefing for the team.',
        'context', jsonb_build_object(
            'job', 'acme-morning-briefing',
            'date', to_char(now() at time zone 'utc', 'YYYY-MM-DD'))))
$$);

-- 2. A daily report per tenant, at 07:00 UTC: one pending row for each tenant (enterprise,
--    else user) that inserted tasks yesterday (UTC), with yesterday's range and counts in
--    its context. Idempotent per (tenant, day): a second run for the same day, by hand or
--    after a failure, inserts only the reports still missing. Rows without a tenant
--    ('shared') and earlier reports are left out.
select cron.schedule('daily-report', '0 7 * * *', $$
    with report_day as (
        select d as day, d::timestamp at time zone 'utc' as day_start,
               (d + 1)::timestamp at time zone 'utc' as day_end
          from (select (now() at time zone 'utc')::date - 1) as yesterday (d)
    ), activity as (
        select t.tenant, min(nullif(t.enterprise_id, '')) as enterprise_id,
               count(*) as tasks,
               count(*) filter (where t.status = 'completed') as completed,
               count(*) filter (where t.status = 'failed') as failed
          from public.agent_task_requests t, report_day r
         where t.created_at >= r.day_start and t.created_at < r.day_end
           and t.tenant <> 'shared'
           and t.request_payload #>> '{context,job}' is distinct from 'daily-report'
         group by t.tenant
    )
    insert into public.agent_task_requests (status, agent, enterprise_id, user_id,
                                            request_payload)
    select 'pending', 'report', a.enterprise_id,
           case when a.enterprise_id is null then a.tenant::uuid end,
           jsonb_build_object(
               'prompt', format('Write the daily activity report for %s, %s (UTC).',
                                a.tenant, to_char(r.day, 'YYYY-MM-DD')),
               'context', jsonb_build_object(
                   'job', 'daily-report',
                   'tenant', a.tenant,
                   'date', to_char(r.day, 'YYYY-MM-DD'),
                   'from', to_char(r.day, 'YYYY-MM-DD') || 'T00:00:00Z',
                   'to', to_char(r.day + 1, 'YYYY-MM-DD') || 'T00:00:00Z',
                   'tasks', a.tasks, 'completed', a.completed, 'failed', a.failed))
      from activity a, report_day r
     where not exists (
               select 1 from public.agent_task_requests x
                where x.tenant = a.tenant
                  and x.request_payload #>> '{context,job}' = 'daily-report'
                  and x.request_payload #>> '{context,date}' = to_char(r.day, 'YYYY-MM-DD'))
$$);

-- Stop a job:           select cron.unschedule('daily-report');
-- See the jobs:         select jobid, jobname, schedule, active from cron.job;
-- See the last runs:    select jobid, status, return_message, start_time
--                         from cron.job_run_details order by start_time desc limit 20;
