// The example page in headless Chromium (Debian's, via playwright-core; nothing downloads a
// browser): type a prompt, watch the answer grow, press Stop; send again, reload the page
// mid-stream, see it re-attach to the task and show its end; save a screenshot.
// Run by tests/test_frontend.py with the stand-ins' addresses in the environment.
import { createHmac, randomUUID } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { createServer } from 'node:http'
import { extname, join } from 'node:path'

import { chromium } from 'playwright-core'

const env = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set`)
  return process.env[name]
}
const b64 = (data) => Buffer.from(data).toString('base64url')
function userToken(sub) {
  const now = Math.floor(Date.now() / 1000)
  const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64(JSON.stringify({ aud: 'authenticated', role: 'authenticated', sub, iat: now, exp: now + 3600 }))
  return `${head}.${body}.${b64(createHmac('sha256', env('TEST_JWT_SECRET')).update(`${head}.${body}`).digest())}`
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
pageUrl.searchParams.set('token', userToken(randomUUID()))
pageUrl.searchParams.set('context', JSON.stringify({ chunks: 60, delay: 0.15 }))

const context = await chromium.launchPersistentContext(env('BROWSER_PROFILE'), {
  executablePath: env('CHROMIUM'),
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 900, height: 640 },
})
const errors = []
try {
  const page = context.pages()[0] ?? await context.newPage()
  page.on('pageerror', (err) => errors.push(String(err)))
  await page.goto(pageUrl.href)
  await page.getByLabel('prompt').fill('The quick brown fox jumps over the lazy dog')
  await page.getByRole('button', { name: 'Send' }).click()
  const answer = page.getByTestId('answer')
  // The answer grows: three words, then more.
  await page.waitForFunction(() => (document.querySelector('[data-testid=answer]')?.textContent ?? '').split(' ').length >= 3)
  const early = await answer.textContent()
  await page.waitForFunction((n) => (document.querySelector('[data-testid=answer]')?.textContent ?? '').length > n, early.length)
  await page.getByRole('button', { name: 'Stop' }).click()
  await page.getByTestId('status').filter({ hasText: 'stopped' }).waitFor()
  const kept = await answer.textContent()
  if (!kept.startsWith(early)) throw new Error(`the partial answer was not kept: ${kept}`)
  if (kept.includes('(done)')) throw new Error('the task finished instead of stopping')
  // Send again, reload mid-stream: the page re-attaches by the id in its address and shows
  // the running task, then its final answer.
  await page.getByRole('button', { name: 'Send' }).click()
  await page.getByTestId('status').filter({ hasText: 'streaming' }).waitFor()
  const running = new URL(page.url()).searchParams.get('task')
  if (!running) throw new Error('the task id is not in the address')
  await page.reload()
  await page.getByTestId('status').filter({ hasText: 'streaming' }).waitFor()
  const resumed = await answer.textContent()
  if (resumed.includes('(done)')) throw new Error('the task finished before the reloaded page followed it')
  await page.getByTestId('status').filter({ hasText: 'completed' }).waitFor({ timeout: 60_000 })
  const final = await answer.textContent()
  if (!final.startsWith(resumed) || !final.endsWith(' (done)')) throw new Error(`not the final answer: ${final}`)
  if (new URL(page.url()).searchParams.get('task') !== running) throw new Error('the reloaded page followed another task')
  await page.screenshot({ path: env('SCREENSHOT') })
  if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`)
  console.log(`ok: answer grew from ${JSON.stringify(early)} and stopped at ${JSON.stringify(kept)}; ` +
    `reloaded at ${JSON.stringify(resumed)}, ended ${JSON.stringify(final.slice(-40))}`)
} finally {
  await context.close()
  server.close()
}
