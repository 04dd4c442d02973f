/** Submit a task the integration guide's way (insert a `pending` row), then follow it to its end. */
import type { PostgrestError, SupabaseClient } from '@supabase/supabase-js'

import { AgentBridgeError, RequestRefusedError } from './errors.js'
import { isAgentTask } from './rows.js'
import {
  TABLE, TASK_COLUMNS, type AgentTask, type OnUpdate, type SubmitInput, type SubmitOptions,
} from './types.js'
import { watchAgentTask } from './watch.js'

/** Insert the row; rejects with RequestRefusedError carrying the database's message. */
export async function insertAgentTask(
  supabase: SupabaseClient,
  input: SubmitInput,
  options: SubmitOptions = {},
): Promise<AgentTask> {
  const agent = input.agent ?? options.agent
  const enterpriseId = input.enterpriseId ?? options.enterpriseId
  const row: Record<string, unknown> = {
    status: 'pending',
    request_payload: input.context === undefined
      ? { prompt: input.prompt }
      : { prompt: input.prompt, context: input.context },
  }
  if (agent !== undefined) row.agent = agent
  if (enterpriseId !== undefined) row.enterprise_id = enterpriseId
  const { data, error, status }: { data: unknown; error: PostgrestError | null; status: number } =
    await supabase.from(TABLE).insert(row).select(TASK_COLUMNS).single()
  if (error) throw new RequestRefusedError(error, status)
  if (!isAgentTask(data)) throw new AgentBridgeError('the database stored the task but returned no row')
  return data
}

/**
 * Submit `{ prompt, context }` and resolve with the `completed` row; `onUpdate` sees the
 * inserted row first, then every later state in order (partial answers included).
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
