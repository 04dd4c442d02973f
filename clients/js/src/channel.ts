/**
 * The Realtime channel a watch hears its task on, by one of two paths:
 *
 * - `broadcast`: the private topic `agent_task:<id>`, events `state` (the row without
 *   `request_payload`) and `chunk` (one streamed piece), which the database sends with
 *   `realtime.send` in the transaction of each write. Realtime checks the subscriber once, at
 *   join, against the policy `agent_task_broadcast_receive` on `realtime.messages`.
 * - `postgres_changes`: UPDATEs of the row and INSERTs of its chunks, which Realtime checks
 *   against the tables' RLS once per change and subscriber.
 *
 * realtime-js keeps one channel per topic (`supabase.channel(topic)` returns the one there is)
 * and Realtime one join per topic and socket, so the watches of one task on one Supabase
 * client share a channel: it is opened for the first, closed after the last has left, and a
 * topic being closed is opened again only once it is gone.
 */
import type { RealtimeChannel, SupabaseClient } from '@supabase/supabase-js'

import { CHUNKS_TABLE, TABLE } from './types.js'

export type Path = 'broadcast' | 'postgres_changes'

/** What a channel hears, as a watch handles it. */
export interface TaskListener {
  /** realtime-js' subscribe status (SUBSCRIBED, CHANNEL_ERROR, TIMED_OUT, CLOSED) and its error. */
  status: (status: string, error?: Error) => void
  /** A state of the row: the whole row (postgres_changes) or a Broadcast `state` message. */
  state: (state: unknown) => void
  /** A streamed piece (a row of agent_task_chunks). */
  chunk: (chunk: unknown) => void
  /** Read the row (or its chunks) now: a change came without its data, or changes start
   * flowing only from now on. */
  read: (what: 'row' | 'chunks') => void
}

interface Shared {
  channel: RealtimeChannel
  listeners: Set<TaskListener>
  joined: boolean
}

interface Topics {
  open: Map<string, Shared>
  closing: Map<string, Promise<void>>
}

const clients = new WeakMap<SupabaseClient, Topics>()

export function topicOf(path: Path, taskId: string): string {
  return path === 'broadcast' ? `agent_task:${taskId}` : `agent-task-${taskId}`
}

interface ChangePayload {
  new?: unknown
  errors?: unknown
}

const hasErrors = (p: ChangePayload): boolean => Array.isArray(p.errors) && p.errors.length > 0

/** The channel of one path, its messages handed to each of `listeners`. */
function openChannel(supabase: SupabaseClient, path: Path, taskId: string, listeners: Set<TaskListener>
): RealtimeChannel {
  const each = (call: (l: TaskListener) => void): void => {
    for (const listener of [...listeners]) call(listener)
  }
  const topic = topicOf(path, taskId)
  if (path === 'broadcast') {
    return supabase.channel(topic, { config: { private: true } })
      .on('broadcast', { event: 'state' }, (m: { payload?: unknown }) => each((l) => l.state(m.payload)))
      .on('broadcast', { event: 'chunk' }, (m: { payload?: unknown }) => each((l) => l.chunk(m.payload)))
  }
  return supabase.channel(topic)
    .on('postgres_changes',
      { event: 'UPDATE', schema: 'public', table: TABLE, filter: `id=eq.${taskId}` },
      // Realtime drops columns from oversized or unauthorised records: read the row.
      (p: ChangePayload) => each((l) => hasErrors(p) ? l.read('row') : l.state(p.new)))
    .on('postgres_changes',
      { event: 'INSERT', schema: 'public', table: CHUNKS_TABLE, filter: `task_id=eq.${taskId}` },
      (p: ChangePayload) => each((l) => hasErrors(p) ? l.read('chunks') : l.chunk(p.new)))
    .on('system', {}, (p: { extension?: unknown; status?: unknown }) => {
      // "Subscribed to PostgreSQL": changes flow from here on; anything committed between
      // the join reply and this moment was not sent, so read again.
      if (p.extension === 'postgres_changes' && p.status === 'ok') each((l) => l.read('row'))
    })
}

/** A join Realtime refused because no policy lets this user read the topic (Realtime's
 * "Unauthorized: You do not have permissions to read from this Channel topic"): broadcasting
 * is off, the schema has no such policy, or the task is not the user's. Not worth retrying. */
export function refused(error?: Error): boolean {
  return error !== undefined && /\bUnauthorized\b|permissions to read/i.test(error.message)
}

/** Listen to a task by one path; returns the function that stops listening. The listener
 * hears SUBSCRIBED once the channel is joined (at once if it already is). */
export function listen(supabase: SupabaseClient, path: Path, taskId: string, listener: TaskListener
): () => void {
  let topics = clients.get(supabase)
  if (!topics) {
    topics = { open: new Map(), closing: new Map() }
    clients.set(supabase, topics)
  }
  const { open, closing } = topics
  const topic = topicOf(path, taskId)
  let entry: Shared | null = null
  let left = false

  const start = (): void => {
    if (left) return
    const gone = closing.get(topic)
    if (gone) {
      void gone.then(start)
      return
    }
    let shared = open.get(topic)
    if (!shared) {
      const listeners = new Set<TaskListener>()
      const created: Shared = { channel: openChannel(supabase, path, taskId, listeners), listeners, joined: false }
      shared = created
      open.set(topic, created)
      created.channel.subscribe((status, err) => {
        created.joined = String(status) === 'SUBSCRIBED'
        for (const l of [...created.listeners]) l.status(String(status), err)
      })
    } else if (shared.joined) {
      queueMicrotask(() => { if (!left) listener.status('SUBSCRIBED') })
    }
    shared.listeners.add(listener)
    entry = shared
  }

  start()
  return () => {
    if (left) return
    left = true
    const shared = entry
    if (!shared || !shared.listeners.delete(listener) || shared.listeners.size > 0) return
    open.delete(topic)
    const removed: Promise<void> = supabase.removeChannel(shared.channel).then(() => undefined, () => undefined)
      .then(() => { if (closing.get(topic) === removed) closing.delete(topic) })
    closing.set(topic, removed)
  }
}
