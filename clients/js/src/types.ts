/** Rows of `agent_task_requests` as agent-bridge writes them, and the client's options. */

/** The four statuses of the integration guide. */
export type AgentTaskStatus = 'pending' | 'processing' | 'completed' | 'failed'

export type Json = string | number | boolean | null | Json[] | { [key: string]: Json }

/** What the frontend sends: the integration guide's `{ prompt, context }`. */
export interface AgentTaskRequest {
  prompt: string
  context?: { [key: string]: Json }
  [key: string]: Json | undefined
}

/** What the worker writes. While an answer streams it holds `{ answer, partial: true }`;
 * the final result replaces it. A failed task holds `{ error: message }`. */
export interface AgentTaskResponse {
  answer?: string
  partial?: boolean
  error?: string
  [key: string]: Json | undefined
}

/** The row's `error` column: the last error, `type` `Cancelled` for a cancelled task. */
export interface AgentTaskErrorInfo {
  type: string
  message: string
  retryable?: boolean
  attempt?: number
  at?: string
  [key: string]: Json | undefined
}

/** What a task's handler asked its user (the `waiting_for` column): set only while the task
 * waits for an answer (its status then is `pending`), null otherwise. Answer it with
 * answerAgentTask (`answer_agent_task`) before `expires_at`, or the task ends `failed` with
 * `error.type` `NoAnswer`. */
export interface AgentTaskWaitingFor {
  /** The handler's question, as it passed it to `ask()` (any JSON: a text, or an object
   * with the text and the choices, as the handler and the page agree). */
  question: Json
  asked_at: string
  /** The deadline: an answer after it is refused, and the task ends `NoAnswer`. */
  expires_at: string
  /** 1 for the task's first question, 2 for the second, ... */
  number: number
  [key: string]: Json | undefined
}

/** One answered question (the `answers` column holds them in the order asked). */
export interface AgentTaskAnswer {
  question: Json
  answer: Json
  answered_at: string
  [key: string]: Json | undefined
}

/** One row of `agent_task_requests` as a user may select it: every column of TASK_COLUMNS. */
export type AgentTaskRow = {
  id: string
  status: AgentTaskStatus
  request_payload: AgentTaskRequest
  response_payload: AgentTaskResponse | null
  created_at: string
  updated_at: string
  attempts: number
  max_attempts: number
  priority: number
  run_at: string
  lease_expires_at: string | null
  started_at: string | null
  finished_at: string | null
  error: AgentTaskErrorInfo | null
  user_id: string | null
  enterprise_id: string | null
  agent: string
  /** What the handler asked and waits for (a `pending` row only); null when not waiting. */
  waiting_for: AgentTaskWaitingFor | null
  /** The questions answered so far, in the order asked; null before the first answer. */
  answers: AgentTaskAnswer[] | null
}

/** A row of `agent_task_requests` as the client holds it: the integration guide's columns
 * always, the rest when the read or event that brought it carried them. */
export type AgentTask = Pick<AgentTaskRow, 'id' | 'status' | 'request_payload' |
  'response_payload' | 'created_at' | 'updated_at'> &
  Partial<Omit<AgentTaskRow, 'id' | 'status' | 'request_payload' | 'response_payload' |
    'created_at' | 'updated_at'>>

/** Called with the row each time it changes (in order, never an older state). */
export type OnUpdate = (task: AgentTask) => void

export interface WatchOptions {
  /** Stop waiting after this many milliseconds (the task itself goes on). */
  timeout?: number
  /** Stop watching (the task itself goes on; use cancelAgentTask to stop it). */
  signal?: AbortSignal
  /** Last-resort poll of the row while Realtime is silent, ms (default 20000). */
  pollInterval?: number
  /** First wait before rejoining a failed channel, ms (default 250; doubles to 10000). */
  rejoinDelay?: number
  /** Say what the watch does (off by default): which path it follows the task by (Broadcast,
   * or postgres_changes after a refused join), and each rejoin. `true` writes to
   * console.debug; a function gets each line. */
  debug?: boolean | ((message: string) => void)
}

export interface SubmitInput {
  prompt: string
  context?: { [key: string]: Json }
  /** The agent that should run the task (the `agent` column; default `default`). */
  agent?: string
  /** The tenant; must be the signed-in user's own (the database checks). */
  enterpriseId?: string
  /** Submit at most once per key (1 to 200 characters; e.g. a UUID made when the form
   * opens): a second submit with a key the user already used for this agent stores nothing
   * and resolves with the first task instead (the `idempotency_key` column). */
  idempotencyKey?: string
}

export interface SubmitOptions extends WatchOptions {
  agent?: string
  enterpriseId?: string
}

/** Options bound once by createAgentTasks. */
export type AgentTasksDefaults = SubmitOptions

export const TABLE = 'agent_task_requests'

/** The columns of `agent_task_requests` the client reads. Users may select these, not every
 * column (the worker's host and process are the operator's), so `select('*')` is refused
 * (42501): every read names its columns. A literal type, so a `Database`-typed client infers
 * the row it selects. `waiting_for` and `answers` need schema version 9. */
export const TASK_COLUMNS = `id,status,request_payload,response_payload,created_at,updated_at,\
attempts,max_attempts,priority,run_at,lease_expires_at,started_at,finished_at,error,user_id,\
enterprise_id,agent,waiting_for,answers` as const

/** One piece of a streamed answer (`agent_task_chunks`): while attempt `attempt` runs, its
 * answer is `answer.slice(0, answer_offset) + text` (offsets in characters, i.e. Unicode
 * code points) applied in `seq` order. The client rebuilds it; apps see it as the row's
 * `response_payload` `{ answer, partial: true }`. */
export type AgentTaskChunk = {
  task_id: string
  attempt: number
  seq: number
  answer_offset: number
  text: string
  created_at: string
}

export const CHUNKS_TABLE = 'agent_task_chunks'

/** The columns of `agent_task_chunks` the client reads (users may not select them all). */
export const CHUNK_COLUMNS = 'task_id,attempt,seq,answer_offset,text,created_at' as const
