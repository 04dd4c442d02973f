/**
 * The state of the one task a UI shows, without React: useAgentTask renders it
 * (useSyncExternalStore), and other frameworks can subscribe to it the same way.
 *
 * It follows one task at a time, either one it submits or one it re-attaches to by id (a
 * reloaded page): both go through watchAgentTask, so both join, read, apply events in order
 * and always get the final state. Starting another stops following the previous one.
 */
import { AgentBridgeError, TaskFailedError } from './errors.js'
import type { AgentTasks } from './index.js'
import { isFinal } from './rows.js'
import type { AgentTask, AgentTaskStatus, AgentTaskWaitingFor, Json, OnUpdate, SubmitInput,
  SubmitOptions } from './types.js'

/**
 * One status instead of flags:
 * - `idle`: nothing submitted or attached (or after reset);
 * - `submitting`: the insert is in flight;
 * - `attaching`: following a task by id, its row not read yet;
 * - `pending` / `processing`: the row's status while it runs;
 * - `waiting`: its handler asked its user something and waits for the answer (`waitingFor`
 *   holds the question; answer it with `answer()`). The row itself is `pending` then (no worker
 *   holds it), with `waiting_for` set; once answered it is `pending` again, then `processing`;
 * - `completed`: it ended completed (`currentTask` holds the answer);
 * - `failed`: `error` is set: the task failed or was cancelled, or the insert was refused,
 *   the id was not found, or the `timeout` ran out (the task itself may go on).
 */
export type AgentTaskStoreStatus =
  'idle' | 'submitting' | 'attaching' | 'pending' | 'processing' | 'waiting' | 'completed' | 'failed'

export interface AgentTaskState {
  status: AgentTaskStoreStatus
  /** The task followed: known once inserted (or from the start when attaching). */
  taskId: string | null
  /** The latest state of the task (partial answers included). */
  currentTask: AgentTask | null
  error: Error | null
  /** `status === 'submitting'`. */
  isSubmitting: boolean
  /** The task is being worked on, or about to be: `attaching`, `pending` or `processing` (a
   * spinner). Not while it waits for its user (`waiting`): it is not finished then either, so
   * a Stop button is for `isProcessing || isWaiting`. */
  isProcessing: boolean
  /** `status === 'waiting'`: the task waits for its user's answer to `waitingFor`. */
  isWaiting: boolean
  /** What the task's handler asked (the row's `waiting_for`: `question`, `asked_at`,
   * `expires_at`, `number`) while `status` is `waiting`; null otherwise. */
  waitingFor: AgentTaskWaitingFor | null
}

export interface AgentTaskStoreOptions extends SubmitOptions {
  onComplete?: (task: AgentTask) => void
  /** Failures, refusals and timeouts; a cancelled task arrives as TaskCancelledError. */
  onError?: (error: Error) => void
  onUpdate?: OnUpdate
}

/** The question a row waits on (only a `pending` row may hold one), or null. */
function questionOf(row: AgentTask | null): AgentTaskWaitingFor | null {
  return row?.status === 'pending' ? row.waiting_for ?? null : null
}

function stateOf(status: AgentTaskStoreStatus, taskId: string | null, currentTask: AgentTask | null,
  error: Error | null, waitingFor: AgentTaskWaitingFor | null = null): AgentTaskState {
  return {
    status, taskId, currentTask, error,
    isSubmitting: status === 'submitting',
    isProcessing: status === 'attaching' || status === 'pending' || status === 'processing',
    isWaiting: status === 'waiting',
    waitingFor: status === 'waiting' ? waitingFor : null,
  }
}

const IDLE = stateOf('idle', null, null, null)

/** The options for the client calls, without callbacks or unset values (so an unset option
 * does not hide createAgentTasks' default). */
function callOptions(options: AgentTaskStoreOptions): SubmitOptions {
  const out: Record<string, unknown> = {}
  for (const key of ['agent', 'enterpriseId', 'timeout', 'pollInterval', 'rejoinDelay', 'debug'] as const) {
    if (options[key] !== undefined) out[key] = options[key]
  }
  return out
}

export class AgentTaskStore {
  /** Read at each call, so callbacks may change between renders. */
  options: AgentTaskStoreOptions
  private state: AgentTaskState = IDLE
  private readonly listeners = new Set<() => void>()
  private controller: AbortController | null = null
  /** The task followed (or last followed to its end) and the promise of its outcome. */
  private followed: { id: string; outcome: Promise<AgentTask | null> } | null = null

  /** With `attaching`, the store starts as `attaching` that task, so a page rendered before
   * `attach(attaching)` runs (useAgentTask attaches in an effect) does not show `idle`. */
  constructor(readonly tasks: AgentTasks, options: AgentTaskStoreOptions = {}, attaching: string | null = null) {
    this.options = options
    if (attaching) this.state = stateOf('attaching', attaching, null, null)
  }

