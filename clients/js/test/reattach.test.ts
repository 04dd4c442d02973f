/**
 * The state useAgentTask renders (AgentTaskStore): one `status`, and re-attaching to a running
 * task by id, as a reloaded page does. Same stand-ins and worker as client.test.ts.
 */
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, afterEach, test } from 'node:test'

import {
  AgentTaskStore, createAgentTasks, RequestRefusedError, TaskFailedError, TaskNotFoundError,
  TaskTimeoutError, type AgentTaskState, type AgentTaskStoreStatus,
} from 'agent-bridge-client'

import { closeAll, holdName, newUser, realtime, release, until } from './helpers.js'

after(closeAll)
afterEach(async () => { await realtime('reset') })

/** Every state the store shows, from now on. */
function record(store: AgentTaskStore): AgentTaskState[] {
  const seen: AgentTaskState[] = [store.getSnapshot()]
  store.subscribe(() => seen.push(store.getSnapshot()))
  return seen
}

const statuses = (seen: AgentTaskState[]): AgentTaskStoreStatus[] =>
  seen.map((s) => s.status).filter((s, i, all) => i === 0 || s !== all[i - 1])

const partial = (s: AgentTaskState): boolean => s.currentTask?.response_payload?.partial === true

/** The flags are the status, always. */
function assertDerived(seen: AgentTaskState[]): void {
  for (const s of seen) {
    assert.equal(s.isSubmitting, s.status === 'submitting', s.status)
    assert.equal(s.isProcessing, ['attaching', 'pending', 'processing'].includes(s.status), s.status)
    assert.equal(s.error !== null, s.status === 'failed', s.status)
  }
}

test('re-attach by id mid-stream: a new store on a new client shows the task and its final answer', async () => {
  const user = newUser()
  const hold = holdName()
  const first = new AgentTaskStore(createAgentTasks(user.supabase))
  const before = record(first)
  const submitted = first.submit({ prompt: 'one two three four', context: { chunks: 4, hold } })
  await until('the first partial answer', () => before.some(partial))
  const id = first.getSnapshot().taskId
  assert.ok(id)
  // The page goes away: the first store stops following (the task goes on).
  first.stop()
  assert.equal(await submitted, null)
  const shownBefore = before.length

  // The reloaded page: another client of the same user, knowing only the id.
  // Created with the id (as useAgentTask({ taskId }) does), it shows `attaching` from the start.
  const later = new AgentTaskStore(createAgentTasks(newUser(user.id).supabase), {}, id)
  const seen = record(later)
  assert.equal(later.getSnapshot().isProcessing, true)
  const attached = later.attach(id)
  assert.equal(later.attach(id), attached, 'attaching to the task followed changes nothing')
  assert.equal(seen.at(-1)?.status, 'attaching')
  assert.equal(seen.at(-1)?.taskId, id)
  await until('the answer so far', () => seen.some(partial))
  assert.equal(seen.find(partial)?.currentTask?.response_payload?.answer, 'one')
  release(hold)
  const done = await attached
  assert.equal(done?.status, 'completed')
  assert.equal(done?.response_payload?.answer, 'one two three four (done)')
  const end = later.getSnapshot()
  assert.equal(end.status, 'completed')
  assert.deepEqual(end.currentTask, done)
  assert.deepEqual(statuses(seen), ['attaching', 'processing', 'completed'])
  assertDerived(seen)
  // In order: every state shown is at least as new as the one before it.
  const rows = seen.map((s) => s.currentTask).filter((t) => t !== null)
  for (let i = 1; i < rows.length; i++) assert.ok((rows[i]?.updated_at ?? '') >= (rows[i - 1]?.updated_at ?? ''))
  // Once finished, attaching again is the same outcome, not a second watch.
  assert.equal(later.attach(id), attached)
  // The store that stopped showed nothing more.
  assert.equal(before.length, shownBefore)
})

test('status: idle, submitting, pending, processing, completed; reset is idle again', async () => {
  const store = new AgentTaskStore(createAgentTasks(newUser().supabase))
  const completed: string[] = []
  store.options = { onComplete: (t) => completed.push(t.id) }
  const seen = record(store)
  const done = await store.submit({ prompt: 'a b c', context: { chunks: 3 } })
  assert.equal(done?.response_payload?.answer, 'a b c (done)')
  const order: AgentTaskStoreStatus[] = ['idle', 'submitting', 'pending', 'processing', 'completed']
  const shown = statuses(seen)
  // Every status in this order; `pending` may be skipped if the worker was quicker than the insert's reply.
  assert.deepEqual(shown, order.filter((s) => shown.includes(s)))
  assert.ok(shown.includes('submitting') && shown.includes('completed'))
  assert.deepEqual(completed, [done?.id])
  assertDerived(seen)
  store.reset()
  assert.deepEqual(store.getSnapshot(), {
    status: 'idle', taskId: null, currentTask: null, error: null, isSubmitting: false, isProcessing: false,
    isWaiting: false, waitingFor: null,
  })
})

test('status failed: a failed task, a refused insert, an unknown id, a timeout', async () => {
  const { supabase } = newUser()
  const tasks = createAgentTasks(supabase)
  const store = new AgentTaskStore(tasks)
  const errors: Error[] = []
  store.options = { onError: (e) => errors.push(e) }
  const seen = record(store)

  assert.equal(await store.submit({ prompt: 'x', context: { chunks: 1, raise: 'boom' } }), null)
  let state = store.getSnapshot()
  assert.equal(state.status, 'failed')
  assert.ok(state.error instanceof TaskFailedError && state.error.type === 'ValueError')
  assert.equal(state.currentTask?.status, 'failed')
  assert.equal(state.taskId, state.currentTask?.id)

  assert.equal(await store.submit({ prompt: 'x', agent: 'no-such-agent' }), null)
  state = store.getSnapshot()
  assert.equal(state.status, 'failed')
  assert.ok(state.error instanceof RequestRefusedError, String(state.error))
  assert.equal(state.taskId, null)

  const missing = randomUUID()
  assert.equal(await store.attach(missing), null)
  assert.equal(store.getSnapshot().status, 'failed')
  assert.ok(store.getSnapshot().error instanceof TaskNotFoundError)

  // A timeout stops the following, not the task: attaching again follows it to its end.
  const hold = holdName()
  const task = await tasks.insertAgentTask({ prompt: 'slow one', context: { chunks: 2, hold } })
  store.options = { ...store.options, timeout: 300 }
  assert.equal(await store.attach(task.id), null)
  assert.ok(store.getSnapshot().error instanceof TaskTimeoutError)
  store.options = { onError: store.options.onError }
  const again = store.attach(task.id)
  assert.equal(store.getSnapshot().status, 'attaching')
  release(hold)
  assert.equal((await again)?.response_payload?.answer, 'slow one (done)')
  assert.equal(store.getSnapshot().status, 'completed')
  assert.equal(errors.length, 4)
  assertDerived(seen)
})
