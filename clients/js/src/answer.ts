/** Answer what a task's handler asked: `answer_agent_task(task_id, answer)`, under the
 * caller's ownership (a user answers their own tasks only). */
import type { PostgrestError, SupabaseClient } from '@supabase/supabase-js'

import { AgentBridgeError, RequestRefusedError } from './errors.js'
import type { AgentTaskStatus, Json } from './types.js'

/**
 * Records the answer to the task's open question (`waiting_for`) and queues the task again:
 * its handler runs on from the question with the answer. Resolves with the row's status
 * after the call (`pending`). Rejects with RequestRefusedError carrying the database's
 * message when the answer is refused: no such task of the caller's (also another user's),
 * not waiting for an answer (never asked, already answered, finished), the question
 * expired (P0001, HTTP 400); a null or too large answer (more than 64 KiB; 22023, 400).
 */
export async function answerAgentTask(
  supabase: SupabaseClient,
  taskId: string,
  answer: Json,
): Promise<AgentTaskStatus> {
  if (answer === undefined) {
    // JSON.stringify would drop the argument, and the call would name another function.
    throw new AgentBridgeError('answer must be a JSON value, got undefined')
  }
  const response: { data: unknown; error: PostgrestError | null; status: number } =
    await supabase.rpc('answer_agent_task', { task_id: taskId, answer })
  const { data, error, status } = response
  if (error) throw new RequestRefusedError(error, status)
  const value: unknown = Array.isArray(data) ? data[0] : data
  if (typeof value !== 'string') {
    throw new AgentBridgeError(`answer_agent_task returned ${JSON.stringify(value) ?? 'nothing'}, not a status`)
  }
  return value as AgentTaskStatus
}
