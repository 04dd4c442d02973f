/**
 * Type tests, checked by `npm run typecheck` (tsc --noEmit), never run: each
 * `@ts-expect-error` must meet an error, so a type that lets a wrong column or status through
 * fails the check.
 */
import { createClient } from '@supabase/supabase-js'

import {
  answerAgentTask, CHUNK_COLUMNS, createAgentTasks, TASK_COLUMNS, type AgentTask, type AgentTaskAnswer,
  type AgentTaskChunk, type AgentTaskStatus, type AgentTaskStoreStatus, type AgentTaskWaitingFor, type Database,
  type Json,
} from 'agent-bridge-client'
import { AgentTasksProvider, useAgentTask, type UseAgentTaskResult } from 'agent-bridge-client/react'

type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true : false
const expectType = <T extends true>(): T | undefined => undefined

export async function database(): Promise<void> {
  const supabase = createClient<Database>('http://127.0.0.1:54321', 'anon-key')

  // The client's column list selects exactly a task row.
  const { data: task } = await supabase.from('agent_task_requests').select(TASK_COLUMNS).eq('id', 'x').single()
  if (task) {
    const row: AgentTask = task
    const status: AgentTaskStatus = task.status
    const answer: string | undefined = task.response_payload?.answer
    // What the handler asked, and the answers so far.
    const question: Json | undefined = task.waiting_for?.question
    const deadline: string | undefined = task.waiting_for?.expires_at
    const given: Json | undefined = task.answers?.[0]?.answer
    void row
    void status
    void answer
    void question
    void deadline
    void given
  }
  const { data: _waiting } = await supabase.from('agent_task_requests').select('waiting_for,answers').limit(1)
  expectType<Equal<typeof _waiting,
    { waiting_for: AgentTaskWaitingFor | null; answers: AgentTaskAnswer[] | null }[] | null>>()
  // A task waits while `waiting_for` is set (its status is pending).
  await supabase.from('agent_task_requests').select('id').not('waiting_for', 'is', null)
  const { data: chunks } = await supabase.from('agent_task_chunks').select(CHUNK_COLUMNS).eq('task_id', 'x')
  const pieces: AgentTaskChunk[] = chunks ?? []
  void pieces

  // A named subset is typed too.
  const { data: _some } = await supabase.from('agent_task_requests').select('id,status').limit(1)
  expectType<Equal<typeof _some, { id: string; status: AgentTaskStatus }[] | null>>()

  // A column users may not select (the operator's `worker`) is not a column here.
  const { data: worker } = await supabase.from('agent_task_requests').select('worker').single()
  if (worker) {
    // @ts-expect-error -- the result is a SelectQueryError, not a row with `worker`
    const host: string = worker.worker // eslint-disable-line @typescript-eslint/no-unsafe-assignment
    void host
  }

  // @ts-expect-error -- not a status
  await supabase.from('agent_task_requests').select('id').eq('status', 'done')
  await supabase.from('agent_task_requests').select('id').eq('status', 'processing')

  // Users insert a pending request with their granted columns only.
  await supabase.from('agent_task_requests').insert({ request_payload: { prompt: 'hi' }, agent: 'default' })
  // @ts-expect-error -- users insert pending rows only
  await supabase.from('agent_task_requests').insert({ request_payload: { prompt: 'hi' }, status: 'completed' })
  // @ts-expect-error -- not a column users may write
  await supabase.from('agent_task_requests').insert({ request_payload: { prompt: 'hi' }, worker: 'me' })
  // An idempotency key on insert, and a lookup by it.
  await supabase.from('agent_task_requests').insert({ request_payload: { prompt: 'hi' }, idempotency_key: 'k1' })
  // @ts-expect-error -- the key is text
  await supabase.from('agent_task_requests').insert({ request_payload: { prompt: 'hi' }, idempotency_key: 1 })
  const { data: _keyed } = await supabase.from('agent_task_requests').select('id,idempotency_key')
    .eq('agent', 'default').eq('idempotency_key', 'k1')
  expectType<Equal<typeof _keyed, { id: string; idempotency_key: string | null }[] | null>>()
  // @ts-expect-error -- the key is given as input's idempotencyKey, a string
  void createAgentTasks(supabase).submitAgentTask({ prompt: 'hi', idempotencyKey: 7 })
  void createAgentTasks(supabase).submitAgentTask({ prompt: 'hi', idempotencyKey: 'k1' })
  // @ts-expect-error -- the request is required
  await supabase.from('agent_task_requests').insert({ agent: 'default' })
  // @ts-expect-error -- status changes are the database's functions, not an UPDATE
  await supabase.from('agent_task_requests').update({ status: 'failed' }).eq('id', 'x')
  // @ts-expect-error -- no such table
  await supabase.from('agent_tasks').select('id')

  // The functions users call.
  const { data: _after } = await supabase.rpc('cancel_agent_task', { task_id: 'x' })
  expectType<Equal<typeof _after, AgentTaskStatus | null>>()
  // @ts-expect-error -- its argument is task_id
  await supabase.rpc('cancel_agent_task', { id: 'x' })
  const { data: _answered } = await supabase.rpc('answer_agent_task', { task_id: 'x', answer: 'approve' })
  // (null only with an error: a refusal)
  expectType<Equal<typeof _answered, AgentTaskStatus | null>>()
  await supabase.rpc('answer_agent_task', { task_id: 'x', answer: { choice: 'approve', note: ['ok', 1, null] } })
  // @ts-expect-error -- the answer is required
  await supabase.rpc('answer_agent_task', { task_id: 'x' })
  // @ts-expect-error -- an answer is JSON: no functions, no undefined
  await supabase.rpc('answer_agent_task', { task_id: 'x', answer: () => 'approve' })
  const _status: Promise<AgentTaskStatus> = answerAgentTask(supabase, 'x', 'approve')
  const _bound: Promise<AgentTaskStatus> = createAgentTasks(supabase).answerAgentTask('x', ['a', { b: 1 }])
  // @ts-expect-error -- an answer is JSON
  void createAgentTasks(supabase).answerAgentTask('x', new Map())

  // The typed client works wherever a client goes.
  const tasks = createAgentTasks(supabase)
  void tasks
  void AgentTasksProvider({ client: supabase })
}

export function hook(): void {
  const result: UseAgentTaskResult = useAgentTask({ taskId: 'x' })
  expectType<Equal<typeof result.status, AgentTaskStoreStatus>>()
  expectType<Equal<AgentTaskStoreStatus,
    'idle' | 'submitting' | 'attaching' | 'pending' | 'processing' | 'waiting' | 'completed' | 'failed'>>()
  // What the task asked, while it waits, and how to answer it.
  expectType<Equal<typeof result.waitingFor, AgentTaskWaitingFor | null>>()
  expectType<Equal<typeof result.isWaiting, boolean>>()
  expectType<Equal<typeof result.answer, (answer: Json) => Promise<AgentTaskStatus | null>>>()
  if (result.waitingFor) void result.answer({ choice: 'approve', question: result.waitingFor.number })
  // @ts-expect-error -- not a status
  const wrong: AgentTaskStoreStatus = 'running'
  void wrong
  if (result.status === 'completed') void result.currentTask
}
