/**
 * Human in the loop through the client: a task whose handler asks its user (the test
 * handler's "ask:" prompts, tests/frontend_handler.py) waits, `pending` with `waiting_for`;
 * the client shows the question, answers it with answer_agent_task, and the task goes on to
 * an answer that includes the user's. Refusals keep the database's words. Same stand-ins,
 * bridge and worker as client.test.ts.
 */
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, afterEach, test } from 'node:test'

import {
  AgentTaskStore, createAgentTasks, RequestRefusedError, TASK_COLUMNS, TaskCancelledError, TaskFailedError,
  type AgentTask, type AgentTasks, type AgentTaskState, type AgentTaskStoreStatus, type Json,
} from 'agent-bridge-client'

import { assertFollowed, closeAll, HAS_CANCEL, newUser, newWatcher, realtime, until } from './helpers.js'

after(closeAll)
afterEach(async () => { await realtime('reset') })

const QUESTION = { text: 'Send the email?', choices: ['approve', 'deny'] }

const waiting = (t: AgentTask): boolean => t.waiting_for != null

/** Submit a task that asks; resolves once the client shows its question. */
async function submitAsking(tasks: AgentTasks, context: { [key: string]: Json } = {}
): Promise<{ id: string; seen: AgentTask[]; finished: Promise<AgentTask>; question: AgentTask }> {
  const seen: AgentTask[] = []
  const finished = tasks.submitAgentTask({ prompt: 'ask: send the report to the team', context }, (t) => seen.push(t))
  finished.catch(() => undefined) // a test that expects a failure awaits it itself
  await until('the question', () => seen.some(waiting))
  const question = seen.find(waiting)
  assert.ok(question)
  return { id: question.id, seen, finished, question }
}

/** A refusal of answer_agent_task: a 400 with the database's code and message. */
function refusal(code: string, message: RegExp | string): (err: unknown) => boolean {
  return (err) => {
    assert.ok(err instanceof RequestRefusedError, String(err))
    assert.equal(err.status, 400)
    assert.equal(err.code, code)
    if (typeof message === 'string') assert.equal(err.message, message)
    else assert.match(err.message, message)
    return true
  }
}

/** The row as its owner reads it now. */
async function readRow(tasks: AgentTasks, id: string): Promise<AgentTask> {
  const { data, error } = await tasks.supabase.from('agent_task_requests').select(TASK_COLUMNS).eq('id', id).single()
  assert.equal(error, null)
  const row: unknown = data
  return row as AgentTask
}

test('a task asks, the client shows the question, the answer lets it finish', async () => {
  const { tasks, journal } = newWatcher()
  const { id, seen, finished, question } = await submitAsking(tasks)
  // Waiting is `pending` with the question; no worker holds it.
  assert.equal(question.status, 'pending')
  assert.deepEqual(question.waiting_for?.question, QUESTION)
  assert.equal(question.waiting_for?.number, 1)
  const { asked_at: asked = '', expires_at: expires = '' } = question.waiting_for ?? {}
  assert.ok(Date.parse(expires) - Date.parse(asked) > 23 * 3600_000, `${asked} .. ${expires}`)

  assert.equal(await tasks.answerAgentTask(id, 'approve'), 'pending')
  const done = await finished
  assert.equal(done.status, 'completed')
  assert.equal(done.response_payload?.answer, 'You said approve')
  assert.equal(done.waiting_for, null)
  assert.deepEqual(done.answers?.map((a) => [a.question, a.answer]), [[QUESTION, 'approve']])
  // Once answered, the question is not shown again, and the row runs on.
  const after = seen.slice(seen.lastIndexOf(question) + 1)
  assert.ok(after.length > 0 && !after.some(waiting))
  for (let i = 1; i < seen.length; i++) assert.ok((seen[i]?.updated_at ?? '') >= (seen[i - 1]?.updated_at ?? ''))
  assertFollowed(journal, id)
})

test('answering twice is refused the second time, saying why', async () => {
  const { tasks } = newWatcher()
  const { id, finished } = await submitAsking(tasks)
  assert.equal(await tasks.answerAgentTask(id, 'approve'), 'pending')
  // Whatever the row is doing by now: queued again with its answer, running, or finished.
  await assert.rejects(tasks.answerAgentTask(id, 'deny'), refusal('P0001', new RegExp(
    `^agent task ${id} is not waiting for an answer: (it has its answer and is queued to go on|it is running|` +
    'it has finished \\(completed\\))$')))
  const done = await finished
  assert.equal(done.response_payload?.answer, 'You said approve')
  await assert.rejects(tasks.answerAgentTask(id, 'deny'), refusal('P0001',
    `agent task ${id} is not waiting for an answer: it has finished (completed)`))
})

test('two answers at once: one is taken, the other refused', async () => {
  const { tasks } = newWatcher()
  const { id, finished } = await submitAsking(tasks)
  const results = await Promise.allSettled([tasks.answerAgentTask(id, 'approve'), tasks.answerAgentTask(id, 'deny')])
  const refused = results.filter((r) => r.status === 'rejected')
  assert.equal(refused.length, 1, JSON.stringify(results))
  assert.ok(refusal('P0001', new RegExp(`^agent task ${id} is not waiting for an answer: `))(refused[0]?.reason))
  const done = await finished
  assert.equal(done.response_payload?.answer, `You said ${results[0]?.status === 'fulfilled' ? 'approve' : 'deny'}`)
})

