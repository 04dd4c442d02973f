/**
 * The part of agent-bridge's schema a signed-in user touches, in supabase-js' `Database`
 * shape, so `createClient<Database>(url, key)` checks column names, statuses and payloads:
 *
 *   const supabase = createClient<Database>(url, anonKey)
 *   const { data } = await supabase.from('agent_task_requests').select(TASK_COLUMNS).eq('id', id)
 *
 * Only what users may do is here: `Row` is the columns they may select (TASK_COLUMNS and
 * `idempotency_key`, CHUNK_COLUMNS; the operator's, such as `worker`, are not), `Insert` the columns they may
 * insert (a `pending` row), `Update` nothing (status changes are the database's functions),
 * and the functions they may call (cancel a task, answer what its handler asked). Merge it into your own generated types if you have them
 * (`Database['public']['Tables']['agent_task_requests']`).
 */
import type {
  AgentTaskChunk, AgentTaskRequest, AgentTaskRow, AgentTaskStatus, Json,
} from './types.js'

export type { AgentTaskRow } from './types.js'

/** A user cannot write here: the state machine is the database's. */
type NoColumns = { [_ in never]: never }

/** What a user may insert (their column grants): a `pending` request; the rest is defaulted. */
export type AgentTaskInsert = {
  request_payload: AgentTaskRequest
  status?: 'pending'
  priority?: number
  run_at?: string
  user_id?: string | null
  enterprise_id?: string | null
  agent?: string
  /** At most one row per user, agent and key (1 to 200 characters): a second insert with a
   * key in use is refused with 23505 (HTTP 409), the message naming the task that has it. */
  idempotency_key?: string | null
}

/** A row of `agent_task_requests` as a user may select it: TASK_COLUMNS' columns, and the
 * idempotency key the row was inserted with (so an app can look a task up by it). */
export type AgentTaskTableRow = AgentTaskRow & { idempotency_key: string | null }

/** One row of `agent_task_chunks` as a user may select it (CHUNK_COLUMNS). */
export type AgentTaskChunkRow = AgentTaskChunk

export type Database = {
  public: {
    Tables: {
      agent_task_requests: {
        Row: AgentTaskTableRow
        Insert: AgentTaskInsert
        Update: NoColumns
        Relationships: []
      }
      agent_task_chunks: {
        Row: AgentTaskChunkRow
        Insert: NoColumns
        Update: NoColumns
        Relationships: []
      }
    }
    Views: { [_ in never]: never }
    Functions: {
      /** Ask a task to stop; returns its status after the call (null: no such row of yours). */
      cancel_agent_task: {
        Args: { task_id: string }
        Returns: AgentTaskStatus | null
      }
      /** Answer what the task's handler asked (`waiting_for`); returns its status after the
       * call (`pending`: queued to go on). A refusal is an error (P0001 or 22023, HTTP 400). */
      answer_agent_task: {
        Args: { task_id: string; answer: Json }
        Returns: AgentTaskStatus
      }
    }
    Enums: { [_ in never]: never }
    CompositeTypes: { [_ in never]: never }
  }
}