  readonly subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener)
    return () => { this.listeners.delete(listener) }
  }

  /** The current state; a new object after each change, the same one otherwise. */
  readonly getSnapshot = (): AgentTaskState => this.state

  /** Insert and follow; resolves with the completed row, or null (see `error`). Never rejects. */
  submit(input: SubmitInput): Promise<AgentTask | null> {
    const controller = this.begin()
    this.set(stateOf('submitting', null, null, null))
    return (async (): Promise<AgentTask | null> => {
      let task: AgentTask
      try {
        task = await this.tasks.insertAgentTask(input, { ...callOptions(this.options), signal: controller.signal })
      } catch (err) {
        return this.fail(controller, err)
      }
      if (!this.mine(controller)) return null
      return this.start(controller, task.id, task)
    })()
  }

  /**
   * Follow an existing task by id (after a page reload, say), with the same guarantees as
   * after a submit. Attaching to the task already followed (or already followed to its end)
   * changes nothing and returns the same promise. Never rejects.
   */
  attach(taskId: string): Promise<AgentTask | null> {
    if (this.followed?.id === taskId) return this.followed.outcome
    const controller = this.begin()
    this.set(stateOf('attaching', taskId, null, null))
    return this.start(controller, taskId, taskId)
  }

  /** Ask the followed task to stop; resolves with its status after the call. */
  cancel(): Promise<AgentTaskStatus | null> {
    const id = this.state.taskId
    return id ? this.tasks.cancelAgentTask(id) : Promise.resolve(null)
  }

  /**
   * Answer what the followed task asked (`waitingFor`); resolves with its status after the
   * call (`pending`: queued to go on; the store shows that change when it arrives, as any
   * other), or null with no task. Rejects with RequestRefusedError when the database refuses the answer (not
   * waiting, answered already, expired); the task's own state is unchanged by a refusal.
   */
  answer(answer: Json): Promise<AgentTaskStatus | null> {
    const id = this.state.taskId
    return id ? this.tasks.answerAgentTask(id, answer) : Promise.resolve(null)
  }

  /** Stop following and forget the task: back to `idle`. */
  reset(): void {
    this.stop()
    this.followed = null
    this.set(IDLE)
  }

  /** Stop following (the task goes on), keeping the state shown; attach resumes. */
  stop(): void {
    if (this.controller === null) return
    this.controller.abort()
    this.controller = null
    this.followed = null
  }

  private begin(): AbortController {
    this.controller?.abort()
    const controller = new AbortController()
    this.controller = controller
    this.followed = null
    return controller
  }

  private mine(controller: AbortController): boolean {
    return this.controller === controller && !controller.signal.aborted
  }

  /** Marks the task followed before following it, so an attach from a callback finds it. */
  private start(controller: AbortController, taskId: string, task: string | AgentTask
  ): Promise<AgentTask | null> {
    const followed: { id: string; outcome: Promise<AgentTask | null> } = { id: taskId, outcome: Promise.resolve(null) }
    this.followed = followed
    followed.outcome = this.follow(controller, task)
    return followed.outcome
  }

  private async follow(controller: AbortController, task: string | AgentTask): Promise<AgentTask | null> {
    try {
      const done = await this.tasks.watchAgentTask(task, (row) => {
        if (!this.mine(controller)) return
        // A final row waits for the outcome, so `status` and `error` change together (and
        // the question shown goes with its status).
        const final = isFinal(row)
        const question = final ? this.state.waitingFor : questionOf(row)
        const status = final ? this.state.status : question ? 'waiting' : row.status
        this.set(stateOf(status, row.id, row, null, question))
        this.options.onUpdate?.(row)
      }, { ...callOptions(this.options), signal: controller.signal })
      if (!this.mine(controller)) return null
      this.controller = null
      this.set(stateOf('completed', done.id, done, null))
      this.options.onComplete?.(done)
      return done
    } catch (err) {
      return this.fail(controller, err)
    }
  }

  private fail(controller: AbortController, err: unknown): null {
    if (!this.mine(controller)) return null
    this.controller = null
    const failure = err instanceof Error ? err : new AgentBridgeError(String(err))
    const task = failure instanceof TaskFailedError ? failure.task : this.state.currentTask
    // Not the task's end (a timeout, a refusal, not found): attaching again follows it anew.
    if (!(failure instanceof TaskFailedError)) this.followed = null
    this.set(stateOf('failed', this.state.taskId, task, failure))
    this.options.onError?.(failure)
    return null
  }

  private set(state: AgentTaskState): void {
    this.state = state
    for (const listener of [...this.listeners]) listener()
  }
}
