/**
 * Idempotency keys through the client, with the real supabase-js against the stand-ins, a
 * real bridge and a real worker: a submit retried with the same key stores nothing and
 * follows the first task. Started by tests/acceptance/test_frontend.py.
 */
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { after, test } from 'node:test'

import { createAgentTasks, RequestRefusedError, type AgentTask } from 'agent-bridge-client'

import { closeAll, newUser, serviceClient } from './helpers.js'

after(closeAll)

const QUICK = { chunks: 1, delay: 0 }

/** The rows with this key, every user's (as the service sees them). */
async function keyed(key: string): Promise<{ id: string; user_id: string | null; attempts: number }[]> {
  const { data, error } = await serviceClient().from('agent_task_requests')
    .select('id,user_id,attempts').eq('idempotency_key', key)
  assert.equal(error, null)
  const rows: unknown = data
  return rows as { id: string; user_id: string | null; attempts: number }[]
}

test('submits retried with one key follow one task, and every caller gets it', async () => {
  const { id: userId, supabase } = newUser()
  const tasks = createAgentTasks(supabase)
  const key = randomUUID()
  const seen: AgentTask[][] = [[], [], [], [], []]
  const done = await Promise.all(seen.map((updates) =>
    tasks.submitAgentTask({ prompt: 'only once', context: QUICK, idempotencyKey: key },
      (t) => updates.push(t), { timeout: 60000 })))
  const ids = new Set(done.map((t) => t.id))
  assert.equal(ids.size, 1)
  assert.ok(done.every((t) => t.status === 'completed' && t.response_payload?.answer === 'only (done)'))
  assert.ok(seen.every((updates) => updates.length > 0 && updates.every((t) => ids.has(t.id))))
  const rows = await keyed(key)
  assert.deepEqual(rows.map((r) => [r.id, r.user_id, r.attempts]), [[done[0]?.id, userId, 1]])
  // The key is the user's: a later insert with it resolves with the finished task.
  const again = await tasks.insertAgentTask({ prompt: 'only once', idempotencyKey: key })
  assert.equal(again.id, done[0]?.id)
  assert.equal(again.status, 'completed')
})

test("another user's same key is a task of their own", async () => {
  const key = randomUUID()
  const [a, b] = [newUser(), newUser()]
  const first = await createAgentTasks(a.supabase).submitAgentTask({ prompt: 'a', context: QUICK, idempotencyKey: key })
  const second = await createAgentTasks(b.supabase).submitAgentTask({ prompt: 'b', context: QUICK, idempotencyKey: key })
  assert.notEqual(first.id, second.id)
  assert.equal(second.response_payload?.answer, 'b (done)')
  assert.equal((await keyed(key)).length, 2)
})

test('the raw insert of a key in use is a 409 naming the task', async () => {
  const { supabase } = newUser()
  const key = randomUUID()
  const task = await createAgentTasks(supabase).insertAgentTask({ prompt: 'raw', context: QUICK, idempotencyKey: key })
  const { error, status } = await supabase.from('agent_task_requests')
    .insert({ request_payload: { prompt: 'raw' }, idempotency_key: key })
  assert.equal(status, 409)
  assert.equal(error?.code, '23505')
  assert.equal(error?.message, `idempotency_key "${key}" is already used by task ${task.id} (agent "default")`)
})

test('a key outside 1 to 200 characters is refused as the database says', async () => {
  const { supabase } = newUser()
  const tasks = createAgentTasks(supabase)
  await assert.rejects(tasks.insertAgentTask({ prompt: 'x', idempotencyKey: 'k'.repeat(201) }), (err) => {
    assert.ok(err instanceof RequestRefusedError)
    assert.equal(err.status, 400)
    assert.equal(err.code, '22023')
    assert.equal(err.message, 'idempotency_key must be 1 to 200 characters long, got 201')
    return true
  })
})
