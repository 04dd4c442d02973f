/**
 * The integration guide's React hook: `useAgentTask({ enterpriseId, onComplete, onError })` returns
 * `{ submitTask, isSubmitting, isProcessing, currentTask, error }` plus `status`, `taskId`,
 * `cancelTask`, `attachTask`, and for a task that asks its user `isWaiting`, `waitingFor`,
 * `answer`; `useAgentTask({ taskId })` re-attaches to a running task.
 * Imported from `agent-bridge-client/react`, so apps without React never load it.
 */
import type { SupabaseClient } from '@supabase/supabase-js'
import { createContext, createElement, useCallback, useContext, useEffect, useMemo,
  useSyncExternalStore, type ReactNode } from 'react'

import { AgentBridgeError } from './errors.js'
import { createAgentTasks, type AgentTasks } from './index.js'
import { AgentTaskStore, type AgentTaskState, type AgentTaskStoreOptions } from './store.js'
import type { AgentTask, AgentTaskStatus, Json, SubmitInput } from './types.js'

type ClientOrTasks = SupabaseClient | AgentTasks

const AgentTasksContext = createContext<AgentTasks | null>(null)

function toTasks(client: ClientOrTasks): AgentTasks {
  return 'submitAgentTask' in client ? client : createAgentTasks(client)
}

/** Makes a Supabase client (or createAgentTasks' result) available to useAgentTask. */
export function AgentTasksProvider(props: { client: ClientOrTasks; children?: ReactNode }): ReactNode {
  const tasks = useMemo(() => toTasks(props.client), [props.client])
  return createElement(AgentTasksContext.Provider, { value: tasks }, props.children)
}

export interface UseAgentTaskOptions extends AgentTaskStoreOptions {
  /** The Supabase client, when there is no AgentTasksProvider above. */
  client?: ClientOrTasks
  /**
   * Follow this existing task (e.g. an id kept in the URL across a page reload) with the same
   * guarantees as after a submit. A new id follows that task instead; an unset one changes
   * nothing (so an app may pass back the `taskId` the hook returns).
   */
  taskId?: string | null
}

export interface UseAgentTaskResult extends AgentTaskState {
  /** Submit and follow; resolves with the completed row, or null (see `error`). Never rejects. */
  submitTask: (input: SubmitInput) => Promise<AgentTask | null>
  /** Follow an existing task by id, as the `taskId` option does. Never rejects. */
  attachTask: (taskId: string) => Promise<AgentTask | null>
  /** Stop the current task (the Stop button); resolves with its status after the call. */
  cancelTask: () => Promise<AgentTaskStatus | null>
  /** Answer what the current task asked (`waitingFor`; the Approve / Deny buttons); resolves
   * with its status after the call (`pending`: it goes on), null with no task. Rejects with
   * RequestRefusedError when the database refuses it (answered already, expired, ...). */
  answer: (answer: Json) => Promise<AgentTaskStatus | null>
  /** Forget the current task and stop following it. */
  reset: () => void
}

/**
 * `{ status, submitTask, attachTask, cancelTask, answer, reset, isSubmitting, isProcessing,
 * isWaiting, waitingFor, currentTask, taskId, error }`; `isSubmitting`, `isProcessing` and
 * `isWaiting` are derived from `status`.
 */
export function useAgentTask(options: UseAgentTaskOptions = {}): UseAgentTaskResult {
  const fromContext = useContext(AgentTasksContext)
  const { client, taskId } = options
  const tasks = useMemo(() => (client ? toTasks(client) : fromContext), [client, fromContext])
  if (tasks === null) {
    throw new AgentBridgeError('useAgentTask needs a Supabase client: pass { client } or wrap the app in <AgentTasksProvider client={supabase}>')
  }
  // A reloaded page renders `attaching` from the first render (only the first taskId matters
  // here); the effect below attaches.
  const store = useMemo(() => new AgentTaskStore(tasks, {}, taskId), [tasks])
  // The latest callbacks and options, read when a call starts or an update arrives.
  store.options = options
  const state = useSyncExternalStore(store.subscribe, store.getSnapshot, store.getSnapshot)

  // The channel goes with the component (a remount attaches again, below).
  useEffect(() => () => store.stop(), [store])
  useEffect(() => {
    if (taskId) void store.attach(taskId)
  }, [store, taskId])

  const submitTask = useCallback((input: SubmitInput) => store.submit(input), [store])
  const attachTask = useCallback((id: string) => store.attach(id), [store])
  const cancelTask = useCallback(() => store.cancel(), [store])
  const answer = useCallback((value: Json) => store.answer(value), [store])
  const reset = useCallback(() => store.reset(), [store])
  return { ...state, submitTask, attachTask, cancelTask, answer, reset }
}

export type { AgentTask, AgentTaskStatus, AgentTaskWaitingFor, Json, SubmitInput } from './types.js'
export type { AgentTaskState, AgentTaskStoreOptions, AgentTaskStoreStatus } from './store.js'
export { RequestRefusedError, TaskCancelledError, TaskFailedError } from './errors.js'
