// The example page in headless Chromium (Debian's, via playwright-core; nothing downloads a
// browser), on the path this run's database gives it (REALTIME_PATH: Broadcast, or
// postgres_changes after a refused join), checked from the client's debug lines:
// type a prompt, watch the answer grow in order through a dropped socket, press Stop; send
// again, lose events and drop the socket (the rejoin reads what was missed), reload the page
// mid-stream, see it re-attach to the task and show its end; reload once it is finished (the
// guide's race); open another user's task (its topic refused, not found); save a screenshot;
// human in the loop: send a prompt whose handler asks, see the question (again after a
// reload), press Approve, see the answer that says so.
// Run by tests/acceptance/test_frontend.py with the stand-ins' addresses in the environment.
/* global fetch, setTimeout, URLSearchParams, window, MutationObserver -- node 20's, and the page's in evaluate() */
import { createHmac, randomUUID } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { createServer } from 'node:http'
import { extname, join } from 'node:path'

import { chromium } from 'playwright-core'

const env = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set`)
  return process.env[name]
}
const PATH = env('REALTIME_PATH')
const b64 = (data) => Buffer.from(data).toString('base64url')
function userToken(sub) {
  const now = Math.floor(Date.now() / 1000)
  const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64(JSON.stringify({ aud: 'authenticated', role: 'authenticated', sub, iat: now, exp: now + 3600 }))
  return `${head}.${body}.${b64(createHmac('sha256', env('TEST_JWT_SECRET')).update(`${head}.${body}`).digest())}`
}
const realtime = async (name, params = {}) =>
  (await fetch(`${env('REALTIME_CONTROL_URL')}/control/${name}?${new URLSearchParams(params)}`)).json()
/** How many pieces of the task's answer the database holds (read as the service). */
async function piecesOnServer(id) {
  const key = env('SUPABASE_SERVICE_KEY')
  const response = await fetch(`${env('SUPABASE_URL')}/rest/v1/agent_task_chunks?select=seq&task_id=eq.${id}`,
    { headers: { apikey: key, Authorization: `Bearer ${key}` } })
  return (await response.json()).length
}
const check = (ok, message) => { if (!ok) throw new Error(message) }
/** Resolve once `condition()` holds (polled every 50 ms; 30 s at most). */
async function until(what, condition) {
  const deadline = Date.now() + 30_000
  while (!(await condition())) {
    check(Date.now() < deadline, `timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

// The page, served from its own origin (the gateway answers CORS as Supabase's does).
const root = new URL('.', import.meta.url).pathname
const types = { '.html': 'text/html', '.js': 'text/javascript' }
const server = createServer(async (req, res) => {
  const path = new URL(req.url, 'http://x').pathname
  try {
    const body = await readFile(join(root, path === '/' ? 'index.html' : path))
    res.writeHead(200, { 'Content-Type': types[extname(path || '.html')] ?? 'text/html' }).end(body)
  } catch {
    res.writeHead(404).end()
  }
})
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
const pageUrl = new URL(`http://127.0.0.1:${server.address().port}/`)
pageUrl.searchParams.set('url', env('SUPABASE_URL'))
pageUrl.searchParams.set('key', env('SUPABASE_ANON_KEY'))
const pageFor = (token, task) => {
  const url = new URL(pageUrl)
  url.searchParams.set('token', token)
  if (task) url.searchParams.set('task', task)
  return url.href
}
pageUrl.searchParams.set('context', JSON.stringify({ chunks: 60, delay: 0.15 }))
pageUrl.searchParams.set('debug', '')

const context = await chromium.launchPersistentContext(env('BROWSER_PROFILE'), {
  executablePath: env('CHROMIUM'),
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 900, height: 640 },
})
const errors = []
const debug = [] // the client's debug lines, from every page
/** The paths the watches of task `id` followed, one per join. */
const paths = (id) => debug.filter((l) => l.includes(id))
  .flatMap((l) => /following by (Broadcast|postgres_changes)/.exec(l)?.[1] ?? [])
  .map((p) => (p === 'Broadcast' ? 'broadcast' : p))
