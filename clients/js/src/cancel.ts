/** Ask for a task to stop: `cancel_agent_task(task_id)`, under the caller's RLS. */
import type { PostgrestError, SupabaseClient } from '@supabase/supabase-js'

import { RequestRefusedError } from './errors.js'
import type { AgentTaskStatus } from './types.js'

/**
 * A pending task ends `failed` (`error.type` `Cancelled`) at once; a running one stops
 * within a second or two and ends the same way, keeping its partial answer; a finished one
 * is unchanged. Resolves with the row's status after the call (null: no such row of yours).
 */
export async function cancelAgentTask(
  supabase: SupabaseClient,
  taskId: string,
): Promise<AgentTaskStatus | null> {
  const response: { data: unknown; error: PostgrestError | null; status: number } =
    await supabase.rpc('cancel_agent_task', { task_id: taskId })
  const { data, error, status } = response
  if (error) throw new RequestRefusedError(error, status)
  const value: unknown = Array.isArray(data) ? data[0] : data
  if (typeof value === 'string') return value as AgentTaskStatus
  if (typeof value === 'object' && value !== null && 'status' in value) {
    return (value as { status: AgentTaskStatus | null }).status
  }
  return null
}
