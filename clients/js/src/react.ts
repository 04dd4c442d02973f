/**
 * The guide's React hook: `useAgentTask({ enterpriseId, onComplete, onError })` returns
 * `{ submitTask, isSubmitting, isProcessing, currentTask, error }` plus `cancelTask`.
 * Imported from `agent-bridge-client/react`, so apps without React never load it.
 */
import type { SupabaseClient } from '@supabase/supabase-js'
import { createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef,
  useState, type ReactNode } from 'react'

import { AgentBridgeError } from './errors.js'
import { createAgentTasks, type AgentTasks } from './index.js'
import type { AgentTask, AgentTaskStatus, OnUpdate, SubmitInput, SubmitOptions } from './types.js'

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

export interface UseAgentTaskOptions extends SubmitOptions {
  /** The Supabase client, when there is no AgentTasksProvider above. */
  client?: ClientOrTasks
  onComplete?: (task: AgentTask) => void
  /** Failures, refusals and timeouts; a cancelled task arrives as TaskCancelledError. */
  onError?: (error: Error) => void
  onUpdate?: OnUpdate
}

export interface UseAgentTaskResult {
  /** Submit and follow; resolves with the completed row, or null (see `error`). Never rejects. */
  submitTask: (input: SubmitInput) => Promise<AgentTask | null>
  /** Stop the current task (the Stop button); resolves with its status after the call. */
  cancelTask: () => Promise<AgentTaskStatus | null>
  /** Forget the current task and stop following it. */
  reset: () => void
  /** The insert is in flight. */
  isSubmitting: boolean
  /** The task is inserted and not finished yet. */
  isProcessing: boolean
  /** The latest state of the current task (partial answers included). */
  currentTask: AgentTask | null
  error: Error | null
}

export function useAgentTask(options: UseAgentTaskOptions = {}): UseAgentTaskResult {
  const fromContext = useContext(AgentTasksContext)
  const { client } = options
  const tasks = useMemo(() => (client ? toTasks(client) : fromContext), [client, fromContext])
  if (tasks === null) {
    throw new AgentBridgeError('useAgentTask needs a Supabase client: pass { client } or wrap the app in <AgentTasksProvider client={supabase}>')
  }
  const latest = useRef(options)
  latest.current = options
  const current = useRef<AbortController | null>(null)
  const [isSubmitting, setSubmitting] = useState(false)
  const [isProcessing, setProcessing] = useState(false)
  const [currentTask, setCurrentTask] = useState<AgentTask | null>(null)
  const [error, setError] = useState<Error | null>(null)

  // The channel goes with the component.
  useEffect(() => () => current.current?.abort(), [])

  const submitTask = useCallback(async (input: SubmitInput): Promise<AgentTask | null> => {
    current.current?.abort()
    const controller = new AbortController()
    current.current = controller
    const mine = (): boolean => current.current === controller
    const { onComplete, onError, onUpdate, client: _client, ...submitOptions } = latest.current
    setSubmitting(true)
    setProcessing(false)
    setError(null)
    setCurrentTask(null)
    let inserted = false
    try {
      const task = await tasks.insertAgentTask(input, { ...submitOptions, signal: controller.signal })
      inserted = true
      if (!mine()) return null
      setSubmitting(false)
      setProcessing(true)
      const done = await tasks.watchAgentTask(task, (row) => {
        if (!mine()) return
        setCurrentTask(row)
        onUpdate?.(row)
      }, { ...submitOptions, signal: controller.signal })
      if (mine()) onComplete?.(done)
      return done
    } catch (err) {
      if (!mine() || controller.signal.aborted) return null
      const failure = err instanceof Error ? err : new AgentBridgeError(String(err))
      setError(failure)
      onError?.(failure)
      return null
    } finally {
      if (mine()) {
        setSubmitting(false)
        setProcessing(false)
        if (!inserted) current.current = null
      }
    }
  }, [tasks])

  const cancelTask = useCallback(async (): Promise<AgentTaskStatus | null> => {
    const id = currentTask?.id
    return id ? tasks.cancelAgentTask(id) : null
  }, [tasks, currentTask?.id])

  const reset = useCallback((): void => {
    current.current?.abort()
    current.current = null
    setSubmitting(false)
    setProcessing(false)
    setCurrentTask(null)
    setError(null)
  }, [])

  return { submitTask, cancelTask, reset, isSubmitting, isProcessing, currentTask, error }
}

export type { AgentTask, AgentTaskStatus, SubmitInput } from './types.js'
export { TaskCancelledError, TaskFailedError } from './errors.js'
