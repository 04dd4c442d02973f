/**
 * agent-bridge's frontend client: submit agent tasks through Supabase and follow each to
 * its end without missing an update. Bind your Supabase client once:
 *
 *   const { submitAgentTask, watchAgentTask, cancelAgentTask, answerAgentTask } = createAgentTasks(supabase)
 */
import type { SupabaseClient } from '@supabase/supabase-js'

import { answerAgentTask } from './answer.js'
import { cancelAgentTask } from './cancel.js'
import { insertAgentTask, submitAgentTask } from './submit.js'
import type { AgentTask, AgentTasksDefaults, AgentTaskStatus, Json, OnUpdate, SubmitInput, SubmitOptions,
  WatchOptions } from './types.js'
import { watchAgentTask } from './watch.js'

export interface AgentTasks {
  /** The integration guide's service: insert `{ prompt, context }`, resolve with the completed row. */
  submitAgentTask: (input: SubmitInput, onUpdate?: OnUpdate, options?: SubmitOptions) => Promise<AgentTask>
  /** Insert only; follow it later with watchAgentTask. */
  insertAgentTask: (input: SubmitInput, options?: SubmitOptions) => Promise<AgentTask>
  /** Follow a task to its end: by id (e.g. after a page reload), or the row insertAgentTask
   * returned (shown first). */
  watchAgentTask: (task: string | AgentTask, onUpdate?: OnUpdate, options?: WatchOptions) => Promise<AgentTask>
  /** Ask the task to stop; resolves with its status after the call. */
  cancelAgentTask: (taskId: string) => Promise<AgentTaskStatus | null>
  /** Answer what the task's handler asked (its `waiting_for`); resolves with its status
   * after the call (`pending`: it goes on), rejects with RequestRefusedError when refused. */
  answerAgentTask: (taskId: string, answer: Json) => Promise<AgentTaskStatus>
  readonly supabase: SupabaseClient
}

export function createAgentTasks(supabase: SupabaseClient, defaults: AgentTasksDefaults = {}): AgentTasks {
  return {
    supabase,
    submitAgentTask: (input, onUpdate, options) =>
      submitAgentTask(supabase, input, onUpdate, { ...defaults, ...options }),
    insertAgentTask: (input, options) => insertAgentTask(supabase, input, { ...defaults, ...options }),
    watchAgentTask: (task, onUpdate, options) => typeof task === 'string'
      ? watchAgentTask(supabase, task, onUpdate, { ...defaults, ...options })
      : watchAgentTask(supabase, task.id, onUpdate, { ...defaults, ...options }, task),
    cancelAgentTask: (taskId) => cancelAgentTask(supabase, taskId),
    answerAgentTask: (taskId, answer) => answerAgentTask(supabase, taskId, answer),
  }
}

export {
  AgentBridgeError, RequestRefusedError, TaskCancelledError, TaskFailedError, TaskNotFoundError,
  TaskTimeoutError,
} from './errors.js'
/** answerAgentTask(supabase, taskId, answer), unbound (createAgentTasks binds it too). */
export { answerAgentTask } from './answer.js'
export type {
  AgentTask, AgentTaskAnswer, AgentTaskChunk, AgentTaskErrorInfo, AgentTaskRequest, AgentTaskResponse,
  AgentTasksDefaults, AgentTaskStatus, AgentTaskWaitingFor,
  Json, OnUpdate, SubmitInput, SubmitOptions, WatchOptions,
} from './types.js'
export { AgentTaskStore } from './store.js'
export type { AgentTaskState, AgentTaskStoreOptions, AgentTaskStoreStatus } from './store.js'
export type { AgentTaskChunkRow, AgentTaskInsert, AgentTaskRow, AgentTaskTableRow, Database } from './database.js'
/** The columns a signed-in user may read, for apps that read the tables themselves
 * (`select('*')` is refused: some columns are the operator's). */
export { CHUNK_COLUMNS, TASK_COLUMNS } from './types.js'
