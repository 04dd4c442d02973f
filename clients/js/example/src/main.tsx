/**
 * The example page: type a prompt, watch the answer grow, press Stop. The task's id is kept
 * in the address (`?task=`), so a reload re-attaches to it and shows it to its end. When the
 * task's handler asks its user something (human in the loop), the page shows the question
 * with Approve / Deny, and the task goes on with the answer.
 *
 * A real app signs its users in with supabase.auth; this page takes the project URL, the
 * anon key and a user's access token from its query string (`?url=&key=&token=`), so the
 * test can run it against the local stand-ins. `context` (JSON) is sent with each prompt;
 * with `debug`, the client says in the console which path it follows each task by.
 */
import { createClient } from '@supabase/supabase-js'
import { useEffect, useState } from 'react'
import { createRoot } from 'react-dom/client'

import { AgentTasksProvider, TaskCancelledError, useAgentTask, type AgentTaskWaitingFor, type Json
} from 'agent-bridge-client/react'

const params = new URLSearchParams(window.location.search)
const token = params.get('token') ?? ''
const supabase = createClient(params.get('url') ?? 'http://127.0.0.1:54321', params.get('key') ?? '', {
  accessToken: () => Promise.resolve(token),
})
const context = JSON.parse(params.get('context') ?? '{}') as Record<string, string | number>
const debug = params.has('debug')

/** The question's text: the handler's own text, or the `text` of an object it asked. */
function textOf(question: Json): string {
  if (typeof question === 'string') return question
  if (typeof question === 'object' && question !== null && !Array.isArray(question) &&
      typeof question.text === 'string') return question.text
  return JSON.stringify(question)
}

/** What the task asked, with Approve / Deny (one of each question's own: keyed by its number). */
function Question(props: { waitingFor: AgentTaskWaitingFor; answer: (value: Json) => Promise<unknown> }
): React.JSX.Element {
  const { waitingFor, answer } = props
  const [busy, setBusy] = useState(false) // answered: off until the change arrives
  const [refused, setRefused] = useState<string | null>(null)
  const send = (value: string): void => {
    setBusy(true)
    setRefused(null)
    // A refusal (answered elsewhere, expired) says why; the task's own state comes by itself.
    answer(value).catch((err: unknown) => {
      setBusy(false)
      setRefused(err instanceof Error ? err.message : String(err))
    })
  }
  return (
    <section className="question" data-testid="question">
      <p>{textOf(waitingFor.question)}</p>
      <button onClick={() => send('approve')} disabled={busy}>Approve</button>
      <button onClick={() => send('deny')} disabled={busy}>Deny</button>
      <small> until {new Date(waitingFor.expires_at).toLocaleString()}</small>
      {refused && <p className="error" data-testid="answer-error">{refused}</p>}
    </section>
  )
}

function Chat(): React.JSX.Element {
  const [prompt, setPrompt] = useState('')
  const [reloaded] = useState(() => params.get('task'))
  const {
    submitTask, cancelTask, answer, status, taskId, isSubmitting, isProcessing, isWaiting, waitingFor,
    currentTask, error,
  } = useAgentTask({
    taskId: reloaded,
    debug,
    onComplete: (task) => console.log('Task completed:', task.response_payload?.answer),
    onError: (err) => console.error('Task failed:', err.message),
  })
  // Keep the id in the address, so a reload follows the same task.
  useEffect(() => {
    const url = new URL(window.location.href)
    if (taskId) url.searchParams.set('task', taskId)
    else url.searchParams.delete('task')
    window.history.replaceState(null, '', url)
  }, [taskId])
  const shown = currentTask?.response_payload?.answer
  const stopped = error instanceof TaskCancelledError
  return (
    <main>
      <h1>Ask the agent</h1>
      <textarea aria-label="prompt" rows={3} value={prompt} onChange={(e) => setPrompt(e.target.value)} />
      <div>
        <button onClick={() => void submitTask({ prompt, context })}
          disabled={isSubmitting || isProcessing || isWaiting || !prompt}>
          {isSubmitting ? 'Sending…' : 'Send'}
        </button>
        <button onClick={() => void cancelTask()} disabled={!isProcessing && !isWaiting}>Stop</button>
      </div>
      {waitingFor && <Question key={waitingFor.number} waitingFor={waitingFor} answer={answer} />}
      <p className="status" data-testid="status">
        {stopped ? 'stopped' : `${status}${isProcessing && currentTask?.response_payload?.partial ? ' · streaming' : ''}`}
      </p>
      <div className="answer" data-testid="answer">{shown ?? ''}</div>
      {error && !stopped && <p className="error" data-testid="error">{error.message}</p>}
    </main>
  )
}

const root = document.getElementById('root')
if (root) {
  createRoot(root).render(
    <AgentTasksProvider client={supabase}>
      <Chat />
    </AgentTasksProvider>,
  )
}
