/** What the node tests share: the stand-ins' addresses (from the pytest fixture), signed
 * users, Supabase clients as those users, and the Realtime stand-in's fault switches. */
import { createHmac, randomUUID } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'

import { createClient, type SupabaseClient } from '@supabase/supabase-js'

import { createAgentTasks, type AgentTask, type AgentTasks, type AgentTasksDefaults, type Json } from 'agent-bridge-client'

function env(name: string): string {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run these tests through pytest tests/acceptance/test_frontend.py`)
  return value
}

export const SUPABASE_URL = env('SUPABASE_URL')
export const ANON_KEY = env('SUPABASE_ANON_KEY')
export const SERVICE_KEY = env('SUPABASE_SERVICE_KEY')
/** The path this run's watches follow: pytest runs the suite with broadcasting on
 * (`broadcast`) and off (`postgres_changes`: every private join refused). */
export const PATH = env('REALTIME_PATH') as 'broadcast' | 'postgres_changes'
const JWT_SECRET = env('TEST_JWT_SECRET')
const CONTROL_URL = env('REALTIME_CONTROL_URL')
const STATE_DIR = env('TEST_STATE_DIR')

const b64 = (data: string | Buffer): string => Buffer.from(data).toString('base64url')

/** A signed-in user's access token, as Supabase Auth issues it (HS256, role authenticated). */
export function userToken(sub: string, ttlSeconds = 3600): string {
  const now = Math.floor(Date.now() / 1000)
  const header = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64(JSON.stringify({ aud: 'authenticated', role: 'authenticated', sub, iat: now,
    exp: now + ttlSeconds, app_metadata: { provider: 'email' }, user_metadata: {} }))
  const mac = createHmac('sha256', JWT_SECRET).update(`${header}.${body}`).digest()
  return `${header}.${body}.${b64(mac)}`
}

export interface User {
  id: string
  supabase: SupabaseClient
}

const clients: SupabaseClient[] = []

/** A Supabase client signed in as a new user (the app's usual client, with the anon key);
 * with `id`, another client of that user (a reloaded page). */
export function newUser(id: string = randomUUID()): User {
  const token = userToken(id)
  const supabase = createClient(SUPABASE_URL, ANON_KEY, {
    accessToken: () => Promise.resolve(token),
    realtime: { heartbeatIntervalMs: 2000, timeout: 3000 },
  })
  clients.push(supabase)
  return { id, supabase }
}

export function serviceClient(): SupabaseClient {
  const supabase = createClient(SUPABASE_URL, SERVICE_KEY, { auth: { persistSession: false } })
  clients.push(supabase)
  return supabase
}

/** Close every socket the tests opened, so node can exit. */
export async function closeAll(): Promise<void> {
  for (const supabase of clients.splice(0)) {
    await supabase.removeAllChannels()
    await supabase.realtime.disconnect()
  }
}

export interface RealtimeStats {
  connections: number
  joins: number
  events: number
  lost: number
  dropped: number
  access_tokens: number
  heartbeats: number
  open: number
  stalled: number
  /** Topics whose database subscription is live (after "Subscribed to PostgreSQL"). */
  active_topics: string[]
}

/** Flip a fault switch of the Realtime stand-in (drop, delay_join, lose_events, fail_join,
 * stall, reset) and get its counters. */
export async function realtime(name: string, params: Record<string, string | number> = {}
): Promise<RealtimeStats> {
  const query = new URLSearchParams(Object.entries(params).map(([k, v]) => [k, String(v)]))
  const response = await fetch(`${CONTROL_URL}/control/${name}?${query}`)
  const stats = await response.json() as Partial<RealtimeStats>
  return { connections: 0, joins: 0, events: 0, lost: 0, dropped: 0, access_tokens: 0, heartbeats: 0,
    open: 0, stalled: 0, active_topics: [], ...stats }
}

/** Let a held task go on (the handler waits for this file after its first chunk). */
export function release(name: string): void {
  writeFileSync(join(STATE_DIR, name), 'go')
}

export function holdName(): string {
  return `hold-${randomUUID()}`
}

/** Resolve when `check` is true; polls every 20 ms (conditions, never wall-clock asserts). */
export async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 30_000
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** Whether the database has cancel_agent_task (told by the pytest fixture). */
export const HAS_CANCEL = process.env.HAS_CANCEL === '1'

/** The client's debug lines (the `debug` option), to tell which path a watch followed. */
export class Journal {
  readonly lines: string[] = []
  readonly debug = (line: string): void => { this.lines.push(line) }

  /** The paths the watches of task `id` followed, one per join, in order. */
  paths(id: string): string[] {
    return this.lines.filter((l) => l.includes(id))
      .flatMap((l) => /following by (Broadcast|postgres_changes)/.exec(l)?.[1] ?? [])
      .map((p) => p === 'Broadcast' ? 'broadcast' : p)
  }

  /** Whether Realtime refused a watch of `id` its Broadcast topic. */
  refused(id: string): boolean {
    return this.lines.some((l) => l.includes(id) && l.includes('Broadcast join refused'))
  }
}

/** A new user's client and its tasks, with the client's debug lines kept in `journal`. */
export function newWatcher(defaults: AgentTasksDefaults = {}): User & { tasks: AgentTasks; journal: Journal } {
  const user = newUser()
  const journal = new Journal()
  return { ...user, journal, tasks: createAgentTasks(user.supabase, { ...defaults, debug: journal.debug }) }
}

/** Every join of `id` in `journal` followed this run's path, and there was one at least;
 * on the fallback run, only after its Broadcast join was refused. */
export function assertFollowed(journal: Journal, id: string): void {
  const paths = journal.paths(id)
  if (paths.length === 0 || paths.some((p) => p !== PATH)) {
    throw new Error(`task ${id} followed by ${paths.join(', ') || 'nothing'}, not ${PATH}:\n${journal.lines.join('\n')}`)
  }
  if (journal.refused(id) !== (PATH === 'postgres_changes')) {
    throw new Error(`the Broadcast join of ${id} was ${journal.refused(id) ? '' : 'not '}refused on the ${PATH} run`)
  }
}

/** The watch of `id` hears every change from now on: joined on the Broadcast path; on the
 * postgres_changes path, once Realtime said "Subscribed to PostgreSQL". */
export async function live(journal: Journal, id: string): Promise<boolean> {
  if (journal.paths(id).length === 0) return false
  return PATH === 'broadcast' || (await realtime('stats')).active_topics.some((topic) => topic.includes(id))
}

/** `w0 w1 ... w<n-1>`: a prompt the test handler answers one word a piece. */
export const words = (n: number): string => Array.from({ length: n }, (_, i) => `w${i}`).join(' ')

export const partial = (t: AgentTask): boolean => t.response_payload?.partial === true

/** A task submitted and held after its first piece (`release` lets it go on). */
export interface Held {
  id: string
  seen: AgentTask[]
  finished: Promise<AgentTask>
  release: () => void
}

/** Submit `prompt` (one piece per word, unless `context.chunks` says otherwise), held after
 * its first piece; resolves once the first partial answer shows. */
export async function submitHeld(tasks: AgentTasks, prompt: string, context: { [key: string]: Json } = {}
): Promise<Held> {
  const hold = holdName()
  const seen: AgentTask[] = []
  const finished = tasks.submitAgentTask({ prompt, context: { chunks: prompt.split(' ').length, hold, ...context } },
    (t) => seen.push(t))
  finished.catch(() => undefined) // a test that expects a failure awaits it itself
  await until('the first partial answer', () => seen.some(partial))
  return { id: seen[0]?.id ?? '', seen, finished, release: () => release(hold) }
}
