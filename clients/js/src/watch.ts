/**
 * Follow one task to its end without missing an update.
 *
 * A Realtime subscription is not a snapshot, so: join the channel first, read the row once
 * joined (and again when Realtime says the database subscription is live), then apply
 * events in order, ignoring any state older than the one shown (`updated_at`). When the
 * channel fails (CHANNEL_ERROR, TIMED_OUT, closed), read the row at once and rejoin with
 * backoff. A slow poll covers a Realtime that is silent without saying so; a page coming
 * back to the foreground or online reads at once.
 */
import type { PostgrestError, RealtimeChannel, SupabaseClient } from '@supabase/supabase-js'

import { TaskNotFoundError, TaskTimeoutError, failureOf } from './errors.js'
import { isAgentTask, isFinal, isNewer } from './rows.js'
import { TABLE, type AgentTask, type OnUpdate, type WatchOptions } from './types.js'

const DEFAULT_POLL_MS = 20_000
const DEFAULT_REJOIN_MS = 250
const MAX_REJOIN_MS = 10_000

let channelSeq = 0

interface ChangePayload {
  new?: unknown
  errors?: unknown
}

interface SystemPayload {
  extension?: unknown
  status?: unknown
}

/** Resolves with the `completed` row; rejects with TaskFailedError / TaskCancelledError for a
 * `failed` row, TaskTimeoutError, TaskNotFoundError, or the signal's reason. */
export function watchAgentTask(
  supabase: SupabaseClient,
  taskId: string,
  onUpdate?: OnUpdate,
  options: WatchOptions = {},
  initial: AgentTask | null = null,
): Promise<AgentTask> {
  return new Promise<AgentTask>((resolve, reject) => {
    const pollMs = options.pollInterval ?? DEFAULT_POLL_MS
    const firstRejoinMs = options.rejoinDelay ?? DEFAULT_REJOIN_MS
    let shown: AgentTask | null = null
    let done = false
    let channel: RealtimeChannel | null = null
    let failures = 0
    let rejoinTimer: ReturnType<typeof setTimeout> | undefined
    let timeoutTimer: ReturnType<typeof setTimeout> | undefined
    const pollTimer = setInterval(() => void read(), pollMs)

    const finish = (outcome: () => void): void => {
      if (done) return
      done = true
      clearInterval(pollTimer)
      clearTimeout(rejoinTimer)
      clearTimeout(timeoutTimer)
      options.signal?.removeEventListener('abort', onAbort)
      removeWakeListeners()
      leave()
      outcome()
    }

    const apply = (row: unknown): void => {
      if (done || !isAgentTask(row) || row.id !== taskId || !isNewer(row, shown)) return
      shown = row
      try {
        onUpdate?.(row)
      } catch (err) {
        // A throwing callback is the app's bug; it must not stop the watch.
        queueMicrotask(() => { throw err })
      }
      if (row.status === 'completed') finish(() => resolve(row))
      else if (isFinal(row)) finish(() => reject(failureOf(row)))
    }

    const read = async (): Promise<void> => {
      if (done) return
      const { data, error }: { data: unknown; error: PostgrestError | null } =
        await supabase.from(TABLE).select('*').eq('id', taskId).maybeSingle()
      if (done) return
      if (error) return // transient (network, gateway): the next trigger reads again
      if (data === null) {
        finish(() => reject(new TaskNotFoundError(taskId)))
        return
      }
      apply(data)
    }

    const leave = (): void => {
      const old = channel
      channel = null
      if (old) void supabase.removeChannel(old).catch(() => undefined)
    }

    const join = (): void => {
      if (done) return
      channelSeq += 1
      const ch = supabase.channel(`agent-task-${taskId}-${channelSeq}`)
      channel = ch
      ch.on('postgres_changes',
        { event: 'UPDATE', schema: 'public', table: TABLE, filter: `id=eq.${taskId}` },
        (payload: ChangePayload) => {
          // Realtime drops columns from oversized or unauthorised records: read the row.
          if (Array.isArray(payload.errors) && payload.errors.length > 0) void read()
          else if (isAgentTask(payload.new)) apply(payload.new)
          else void read()
        })
        .on('system', {}, (payload: SystemPayload) => {
          // "Subscribed to PostgreSQL": changes flow from here on; anything committed
          // between the join reply and this moment was not sent, so read again.
          if (payload.extension === 'postgres_changes' && payload.status === 'ok') void read()
        })
        .subscribe((status) => {
          if (done || channel !== ch) return
          if (String(status) === 'SUBSCRIBED') {
            failures = 0
            void read()
          } else {
            // CHANNEL_ERROR, TIMED_OUT or CLOSED: catch up by reading, then rejoin on a
            // fresh channel after a backoff (realtime-js' own rejoin does not always recover).
            void read()
            leave()
            const delay = Math.min(MAX_REJOIN_MS, firstRejoinMs * 2 ** failures)
            failures += 1
            clearTimeout(rejoinTimer)
            rejoinTimer = setTimeout(join, delay * (0.75 + Math.random() * 0.5))
          }
        })
    }

    const onAbort = (): void => {
      const reason: unknown = options.signal?.reason
      finish(() => reject(reason instanceof Error ? reason : new DOMException('aborted', 'AbortError')))
    }

    // A tab back in the foreground or back online may have slept through anything.
    const wake = (): void => {
      if (typeof document === 'undefined' || document.visibilityState !== 'hidden') void read()
    }
    const target = globalThis as { addEventListener?: (t: string, f: () => void) => void;
      removeEventListener?: (t: string, f: () => void) => void }
    const doc = typeof document === 'undefined' ? undefined : document
    target.addEventListener?.('online', wake)
    doc?.addEventListener('visibilitychange', wake)
    const removeWakeListeners = (): void => {
      target.removeEventListener?.('online', wake)
      doc?.removeEventListener('visibilitychange', wake)
    }

    if (options.signal?.aborted) {
      onAbort()
      return
    }
    options.signal?.addEventListener('abort', onAbort)
    if (options.timeout !== undefined) {
      const ms = options.timeout
      timeoutTimer = setTimeout(() => finish(() => reject(new TaskTimeoutError(taskId, ms, shown))), ms)
    }
    if (initial) apply(initial)
    join()
  })
}