const refused = (id) => debug.some((l) => l.includes(id) && l.includes('Broadcast join refused'))
function assertFollowed(id) {
  check(paths(id).length > 0 && paths(id).every((p) => p === PATH),
    `task ${id} followed by ${paths(id).join(', ') || 'nothing'}, not ${PATH}:\n${debug.join('\n')}`)
  check(refused(id) === (PATH === 'postgres_changes'), `the Broadcast join of ${id}: refused ${refused(id)} on ${PATH}`)
}
const words = (text) => text.split(' ').filter(Boolean).length
try {
  const page = context.pages()[0] ?? await context.newPage()
  page.on('pageerror', (err) => errors.push(String(err)))
  page.on('console', (msg) => { if (msg.type() === 'debug') debug.push(msg.text()) })
  const user = randomUUID()
  await page.goto(pageFor(userToken(user)))
  // Every answer the page shows, in order (a new task starts a new list).
  const watchAnswers = () => page.evaluate(() => {
    const node = document.querySelector('[data-testid=answer]')
    window.answers = [node.textContent]
    new MutationObserver(() => window.answers.push(node.textContent))
      .observe(node, { childList: true, characterData: true, subtree: true })
  })
  const assertGrew = async () => {
    const answers = (await page.evaluate(() => window.answers)).filter(Boolean)
    for (let i = 1; i < answers.length; i++) {
      check(answers[i].startsWith(answers[i - 1]), `the answer stepped back: ${answers[i - 1]} -> ${answers[i]}`)
    }
  }
  const answer = page.getByTestId('answer')
  const showing = (n) => page.waitForFunction((n) =>
    (document.querySelector('[data-testid=answer]')?.textContent ?? '').split(' ').length >= n, n)
  const running = () => new URL(page.url()).searchParams.get('task')

  // The answer grows: three words; the socket drops; it rejoins and grows on; Stop.
  await page.getByLabel('prompt').fill('The quick brown fox jumps over the lazy dog')
  await watchAnswers()
  await page.getByRole('button', { name: 'Send' }).click()
  await showing(3)
  const first = running()
  const early = await answer.textContent()
  const joins = paths(first).length
  await realtime('drop')
  await until('the page to join again', () => paths(first).length > joins)
  await page.waitForFunction((n) => (document.querySelector('[data-testid=answer]')?.textContent ?? '').length > n, early.length)
  await page.getByRole('button', { name: 'Stop' }).click()
  await page.getByTestId('status').filter({ hasText: 'stopped' }).waitFor()
  const kept = await answer.textContent()
  check(kept.startsWith(early), `the partial answer was not kept: ${kept}`)
  check(!kept.includes('(done)'), 'the task finished instead of stopping')
  await assertGrew()
  assertFollowed(first)

  // Send again; Realtime loses what is sent while three more pieces are written, then the
  // socket drops: the rejoin reads them back. Reload mid-stream: the page re-attaches by the
  // id in its address and shows the running task, then its final answer.
  await page.getByRole('button', { name: 'Send' }).click()
  await page.getByTestId('status').filter({ hasText: 'streaming' }).waitFor()
  await watchAnswers()
  const second = running()
  check(second && second !== first, 'the task id is not in the address')
  await realtime('lose_events', { count: 1000 })
  const shown = words(await answer.textContent())
  await until('three more pieces on the server', async () => await piecesOnServer(second) >= shown + 3)
  await realtime('reset')
  const rejoins = paths(second).length
  await realtime('drop')
  await until('the page to join again', () => paths(second).length > rejoins)
  await showing(shown + 3)
  await assertGrew()
  await page.reload()
  await page.getByTestId('status').filter({ hasText: 'streaming' }).waitFor()
  const resumed = await answer.textContent()
  check(!resumed.includes('(done)'), 'the task finished before the reloaded page followed it')
  await watchAnswers()
  await page.getByTestId('status').filter({ hasText: 'completed' }).waitFor({ timeout: 60_000 })
  const final = await answer.textContent()
  check(final.startsWith(resumed) && final.endsWith(' (done)'), `not the final answer: ${final}`)
  check(running() === second, 'the reloaded page followed another task')
  await assertGrew()
  assertFollowed(second)
  await page.screenshot({ path: env('SCREENSHOT') })

  // The guide's race: the task finished before this page joined; it still shows the end.
  const before = paths(second).length
  await page.reload()
  await page.getByTestId('status').filter({ hasText: 'completed' }).waitFor()
  check(await answer.textContent() === final, 'the finished task shows another answer')
  check(paths(second).length > before, 'the page did not join the finished task')
  assertFollowed(second)

  // Another user's task: Realtime refuses its topic, and the page says it is not theirs.
  const other = await context.newPage()
  other.on('console', (msg) => { if (msg.type() === 'debug') debug.push(msg.text()) })
  other.on('pageerror', (err) => errors.push(String(err)))
  const lines = debug.length
  await other.goto(pageFor(userToken(randomUUID()), second))
  await other.getByTestId('error').filter({ hasText: 'does not exist or is not yours' }).waitFor()
  check(await other.getByTestId('answer').textContent() === '', 'another user saw the answer')
  const theirs = debug.slice(lines)
  check(theirs.some((l) => l.includes('Broadcast join refused')), `the other user's join was not refused:\n${theirs.join('\n')}`)
  check(!theirs.some((l) => l.includes('following by Broadcast')), 'the other user followed the task by Broadcast')
  await other.close()

  // Human in the loop: the handler asks (tests/frontend_handler.py, prompts "ask:..."); the
  // page shows the question with Approve / Deny (Send off, Stop on), a reload shows it again,
  // and Approve lets the task finish with an answer that says so.
  const question = page.getByTestId('question')
  await page.getByLabel('prompt').fill('ask: may I send the email?')
  await page.getByRole('button', { name: 'Send' }).click()
  await question.filter({ hasText: 'Send the email?' }).waitFor()
  const asking = running()
  check(asking && asking !== second, 'the asking task is not in the address')
  check(await page.getByTestId('status').textContent() === 'waiting', 'the status is not waiting')
  check(await page.getByRole('button', { name: 'Send' }).isDisabled(), 'Send is on while the task waits')
  check(await page.getByRole('button', { name: 'Stop' }).isEnabled(), 'Stop is off while the task waits')
  await page.reload()
  await question.filter({ hasText: 'Send the email?' }).waitFor()
  check(running() === asking, 'the reloaded page follows another task')
  await page.getByRole('button', { name: 'Approve' }).click()
  await page.getByTestId('status').filter({ hasText: 'completed' }).waitFor()
  const approved = await answer.textContent()
  check(approved === 'You said approve', `not the approved answer: ${approved}`)
  check(await question.count() === 0, 'the question is still shown')
  check(await page.getByTestId('answer-error').count() === 0, 'the answer was refused')
  assertFollowed(asking)

  check(errors.length === 0, `page errors: ${errors.join('; ')}`)
  console.log(`ok (${PATH}): answer grew from ${JSON.stringify(early)} and stopped at ${JSON.stringify(kept)}; ` +
    `reloaded at ${JSON.stringify(resumed)}, ended ${JSON.stringify(final.slice(-40))}; asked, approved: ` +
    JSON.stringify(approved))
} finally {
  await context.close()
  server.close()
}
