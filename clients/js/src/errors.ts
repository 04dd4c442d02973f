/** The errors the client rejects with; each keeps the server's words. */
import type { AgentTask } from './types.js'

/** Base class of every agent-bridge client error. */
export class AgentBridgeError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = new.target.name
  }
}

/** The database refused a request (a quota, a bad payload, RLS): its message, code, details, hint. */
export class RequestRefusedError extends AgentBridgeError {
  readonly code: string | undefined
  readonly details: string | undefined
  readonly hint: string | undefined
  readonly status: number | undefined

  constructor(error: { message: string; code?: string; details?: string | null; hint?: string | null },
    status?: number) {
    super(error.message, { cause: error })
    this.code = error.code ?? undefined
    this.details = error.details ?? undefined
    this.hint = error.hint ?? undefined
    this.status = status
  }
}

/** The task ended `failed`: `type` and `message` are the row's `error.type` / `error.message`. */
export class TaskFailedError extends AgentBridgeError {
  readonly type: string
  readonly task: AgentTask
  readonly cancelled: boolean = false

  constructor(task: AgentTask) {
    const type = task.error?.type ?? 'Error'
    const message = task.error?.message ?? task.response_payload?.error ?? 'the task failed'
    super(`${type}: ${message}`)
    this.type = type
    this.task = task
  }
}

/** The task was cancelled (`error.type` is `Cancelled`): a TaskFailedError with `cancelled` true. */
export class TaskCancelledError extends TaskFailedError {
  override readonly cancelled: boolean = true
}

/** The `timeout` option ran out before the task ended; the task itself goes on. */
export class TaskTimeoutError extends AgentBridgeError {
  readonly taskId: string
  readonly lastSeen: AgentTask | null

  constructor(taskId: string, ms: number, lastSeen: AgentTask | null) {
    super(`task ${taskId} did not finish within ${ms} ms (last status: ${lastSeen?.status ?? 'unknown'})`)
    this.taskId = taskId
    this.lastSeen = lastSeen
  }
}

/** The row is not there, or this user may not see it. */
export class TaskNotFoundError extends AgentBridgeError {
  readonly taskId: string

  constructor(taskId: string) {
    super(`task ${taskId} does not exist or is not yours`)
    this.taskId = taskId
  }
}

/** The outcome error for a finished row: TaskCancelledError or TaskFailedError. */
export function failureOf(task: AgentTask): TaskFailedError {
  return task.error?.type === 'Cancelled' ? new TaskCancelledError(task) : new TaskFailedError(task)
}
