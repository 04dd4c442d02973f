/**
 * Follow one task to its end without missing an update.
 *
 * A Realtime subscription is not a snapshot, so: join the channel first, read the row once
 * joined (and again when Realtime says the database subscription is live), then apply
 * events in order, ignoring any state older than the one shown (`updated_at`). When the
 * channel fails (CHANNEL_ERROR, TIMED_OUT, closed), read the row at once and rejoin with
 * backoff. A slow poll covers a Realtime that is silent without saying so; a page coming
 * back to the foreground or online reads at once.
 *
 * The channel is the task's private Broadcast topic first (`agent_task:<id>`: the database
 * sends each state and streamed piece there), and `postgres_changes` on the tables when
 * Realtime refuses that join (broadcasting off, an older schema without the policy, or not
 * the user's task); both go through the same reads and the same order (channel.ts).
 *
 * A streamed answer is not written into the row: the worker appends it in pieces
 * (`agent_task_chunks`, one INSERT per write), which come on the same channel; every read of
 * a processing row reads its attempt's chunks after the last one held too, and so does a
 * missing piece. The answer they rebuild is shown as the row's `response_payload`
 * `{ answer, partial: true }`, as if the row held it; the row's own final state replaces it.
 */
import type { PostgrestError, SupabaseClient } from '@supabase/supabase-js'

import { listen, refused, topicOf, type Path } from './channel.js'
import { TaskNotFoundError, TaskTimeoutError, failureOf } from './errors.js'
import { isAgentTask, isFinal, isNewer, micros, rowOf } from './rows.js'
import { isChunk, StreamedAnswer } from './stream.js'
import { CHUNK_COLUMNS, CHUNKS_TABLE, TABLE, TASK_COLUMNS, type AgentTask, type OnUpdate,
  type WatchOptions } from './types.js'

const DEFAULT_POLL_MS = 20_000
const DEFAULT_REJOIN_MS = 250
const MAX_REJOIN_MS = 10_000
const CHUNK_PAGE = 1000 // Supabase's default max rows; a read pages on until a page is empty
const MAX_CHUNK_PAGES = 100