test('a task that asks twice replays to its second question, then goes on', async () => {
  const { tasks } = newWatcher()
  const { id, seen, finished } = await submitAsking(tasks, { asks: 2 })
  assert.equal(await tasks.answerAgentTask(id, 'approve'), 'pending')
  await until('the second question', () => seen.some((t) => t.waiting_for?.number === 2))
  const second = seen.find((t) => t.waiting_for?.number === 2)
  assert.deepEqual(second?.waiting_for?.question, { ...QUESTION, text: 'Question 2?' })
  assert.deepEqual(second?.answers?.map((a) => [a.question, a.answer]), [[QUESTION, 'approve']])
  assert.equal(await tasks.answerAgentTask(id, 'deny'), 'pending')
  const done = await finished
  assert.equal(done.response_payload?.answer, 'You said approve, deny')
  assert.deepEqual(done.answers?.map((a) => a.answer), ['approve', 'deny'])
})

test("another user's task is refused as if it did not exist; bad answers are refused", async () => {
  const owner = newWatcher()
  const { id, finished } = await submitAsking(owner.tasks)
  const stranger = createAgentTasks(newUser().supabase)
  await assert.rejects(stranger.answerAgentTask(id, 'approve'), refusal('P0001', `no agent task ${id} of yours`))
  const missing = randomUUID()
  await assert.rejects(stranger.answerAgentTask(missing, 'approve'), refusal('P0001', `no agent task ${missing} of yours`))
  // Too large, or a SQL null (JSON null): refused before anything changes.
  await assert.rejects(owner.tasks.answerAgentTask(id, 'x'.repeat(70_000)),
    refusal('22023', /^the answer is \d+ bytes; at most 65536 bytes may be sent$/))
  await assert.rejects(owner.tasks.answerAgentTask(id, null), refusal('22023', /^answer must be a JSON value/))
  // The task still waits for its owner's answer, and takes it.
  const row = await readRow(owner.tasks, id)
  assert.equal(row.status, 'pending')
  assert.equal(row.waiting_for?.number, 1)
  assert.equal(row.answers, null)
  assert.equal(await owner.tasks.answerAgentTask(id, { choice: 'deny', why: 'not yet' }), 'pending')
  const done = await finished
  // (the handler formats the dict Python got; jsonb orders its keys)
  assert.match(done.response_payload?.answer ?? '', /^You said \{.*'choice': 'deny'.*\}$/)
})

test('cancelled while waiting: failed at once, and no answer is taken after', { skip: !HAS_CANCEL }, async () => {
  const { tasks } = newWatcher()
  const { id, finished } = await submitAsking(tasks)
  assert.equal(await tasks.cancelAgentTask(id), 'failed')
  await assert.rejects(finished, (err) => {
    assert.ok(err instanceof TaskCancelledError)
    assert.equal(err.task.error?.message, 'Cancelled on request while waiting for an answer.')
    assert.equal(err.task.waiting_for, null)
    return true
  })
  await assert.rejects(tasks.answerAgentTask(id, 'approve'), refusal('P0001',
    `agent task ${id} is not waiting for an answer: it has finished (failed)`))
})

test('unanswered by its deadline: failed NoAnswer', async () => {
  const { tasks } = newWatcher()
  const { id, finished } = await submitAsking(tasks, { ask_timeout: 1 })
  await assert.rejects(finished, (err) => {
    assert.ok(err instanceof TaskFailedError && !err.cancelled, String(err))
    assert.equal(err.type, 'NoAnswer')
    assert.equal(err.task.waiting_for, null)
    return true
  })
  await assert.rejects(tasks.answerAgentTask(id, 'approve'), refusal('P0001',
    `agent task ${id} is not waiting for an answer: it has finished (failed)`))
})

/** Every state the store shows, from now on. */
function record(store: AgentTaskStore): AgentTaskState[] {
  const seen: AgentTaskState[] = [store.getSnapshot()]
  store.subscribe(() => seen.push(store.getSnapshot()))
  return seen
}

test("the hook's state: `waiting` with the question, then answer() and completed", async () => {
  const store = new AgentTaskStore(createAgentTasks(newUser().supabase))
  const seen = record(store)
  const outcome = store.submit({ prompt: 'ask: may I?' })
  await until('the question', () => store.getSnapshot().status === 'waiting')
  const asked = store.getSnapshot()
  assert.deepEqual(asked.waitingFor?.question, QUESTION)
  assert.equal(asked.currentTask?.status, 'pending')
  assert.equal(asked.isWaiting, true)
  assert.equal(asked.isProcessing, false, 'no spinner while the user is asked')
  assert.equal(await store.answer('approve'), 'pending')
  const done = await outcome
  assert.equal(done?.response_payload?.answer, 'You said approve')
  const end = store.getSnapshot()
  assert.equal(end.status, 'completed')
  assert.equal(end.waitingFor, null)
  // The flags and the question are the status, always.
  for (const s of seen) {
    assert.equal(s.isWaiting, s.status === 'waiting', s.status)
    assert.equal(s.waitingFor !== null, s.status === 'waiting', s.status)
    assert.equal(s.isProcessing, ['attaching', 'pending', 'processing'].includes(s.status), s.status)
  }
  const statuses = seen.map((s) => s.status).filter((s, i, all) => i === 0 || s !== all[i - 1])
  const waited = statuses.indexOf('waiting')
  assert.ok(waited > 0 && statuses.at(-1) === 'completed', statuses.join(' '))
  const order: AgentTaskStoreStatus[] = ['idle', 'submitting', 'pending', 'processing']
  assert.deepEqual(statuses.slice(0, waited), order.filter((s) => statuses.slice(0, waited).includes(s)))
  // No task followed: nothing to answer.
  store.reset()
  assert.equal(await store.answer('approve'), null)
})
