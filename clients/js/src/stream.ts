/** A streamed answer rebuilt from its chunks (`agent_task_chunks`), in any arrival order. */
import { micros } from './rows.js'
import type { AgentTaskChunk } from './types.js'

export function isChunk(value: unknown): value is AgentTaskChunk {
  if (typeof value !== 'object' || value === null) return false
  const c = value as Record<string, unknown>
  return typeof c.task_id === 'string' && typeof c.attempt === 'number' && typeof c.seq === 'number' &&
    typeof c.answer_offset === 'number' && typeof c.text === 'string' && typeof c.created_at === 'string'
}

function codePoints(text: string): number {
  let n = 0
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i)
    // A high surrogate followed by a low one is one character, as in Postgres and Python.
    if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1)
      if (next >= 0xdc00 && next <= 0xdfff) i++
    }
    n++
  }
  return n
}

/** The chunks of one attempt, and the answer the contiguous ones rebuild. A chunk with
 * `answer_offset` 0 starts the answer over (the first of a holder, or after a failed
 * write), so it replaces every chunk written before it. */
export class StreamedAnswer {
  /** The attempt these chunks belong to (-1: none yet). */
  attempt = -1
  /** The rebuilt answer; null until the chunks from a start (offset 0) are here. */
  answer: string | null = null
  /** A chunk is missing before the latest ones: read them. */
  missing = false
  /** The seq the answer is rebuilt up to (-1: none): a read asks for the chunks after it. */
  last = -1
  private chunks = new Map<number, AgentTaskChunk>()
  private floor = Number.NEGATIVE_INFINITY
  private length = 0 // of `answer`, in code points

  /** Forget every chunk: a newer attempt, or the row's own payload replaced them (chunks
   * created at or before `floor`, microseconds, are ignored from now on). */
  reset(attempt: number, floor = Number.NEGATIVE_INFINITY): void {
    this.attempt = attempt
    this.floor = floor
    this.chunks.clear()
    this.answer = null
    this.length = 0
    this.last = -1
    this.missing = false
  }

  /** Take a chunk (from an event or a read); true when the answer changed. */
  add(chunk: AgentTaskChunk): boolean {
    if (chunk.attempt < this.attempt) return false
    if (chunk.attempt > this.attempt) this.reset(chunk.attempt)
    const at = micros(chunk.created_at)
    if (at <= this.floor) return false
    const had = this.chunks.get(chunk.seq)
    if (had && micros(had.created_at) >= at) return false // the same piece again (an event and a read)
    if (chunk.answer_offset === 0) {
      // A start: what was written before it is replaced.
      for (const [seq, c] of this.chunks) {
        if (seq < chunk.seq || micros(c.created_at) < at) this.chunks.delete(seq)
      }
    } else {
      const start = this.startChunk()
      if (start && micros(start.created_at) > at) return false // from before the latest start
    }
    this.chunks.set(chunk.seq, chunk)
    const before = this.answer
    if (this.answer !== null && chunk.seq === this.last + 1 && chunk.answer_offset > 0) {
      this.extend()
    } else {
      this.rebuild()
    }
    return this.answer !== before
  }

  private startChunk(): AgentTaskChunk | undefined {
    let first: AgentTaskChunk | undefined
    for (const c of this.chunks.values()) if (!first || c.seq < first.seq) first = c
    return first?.answer_offset === 0 ? first : undefined
  }

  private append(chunk: AgentTaskChunk): void {
    const base = this.answer ?? ''
    const kept = chunk.answer_offset >= this.length ? base
      : Array.from(base).slice(0, chunk.answer_offset).join('')
    this.answer = kept + chunk.text
    this.length = Math.min(chunk.answer_offset, this.length) + codePoints(chunk.text)
    this.last = chunk.seq
  }

  /** Apply the chunks that follow the last one applied. */
  private extend(): void {
    for (let next = this.chunks.get(this.last + 1); next; next = this.chunks.get(this.last + 1)) {
      const prev = this.chunks.get(this.last)
      // Pieces of one holder are written in order; an older one after a newer one is left
      // over from an earlier holder, and what is missing must be read.
      if (prev && micros(next.created_at) < micros(prev.created_at)) break
      this.append(next)
    }
    this.missing = [...this.chunks.keys()].some((seq) => seq > this.last)
  }

  private rebuild(): void {
    const start = this.startChunk()
    this.answer = null
    this.length = 0
    this.last = -1
    if (!start) {
      this.missing = this.chunks.size > 0
      return
    }
    this.answer = start.text
    this.length = codePoints(start.text)
    this.last = start.seq
    this.extend()
  }
}
