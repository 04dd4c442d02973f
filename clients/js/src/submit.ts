/** Submit a task the integration guide's way (insert a `pending` row), then follow it to its end. */
import type { PostgrestError, SupabaseClient } from '@supabase/supabase-js'

import { AgentBridgeError, RequestRefusedError } from './errors.js'
import { isAgentTask } from './rows.js'
import {
  TABLE, TASK_COLUMNS, type AgentTask, type OnUpdate, type SubmitInput, type SubmitOptions,
} from './types.js'
import { watchAgentTask } from './watch.js'

type Reply = { data: unknown; error: PostgrestError | null; status: number }

/** A key in use is refused with 23505 (409), the message naming the task that has it. */
const UNIQUE_VIOLATION = '23505'
const TASK_ID = /\btask ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b/

/**
 * Insert the row; rejects with RequestRefusedError carrying the database's message. With an
 * `idempotencyKey` this user already used for the agent, nothing is stored: resolves with
 * the task that has the key.
 */
export async function insertAgentTask(
  supabase: SupabaseClient,
  input: SubmitInput,
  options: SubmitOptions = {},
): Promise<AgentTask> {
  const agent = input.agent ?? options.agent
  const enterpriseId = input.enterpriseId ?? options.enterpriseId
  const key = input.idempotencyKey
  const row: Record<string, unknown> = {
    status: 'pending',
    request_payload: input.context === undefined
      ? { prompt: input.prompt }
      : { prompt: input.prompt, context: input.context },
  }
  if (agent !== undefined) row.agent = agent
  if (enterpriseId !== undefined) row.enterprise_id = enterpriseId
  if (key !== undefined) row.idempotency_key = key
  // A row that had the key may be deleted between the refusal and the read (retention):
  // its key is free again, so insert again (a few times at most).
  for (let tries = 0; ; tries++) {
    const { data, error, status }: Reply = await supabase.from(TABLE).insert(row).select(TASK_COLUMNS).single()
    if (!error) {
      if (!isAgentTask(data)) throw new AgentBridgeError('the database stored the task but returned no row')
      return data
    }
    if (key === undefined || error.code !== UNIQUE_VIOLATION || tries >= 2) {
      throw new RequestRefusedError(error, status)
    }
    const existing = await keyedTask(supabase, agent ?? 'default', key, error.message)
    if (existing !== null) return existing
  }
}

/** The task that has the key: the one the refusal names, else the user's row with this
 * agent and key (RLS shows a user only their own rows). Null when there is none (any more). */
async function keyedTask(
  supabase: SupabaseClient, agent: string, key: string, message: string,
): Promise<AgentTask | null> {
  const id = TASK_ID.exec(message)?.[1]
  const query = supabase.from(TABLE).select(TASK_COLUMNS)
  const { data, error, status }: Reply = id === undefined
    ? await query.eq('agent', agent).eq('idempotency_key', key).limit(2)
    : await query.eq('id', id).limit(2)
  if (error) throw new RequestRefusedError(error, status)
  const rows = Array.isArray(data) ? data.filter(isAgentTask) : []
  return rows.length === 1 && rows[0] !== undefined ? rows[0] : null
}

/**
 * Submit `{ prompt, context }` and resolve with the `completed` row; `onUpdate` sees the
 * inserted row first, then every later state in order (partial answers included). With an
 * `idempotencyKey` already used, follows the task that has it instead, just the same.
 */
export async function submitAgentTask(
  supabase: SupabaseClient,
  input: SubmitInput,
  onUpdate?: OnUpdate,
  options: SubmitOptions = {},
): Promise<AgentTask> {
  options.signal?.throwIfAborted()
  const task = await insertAgentTask(supabase, input, options)
  return watchAgentTask(supabase, task.id, onUpdate, options, task)
}
