/** Reading rows: shape checks and the order of two states of one row. */
import { TASK_COLUMNS, type AgentTask, type AgentTaskStatus } from './types.js'

const STATUSES: readonly AgentTaskStatus[] = ['pending', 'processing', 'completed', 'failed']

export function isAgentTask(value: unknown): value is AgentTask {
  if (typeof value !== 'object' || value === null) return false
  const row = value as Record<string, unknown>
  return typeof row.id === 'string' && typeof row.updated_at === 'string' &&
    STATUSES.includes(row.status as AgentTaskStatus)
}

export function isFinal(task: AgentTask): boolean {
  return task.status === 'completed' || task.status === 'failed'
}

/** Microseconds since the epoch of a Postgres timestamptz in JSON (ISO 8601, up to 6 digits). */
export function micros(timestamp: string): number {
  const match = /^(.*?)(?:\.(\d+))?(Z|[+-]\d\d(?::?\d\d)?)?$/.exec(timestamp.trim())
  if (!match) return Number.NaN
  const [, base, fraction = '', zone = 'Z'] = match
  const seconds = Date.parse(`${base}${zone.length === 3 ? `${zone}:00` : zone}`)
  return seconds * 1000 + Number(fraction.padEnd(6, '0').slice(0, 6))
}

const RANK: Record<AgentTaskStatus, number> = { pending: 0, processing: 1, completed: 2, failed: 2 }

/** True when `next` is a newer state of the row than `shown` (so it should be shown). */
export function isNewer(next: AgentTask, shown: AgentTask | null): boolean {
  if (shown === null) return true
  const a = micros(next.updated_at)
  const b = micros(shown.updated_at)
  if (a !== b) return a > b
  // The same instant is the same write seen twice (a read and an event), unless the
  // status moved on within one transaction.
  return RANK[next.status] > RANK[shown.status]
}

/** The columns a Broadcast `state` message carries: the row's, but request_payload. */
const STATE_COLUMNS = TASK_COLUMNS.split(',').filter((c) => c !== 'request_payload')

/**
 * The row a state of it shows: a whole row as it is; a Broadcast `state` message (the row
 * without request_payload, which never changes) over the row shown. Null when the row must
 * be read: none is shown yet, or the message left out the answer, error and answers
 * (`omitted`).
 */
export function rowOf(state: unknown, shown: AgentTask | null): AgentTask | null {
  if (!isAgentTask(state) || 'omitted' in state) return null
  if ('request_payload' in state) return state
  if (shown === null) return null
  const row: Record<string, unknown> = { ...shown }
  for (const column of STATE_COLUMNS) if (column in state) row[column] = state[column as keyof AgentTask]
  return row as AgentTask
}
