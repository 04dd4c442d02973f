/**
 * Streamed answers arrive as chunks (agent_task_chunks); the client rebuilds them into the
 * row it shows. Same stand-ins and worker as client.test.ts (tests/frontend_handler.py).
 */
import assert from 'node:assert/strict'
import { after, afterEach, test } from 'node:test'

import { createAgentTasks, type AgentTask } from 'agent-bridge-client'

import {
  assertFollowed, closeAll, holdName, live, newUser, newWatcher, partial, realtime, release, until, words,
} from './helpers.js'

after(closeAll)
afterEach(async () => { await realtime('reset') })

test('a page opened mid-stream shows the answer so far at once; two watches share the channel', async () => {
  const { supabase, tasks, journal } = newWatcher()
  const hold = holdName()
  const prompt = words(6)
  const task = await tasks.insertAgentTask({ prompt, context: { chunks: 6, hold } })
  const first: AgentTask[] = []
  const watching = tasks.watchAgentTask(task.id, (t) => first.push(t))
  await until('the first partial answer', () => first.some(partial))
  // A second watcher, as after a page reload: its first processing state holds the answer.
  const later: AgentTask[] = []
  const again = tasks.watchAgentTask(task.id, (t) => later.push(t))
  await until('the reloaded page to show it', () => later.some(partial))
  assert.equal(later.find(partial)?.response_payload?.answer, 'w0')
  release(hold)
  const [a, b] = await Promise.all([watching, again])
  assert.equal(a.response_payload?.answer, `${prompt} (done)`)
  assert.deepEqual(a, b)
  assertFollowed(journal, task.id)
  assert.ok(journal.paths(task.id).length >= 2, 'both watches joined')
  await until('the shared channel closed after both', () => supabase.getChannels().length === 0)
})

test('lost chunk events are read back: the answer never skips or steps back', async () => {
  const { tasks, journal } = newWatcher()
  const hold = holdName()
  const prompt = words(12)
  const seen: AgentTask[] = []
  const finished = tasks.submitAgentTask({ prompt, context: { chunks: 12, hold, delay: 0.1 } },
    (t) => seen.push(t))
  await until('the first partial answer', () => seen.some(partial))
  const id = seen[0]?.id ?? ''
  await until('the live subscription', () => live(journal, id))
  await realtime('lose_events', { count: 3 }) // the next three chunks are never delivered
  release(hold)
  const done = await finished
  assert.equal(done.response_payload?.answer, `${prompt} (done)`)
  assert.ok((await realtime('stats')).lost >= 3)
  const answers = seen.filter(partial).map((t) => String(t.response_payload?.answer))
  for (let i = 1; i < answers.length; i++) {
    const [a, b] = [answers[i - 1] ?? '', answers[i] ?? '']
    assert.ok(b.startsWith(a), `partial ${i} stepped back: ${a} -> ${b}`)
  }
  // Every answer shown is one the worker wrote, and the gap was filled by a read.
  const expected = Array.from({ length: 12 }, (_, i) => words(i + 1))
  assert.ok(answers.every((a) => expected.includes(a)), answers.join(' | '))
  assert.ok(answers.some((a) => a.split(' ').length >= 10), answers.join(' | '))
  assertFollowed(journal, id)
})

test('a long answer with characters outside the BMP is rebuilt exactly', async () => {
  const { supabase } = newUser()
  const tasks = createAgentTasks(supabase)
  const prompt = ['🌍', 'é', '𝄞x', 'naïve', '👩‍💻'].join(' ')
  const seen: AgentTask[] = []
  const done = await tasks.submitAgentTask({ prompt, context: { chunks: 5, delay: 0.05 } },
    (t) => seen.push(t))
  assert.equal(done.response_payload?.answer, `${prompt} (done)`)
  const answers = seen.filter(partial).map((t) => String(t.response_payload?.answer))
  assert.ok(answers.length > 0)
  assert.ok(answers.every((a) => prompt.startsWith(a)), answers.join(' | '))
})