/** The debug option as a function (or nothing). */
function logger(debug: WatchOptions['debug'], taskId: string): (message: string) => void {
  if (typeof debug === 'function') return (message) => debug(`agent-bridge: task ${taskId}: ${message}`)
  if (debug) return (message) => console.debug(`agent-bridge: task ${taskId}: ${message}`)
  return () => undefined
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
    const log = logger(options.debug, taskId)
    let shown: AgentTask | null = null // the latest state of the row itself
    let lastView: AgentTask | null = null // what onUpdate was last called with
    let lastRow: AgentTask | null = null // the row it was made from
    let lastAnswer: string | null = null
    const stream = new StreamedAnswer()
    let chunkRead: Promise<void> | null = null
    let readAgain = false
    let done = false
    let path: Path = 'broadcast' // until Realtime refuses the join
    let stopListening: (() => void) | null = null
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

    /** The row as the app sees it: while it runs, with the answer its chunks rebuild. */
    const view = (row: AgentTask): AgentTask => {
      const attempt = row.attempts ?? stream.attempt
      if (row.status !== 'processing' || stream.answer === null || attempt !== stream.attempt) return row
      return { ...row, response_payload: { answer: stream.answer, partial: true } }
    }

    const show = (row: AgentTask): void => {
      const next = view(row)
      const answer = next === row ? null : stream.answer
      if (row === lastRow && answer === lastAnswer) return // nothing new to show
      lastRow = row
      lastView = next
      lastAnswer = answer
      try {
        onUpdate?.(next)
      } catch (err) {
        // A throwing callback is the app's bug; it must not stop the watch.
        queueMicrotask(() => { throw err })
      }
    }

    const apply = (row: unknown): void => {
      if (done || !isAgentTask(row) || row.id !== taskId || !isNewer(row, shown)) return
      const before = shown
      shown = row
      if (row.attempts !== undefined && row.attempts > stream.attempt) stream.reset(row.attempts)
      else if (before?.status === 'processing' && row.status === 'processing' &&
               JSON.stringify(before.response_payload) !== JSON.stringify(row.response_payload)) {
        // The row's own payload was written (a retry, another holder, a full progress
        // write): the chunks before it are gone from the table.
        stream.reset(row.attempts ?? stream.attempt, micros(row.updated_at))
      }
      show(row)
      if (row.status === 'completed') finish(() => resolve(row))
      else if (isFinal(row)) finish(() => reject(failureOf(row)))
    }

    /** A state from the channel: a whole row, or a Broadcast `state` over the row shown. */
    const onState = (state: unknown): void => {
      if (done) return
      const row = rowOf(state, shown)
      if (row === null) void read()
      else apply(row)
    }

    const onChunk = (chunk: unknown): void => {
      if (done) return
      if (!isChunk(chunk) || chunk.task_id !== taskId) {
        void readChunks()
        return
      }
      if (!stream.add(chunk) && !stream.missing) return
      if (stream.missing) void readChunks()
      // A piece of an attempt the row does not show yet: the row's event was lost.
      if (shown === null || shown.status !== 'processing' ||
          (shown.attempts !== undefined && shown.attempts < chunk.attempt)) void read()
      else show(shown)
    }

    /** The chunks of the attempt shown after the last one the answer holds, in pages by
     * seq; one read at a time (and one more if asked for meanwhile). */
    const readChunks = (): Promise<void> => {
      if (chunkRead) {
        readAgain = true
        return chunkRead
      }
      chunkRead = (async () => {
        try {
          do {
            readAgain = false
            await readChunksOnce()
          } while (readAgain && !done)
        } finally {
          chunkRead = null
        }
      })()
      return chunkRead
    }

    const readChunksOnce = async (): Promise<void> => {
      if (done || shown === null || shown.status !== 'processing') return
      const attempt = shown.attempts
      let after = attempt === undefined || attempt === stream.attempt ? stream.last : -1
      let changed = false
      for (let page = 0; page < MAX_CHUNK_PAGES; page++) {
        let query = supabase.from(CHUNKS_TABLE).select(CHUNK_COLUMNS).eq('task_id', taskId)
        if (attempt !== undefined) query = query.eq('attempt', attempt)
        const { data, error }: { data: unknown; error: PostgrestError | null } =
          await query.gt('seq', after).order('attempt').order('seq').limit(CHUNK_PAGE)
        if (done || error || !Array.isArray(data)) break // transient: the next trigger reads
        const rows = data.filter(isChunk)
        if (rows.length === 0) break
        for (const chunk of rows) changed = stream.add(chunk) || changed
        after = Math.max(...rows.map((c) => c.seq))
      }
      if (changed && !done && shown !== null) show(shown)
    }

    const read = async (): Promise<void> => {
      if (done) return
      const { data, error }: { data: unknown; error: PostgrestError | null } =
        await supabase.from(TABLE).select(TASK_COLUMNS).eq('id', taskId).maybeSingle()
      if (done) return
      if (error) return // transient (network, gateway): the next trigger reads again
      if (data === null) {
        finish(() => reject(new TaskNotFoundError(taskId)))
        return
      }
      apply(data)
      if (!done && shown?.status === 'processing') await readChunks()
    }

    const leave = (): void => {
      stopListening?.()
      stopListening = null
    }

    const onStatus = (status: string, err?: Error): void => {
      if (done) return
      if (status === 'SUBSCRIBED') {
        failures = 0
        log(path === 'broadcast' ? `following by Broadcast on ${topicOf(path, taskId)}`
          : 'following by postgres_changes')
        void read()
        return
      }
      leave()
      if (path === 'broadcast' && refused(err)) {
        // The other path at once; it reads once joined.
        path = 'postgres_changes'
        log(`Broadcast join refused (${err?.message ?? status}); falling back to postgres_changes`)
        join()
        return
      }
      // CHANNEL_ERROR, TIMED_OUT or CLOSED: catch up by reading, then join a fresh channel
      // after a backoff (realtime-js' own rejoin does not always recover).
      void read()
      const delay = Math.min(MAX_REJOIN_MS, firstRejoinMs * 2 ** failures)
      failures += 1
      log(`channel ${status}${err ? ` (${err.message})` : ''}; joining again in ${Math.round(delay)} ms`)
      clearTimeout(rejoinTimer)
      rejoinTimer = setTimeout(join, delay * (0.75 + Math.random() * 0.5))
    }

    const join = (): void => {
      if (done) return
      stopListening = listen(supabase, path, taskId, {
        status: onStatus,
        state: onState,
        chunk: onChunk,
        read: (what) => void (what === 'row' ? read() : readChunks()),
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
      timeoutTimer = setTimeout(() => finish(() => reject(new TaskTimeoutError(taskId, ms, lastView ?? shown))), ms)
    }
    if (initial) apply(initial)
    join()
  })
}
