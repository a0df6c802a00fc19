// The support-chat example in a real browser: Debian's headless Chromium, driven by
// playwright-core, against `walcast dev --example support-chat` (the real binary and its own
// PostgreSQL). An agent's dashboard and two customers' widgets, each in its own browser context,
// using the published supabase-js browser build with its defaults (native WebSocket, token in
// the query string, binary broadcast frames). Every wait is for a DOM state or an event, with a
// deadline; nothing sleeps.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import path from 'node:path'
import { chromium } from 'playwright-core'

const here = path.dirname(fileURLToPath(import.meta.url))
const example = path.join(here, '..')
const repo = path.join(example, '..', '..')
const WAIT = 15_000
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium'
// VSN=1.0.0 runs the pages on the older JSON-only protocol (`?vsn=1.0.0`); unset, supabase-js's
// default (2.0.0, binary broadcast frames).
const VSN = process.env.VSN

let walcast
let browser
const pages = {} // name -> { page, frames, bodies }
let conversation // Carol's conversation id
const NOTE = 'VIP customer: refund approved, keep it quiet'

function withTimeout(promise, what, ms = WAIT) {
  let timer
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

/** `walcast dev --example support-chat` in a fresh directory; resolves to the printed URLs. */
async function startWalcast() {
  const bin = process.env.WALCAST_BIN ?? path.join(repo, 'target', 'debug', 'walcast')
  assert.ok(existsSync(bin), `walcast binary not found at ${bin}: run \`cargo build\` first (or set WALCAST_BIN)`)
  const dir = mkdtempSync(path.join(tmpdir(), 'walcast-browser-'))
  chmodSync(dir, 0o755) // walcast dev runs PostgreSQL as `postgres` when we are root
  const child = spawn(bin, ['dev', '--example', 'support-chat'], {
    env: {
      PATH: process.env.PATH,
      PORT: '0',
      WALCAST_DEV_DIR: dir,
      WALCAST_EXAMPLES_DIR: path.join(repo, 'examples'),
    },
    stdio: ['ignore', 'pipe', process.env.WALCAST_TEST_LOG ? 'inherit' : 'ignore'],
  })
  const urls = {}
  await withTimeout(
    new Promise((resolve, reject) => {
      createInterface({ input: child.stdout }).on('line', (line) => {
        const m = line.match(/^\s+(agent|customer) (\w+)\s+(http\S+)$/)
        if (m) urls[m[2]] = m[3]
        const key = line.match(/^\s+(anon|service_role) key:\s+(\S+)$/)
        if (key) urls[key[1]] = key[2]
        if (urls.Ada && urls.Bo && urls.Carol && urls.Dan) resolve()
      })
      child.once('exit', (code) => reject(new Error(`walcast dev exited with ${code}`)))
    }),
    'walcast dev --example support-chat to print its URLs',
    60_000,
  )
  return {
    urls,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve))
        child.kill('SIGTERM')
        await withTimeout(exited, 'walcast dev to exit', 30_000)
      }
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** A page in its own browser context, recording every WebSocket frame it receives (text, or
 *  binary decoded as UTF-8) and every body the example's endpoint sends it. */
async function openPage(name, url) {
  const context = await browser.newContext({ viewport: { width: 900, height: 560 } })
  // Test instrumentation: the page's WebSockets, so a test can cut one as a network would.
  await context.addInitScript(() => {
    const Native = window.WebSocket
    window.__sockets = []
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args)
        window.__sockets.push(this)
      }
    }
  })
  const page = await context.newPage()
  const rec = { page, frames: [], binary: 0, sockets: 0, bodies: [], pending: [], errors: [] }
  page.on('websocket', (ws) => {
    rec.sockets++
    ws.on('framereceived', (f) => {
      if (typeof f.payload !== 'string') rec.binary++
      rec.frames.push(typeof f.payload === 'string' ? f.payload : Buffer.from(f.payload).toString('utf8'))
    })
  })
  page.on('response', (r) => {
    if (r.url().includes('/api/')) rec.pending.push(r.text().then((t) => rec.bodies.push(t), () => {}))
  })
  page.on('pageerror', (e) => rec.errors.push(e.message))
  await page.goto(VSN ? url.replace('#', `?vsn=${VSN}#`) : url)
  pages[name] = rec
  return rec
}

/** Waits until <body data-ready> lists every name. */
async function ready(page, ...names) {
  await page.waitForSelector(names.map((n) => `[data-ready~="${n}"]`).join('') || 'body', { timeout: WAIT })
}

/** Everything a page received so far, as one string. */
async function everything(rec) {
  await Promise.all(rec.pending)
  return [...rec.frames, ...rec.bodies].join('\n')
}

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: \`apt-get install chromium\` (Debian), or set CHROMIUM`)
  walcast = await startWalcast()
  // playwright-core gives each launch a fresh temporary profile (--user-data-dir).
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
})

after(async () => {
  await browser?.close()
  await walcast?.stop()
})

test('the vendored supabase-js is the pinned build', () => {
  const pinned = JSON.parse(readFileSync(path.join(repo, 'js-compat', 'package.json'), 'utf8')).dependencies['@supabase/supabase-js']
  const installed = JSON.parse(readFileSync(path.join(here, 'node_modules', '@supabase', 'supabase-js', 'package.json'), 'utf8')).version
  assert.equal(installed, pinned, 'examples/support-chat/test/package.json pins the same supabase-js as js-compat')
  const published = readFileSync(path.join(here, 'node_modules', '@supabase', 'supabase-js', 'dist', 'umd', 'supabase.js'))
  assert.ok(published.equals(readFileSync(path.join(example, 'vendor', 'supabase.js'))), 'vendor/supabase.js differs: run `npm run vendor`')
})

test('the agent is online on the dashboard, and the widget sees it through presence', async () => {
  const { page: agent } = await openPage('agent', walcast.urls.Ada)
  await ready(agent, 'loaded', 'list', 'agents')
  await agent.waitForSelector('#agents li[data-name="Ada"]', { timeout: WAIT })
  const { page: carol } = await openPage('carol', walcast.urls.Carol)
  await ready(carol, 'loaded', 'agents')
  await carol.waitForFunction(() => document.querySelector('#agents').textContent.includes('Ada online'), null, { timeout: WAIT })
})

test('a customer starts a conversation: it appears on the dashboard live', async () => {
  const { page: carol } = pages.carol
  const { page: agent } = pages.agent
  await carol.fill('#first', 'Where is my order #1234?')
  await carol.click('#start button')
  await ready(carol, 'messages', 'updates', 'typing', 'history')
  await carol.waitForSelector('#messages .msg.customer:has-text("Where is my order #1234?")', { timeout: WAIT })
  const item = await agent.waitForSelector('#conversations li:has-text("Carol"):has-text("waiting")', { timeout: WAIT })
  conversation = await item.getAttribute('data-id')
  // Delivered: the widget shows it (it only shows what the database sent or read back) as sent...
  await carol.waitForSelector('#messages .msg.customer:has-text("Where is my order #1234?") .receipt[data-state="sent"]:text-is("Sent")', { timeout: WAIT })
  // ...and the dashboard counts it unread (no agent has opened the conversation yet).
  await agent.waitForSelector(`#conversations li[data-id="${conversation}"] .unread[data-unread="1"]:text-is("1"):visible`, { timeout: WAIT })
  // It came as an INSERT over the socket (the list was loaded before it existed).
  const inserts = await agent.evaluate(() => window.__received.filter((e) => e.payload?.eventType === 'INSERT' && e.payload.table === 'conversations').map((e) => e.payload.new.id))
  assert.ok(inserts.includes(conversation))
})

test('the agent opens and accepts it: the status reaches the widget', async () => {
  const { page: agent } = pages.agent
  const { page: carol } = pages.carol
  await agent.click(`#conversations li[data-id="${conversation}"]`)
  await ready(agent, 'messages', 'typing', 'history')
  await agent.waitForSelector('#messages .msg.customer:has-text("Where is my order #1234?")', { timeout: WAIT })
  // Opening it marked it read: the count goes to 0 (and hides), the widget shows "Read".
  await agent.waitForSelector(`#conversations li[data-id="${conversation}"] .unread[data-unread="0"][hidden]`, { state: 'attached', timeout: WAIT })
  await carol.waitForSelector('#messages .msg.customer:has-text("Where is my order #1234?") .receipt[data-state="read"]:text-is("Read")', { timeout: WAIT })
  // It came as an UPDATE of the message over the widget's socket.
  const receipts = await carol.evaluate(() => window.__received.filter((e) => e.payload?.eventType === 'UPDATE' && e.payload.table === 'messages' && e.payload.new.read_at).map((e) => e.payload.new.content))
  assert.deepEqual(receipts, ['Where is my order #1234?'])
  await agent.click('#accept')
  await carol.waitForSelector('#status:text-is("active")', { timeout: WAIT })
  await agent.waitForSelector(`#conversations li[data-id="${conversation}"] .badge:text-is("active")`, { timeout: WAIT })
})

test('messages both ways, live', async () => {
  const { page: agent } = pages.agent
  const { page: carol } = pages.carol
  await carol.fill('#text', 'It was due on Monday')
  await carol.press('#text', 'Enter')
  await agent.waitForSelector('#messages .msg.customer:has-text("It was due on Monday")', { timeout: WAIT })
  // The agent has the conversation open: read as soon as it arrives, never counted unread for long.
  await carol.waitForSelector('#messages .msg.customer:has-text("It was due on Monday") .receipt[data-state="read"]', { timeout: WAIT })
  await agent.waitForSelector(`#conversations li[data-id="${conversation}"] .unread[data-unread="0"][hidden]`, { state: 'attached', timeout: WAIT })
  await agent.fill('#text', 'Let me check that for you')
  await agent.press('#text', 'Enter')
  await carol.waitForSelector('#messages .msg.agent:has-text("Let me check that for you")', { timeout: WAIT })
  // Each message once on each side; receipts on the customer's own messages only.
  assert.equal(await carol.locator('#messages .msg').count(), 3)
  assert.equal(await carol.locator('#messages .msg.agent .receipt').count(), 0)
  assert.equal(await agent.locator('#messages .receipt').count(), 0)
  assert.equal(await agent.locator('#messages .msg').count(), 3)
})

test('typing indicators both ways', async () => {
  const { page: agent } = pages.agent
  const { page: carol } = pages.carol
  await agent.locator('#text').pressSequentially('Found it')
  await carol.waitForSelector('#typing:text-is("Ada is typing…")', { timeout: WAIT })
  await agent.press('#text', 'Enter')
  await carol.waitForSelector('#messages .msg.agent:has-text("Found it")', { timeout: WAIT })
  await carol.waitForSelector('#typing', { state: 'hidden', timeout: WAIT })
  await carol.locator('#text').pressSequentially('Great')
  await agent.waitForSelector('#typing:text-is("Carol is typing…")', { timeout: WAIT })
  await carol.press('#text', 'Enter')
  await agent.waitForSelector('#messages .msg.customer:has-text("Great")', { timeout: WAIT })
  await agent.waitForSelector('#typing', { state: 'hidden', timeout: WAIT })
  // supabase-js's default protocol (vsn 2.0.0) sends broadcasts as binary frames; the browser
  // hands them to it as ArrayBuffers. vsn 1.0.0 is text only.
  if (VSN === '1.0.0') assert.equal(pages.carol.binary + pages.agent.binary, 0)
  else assert.ok(pages.carol.binary > 0 && pages.agent.binary > 0, 'typing arrived in binary frames')
})

test('two agents in the same conversation: one replies, the other sees it at once (the seed\'s scenario 4)', async () => {
  const { page: ada } = pages.agent
  const { page: carol } = pages.carol
  const bo = await openPage('bo-scenario4', walcast.urls.Bo)
  await ready(bo.page, 'loaded', 'list', 'agents')
  await carol.waitForSelector('#agents:text-is("● Ada, Bo online")', { timeout: WAIT })
  await bo.page.click(`#conversations li[data-id="${conversation}"]`)
  await ready(bo.page, 'messages', 'typing', 'history')
  await ada.fill('#text', 'Bo, can you take the refund?')
  await ada.press('#text', 'Enter')
  await bo.page.waitForSelector('#messages .msg.agent:has-text("Bo, can you take the refund?")', { timeout: WAIT })
  await carol.waitForSelector('#messages .msg.agent:has-text("Bo, can you take the refund?")', { timeout: WAIT })
  await bo.page.fill('#text', 'On it')
  await bo.page.press('#text', 'Enter')
  await ada.waitForSelector('#messages .msg.agent:has-text("On it")', { timeout: WAIT })
  await carol.waitForSelector('#messages .msg.agent:has-text("On it")', { timeout: WAIT })
  assert.deepEqual(bo.errors, [], "errors on Bo's page")
  // Bo closes his dashboard: his presence goes, Ada's stays.
  await bo.page.context().close()
  delete pages['bo-scenario4']
  await carol.waitForSelector('#agents:text-is("● Ada online")', { timeout: WAIT })
})

test('the internal note never reaches the customer', async () => {
  const { page: agent } = pages.agent
  const carol = pages.carol
  await agent.fill('#note', NOTE)
  await agent.click('#note-form button')
  // The agent's list gets the row with the note...
  const noted = await agent.waitForFunction(
    (note) => window.__received.find((e) => e.payload?.eventType === 'UPDATE' && e.payload.new.internal_note === note)?.payload,
    NOTE,
    { timeout: WAIT },
  )
  const { commit_timestamp: committed } = await noted.jsonValue()
  // ...and the widget the same change (same transaction, same commit timestamp), without it.
  const change = await carol.page.waitForFunction(
    ([id, t]) => window.__received.find((e) => e.payload?.eventType === 'UPDATE' && e.payload.new.id === id && e.payload.commit_timestamp === t)?.payload,
    [conversation, committed],
    { timeout: WAIT },
  )
  const last = await change.jsonValue()
  assert.ok(!('internal_note' in last.new), `internal_note in ${JSON.stringify(last.new)}`)
  assert.ok(!last.columns?.some((c) => c.name === 'internal_note'))
  const seen = await everything(carol)
  assert.ok(!seen.includes(NOTE), 'the note reached the widget')
  assert.ok(!seen.includes('internal_note'), 'the column reached the widget')
  assert.ok(!seen.includes('unread_count'), 'the agents-only unread count reached the widget')
  assert.ok(!(await carol.page.content()).includes(NOTE))
  // The check means something: the agent's socket did carry it.
  assert.ok((await everything(pages.agent)).includes(NOTE))
  // And the customer cannot write one either.
  const refused = await carol.page.evaluate(async (id) => {
    const token = new URLSearchParams(location.hash.slice(1)).get('token')
    const r = await fetch('api/set_internal_note', { method: 'POST', headers: { authorization: `Bearer ${token}` }, body: JSON.stringify({ conversation_id: id, note: 'x' }) })
    return r.status
  }, conversation)
  assert.equal(refused, 403)
})

test('a second customer never sees the first one’s conversation', async () => {
  const { page: agent } = pages.agent
  const dan = await openPage('dan', walcast.urls.Dan)
  await ready(dan.page, 'loaded', 'agents')
  await dan.page.fill('#first', 'Hello, Dan here')
  await dan.page.click('#start button')
  await ready(dan.page, 'messages', 'updates', 'typing', 'history')
  const danItem = await agent.waitForSelector('#conversations li:has-text("Dan")', { timeout: WAIT })
  const danConversation = await danItem.getAttribute('data-id')
  await agent.waitForSelector(`#conversations li[data-id="${danConversation}"] .unread:text-is("1"):visible`, { timeout: WAIT })
  // Dan asks for Carol's conversation by id, and for every change of the example's tables.
  const snoop = await dan.page.evaluate(async (carolConversation) => {
    const { supabase } = await import(new URL('chat.js', location.href).href)
    window.__snooped = []
    const joined = (channel) =>
      new Promise((resolve) => {
        channel.on('system', {}, (p) => p.extension === 'postgres_changes' && resolve(p.status))
        channel.subscribe((status) => status !== 'SUBSCRIBED' && resolve(status))
      })
    const byId = supabase.channel(`conversation:${carolConversation}:messages`).on(
      'postgres_changes',
      { event: '*', schema: 'support_chat', table: 'messages', filter: `conversation_id=eq.${carolConversation}` },
      (p) => window.__snooped.push(p),
    )
    const all = supabase.channel('snoop:all').on('postgres_changes', { event: '*', schema: 'support_chat', table: '*' }, (p) => window.__snooped.push(p))
    const typing = supabase.channel(`typing:${carolConversation}`, { config: { private: true } })
    const typingJoin = new Promise((resolve) => typing.subscribe((status) => resolve(status)))
    return { byId: await joined(byId), all: await joined(all), typing: await typingJoin }
  }, conversation)
  assert.equal(snoop.byId, 'ok')
  assert.equal(snoop.all, 'ok')
  assert.equal(snoop.typing, 'CHANNEL_ERROR', 'the private typing channel of another customer’s conversation is refused')
  // Carol writes; then the agent answers Dan, which Dan does see, after all of Carol's.
  const { page: carol } = pages.carol
  await carol.fill('#text', 'My address is 1 Secret Lane')
  await carol.press('#text', 'Enter')
  await agent.waitForSelector('#messages .msg.customer:has-text("1 Secret Lane")', { timeout: WAIT })
  // Read at once (the agent has Carol's conversation open): Carol gets the receipt; Dan, whose
  // snooping channels are live, must not (checked below, after a later change reaches him).
  await carol.waitForSelector('#messages .msg.customer:has-text("1 Secret Lane") .receipt[data-state="read"]', { timeout: WAIT })
  // The dashboard with Dan's conversation unread and Carol typing.
  await carol.locator('#text').pressSequentially('Thanks')
  await agent.waitForSelector('#typing:text-is("Carol is typing…")', { timeout: WAIT })
  await agent.screenshot({ path: path.join(screenshotDir(), 'dashboard.png') })
  await agent.click(`#conversations li[data-id="${danConversation}"]`)
  await ready(agent, 'messages', 'history')
  await agent.waitForSelector(`#conversations li[data-id="${danConversation}"] .unread[data-unread="0"][hidden]`, { state: 'attached', timeout: WAIT })
  await dan.page.waitForSelector('#messages .msg.customer:has-text("Hello, Dan here") .receipt[data-state="read"]', { timeout: WAIT })
  await agent.fill('#text', 'Hello Dan, how can I help?')
  await agent.press('#text', 'Enter')
  await dan.page.waitForSelector('#messages .msg.agent:has-text("Hello Dan, how can I help?")', { timeout: WAIT })
  await dan.page.waitForFunction(() => window.__snooped.some((p) => p.new?.content === 'Hello Dan, how can I help?'), null, { timeout: WAIT })
  const snooped = await dan.page.evaluate(() => window.__snooped)
  assert.ok(snooped.some((p) => p.eventType === 'UPDATE' && p.table === 'messages' && p.new.read_at), 'Dan’s own read receipt reached his snooping channel')
  const danReceipts = await dan.page.evaluate(() => window.__received.filter((e) => e.payload?.table === 'messages' && e.payload.eventType === 'UPDATE').map((e) => e.payload.new.conversation_id))
  assert.ok(danReceipts.length > 0 && danReceipts.every((id) => id !== conversation), `Dan's widget got read receipts ${danReceipts}`)
  for (const p of snooped) {
    assert.notEqual(p.new?.conversation_id, conversation, `leaked: ${JSON.stringify(p)}`)
    assert.notEqual(p.new?.id, conversation, `leaked: ${JSON.stringify(p)}`)
  }
  const seen = await everything(dan)
  for (const secret of ['Secret Lane', 'Where is my order', 'Let me check that for you', NOTE]) {
    assert.ok(!seen.includes(secret), `Dan's page received "${secret}"`)
  }
  // Reads go through the same policies.
  const read = await dan.page.evaluate(async (id) => {
    const { api } = await import(new URL('chat.js', location.href).href)
    return { messages: await api('list_messages', { conversation_id: id }), conversations: await api('list_conversations') }
  }, conversation)
  assert.deepEqual(read.messages, [])
  assert.deepEqual(read.conversations.map((c) => c.id), [danConversation])
})

test('a reloaded widget re-subscribes and keeps working', async () => {
  const { page: agent } = pages.agent
  const { page: carol } = pages.carol
  await agent.click(`#conversations li[data-id="${conversation}"]`)
  await ready(agent, 'messages', 'typing', 'history')
  await carol.reload()
  await ready(carol, 'loaded', 'agents', 'messages', 'updates', 'typing', 'history')
  await carol.waitForSelector('#messages .msg:has-text("1 Secret Lane")', { timeout: WAIT })
  await carol.waitForFunction(() => document.querySelector('#agents').textContent.includes('Ada online'), null, { timeout: WAIT })
  await agent.fill('#text', 'Still there?')
  await agent.press('#text', 'Enter')
  await carol.waitForSelector('#messages .msg.agent:has-text("Still there?")', { timeout: WAIT })
  await agent.locator('#text').pressSequentially('Shipping')
  await carol.waitForSelector('#typing:text-is("Ada is typing…")', { timeout: WAIT })
  await carol.locator('.panel').screenshot({ path: path.join(screenshotDir(), 'widget.png') })
  await carol.fill('#text', 'Yes!')
  await carol.press('#text', 'Enter')
  await agent.waitForSelector('#messages .msg.customer:has-text("Yes!")', { timeout: WAIT })
  await carol.waitForSelector('#messages .msg.customer:has-text("Yes!")', { timeout: WAIT })
  // 8 before, plus the two agents' exchange of the scenario 4 test.
  assert.equal(await carol.locator('#messages .msg').count(), 10)
})

test('a widget that loses its network catches up on what it missed when it reconnects', async () => {
  const { page: agent } = pages.agent
  const carol = pages.carol
  const { page } = carol
  const sockets = carol.sockets
  // Offline (new connections fail), and the open socket cut.
  await page.context().setOffline(true)
  await page.evaluate(() => window.__sockets.at(-1).close())
  await page.waitForSelector('body:not([data-ready~="messages"])', { timeout: WAIT })
  await agent.fill('#text', 'While you were offline')
  await agent.press('#text', 'Enter')
  await agent.waitForSelector('#messages .msg.agent:has-text("While you were offline")', { timeout: WAIT })
  assert.equal(await page.evaluate(() => window.__sockets.filter((s) => s.readyState === 1).length), 0, 'no socket is open while offline')
  await page.context().setOffline(false)
  // A new socket, the channels rejoined, and the message (committed while it was away, so never
  // pushed to it) loaded when postgres_changes went live again.
  await ready(page, 'messages', 'updates')
  await page.waitForSelector('#messages .msg.agent:has-text("While you were offline")', { timeout: WAIT })
  assert.ok(carol.sockets > sockets, 'a new WebSocket was opened')
  await agent.fill('#text', 'Welcome back')
  await agent.press('#text', 'Enter')
  await page.waitForSelector('#messages .msg.agent:has-text("Welcome back")', { timeout: WAIT })
})

test('the example endpoint runs as customers and agents only, under their policies', async () => {
  const base = new URL('.', walcast.urls.Carol).href
  const call = async (action, key, body = {}) => {
    const r = await fetch(`${base}api/${action}`, {
      method: 'POST',
      headers: key ? { authorization: `Bearer ${key}` } : {},
      body: JSON.stringify(body),
    })
    return { status: r.status, body: await r.json() }
  }
  const carolToken = new URLSearchParams(new URL(walcast.urls.Carol).hash.slice(1)).get('token')
  // service_role bypasses row level security, anon is nobody: both refused, nothing run.
  for (const key of [walcast.urls.service_role, walcast.urls.anon]) {
    const r = await call('list_messages', key, { conversation_id: conversation })
    assert.equal(r.status, 403, JSON.stringify(r.body))
  }
  assert.equal((await call('list_messages', null)).status, 401)
  assert.equal((await call('list_messages', 'not.a.jwt')).status, 401)
  assert.equal((await call('drop_everything', carolToken)).status, 404)
  // A customer cannot post as an agent, nor into a conversation that is not theirs.
  const danToken = new URLSearchParams(new URL(walcast.urls.Dan).hash.slice(1)).get('token')
  const r = await call('send_message', danToken, { conversation_id: conversation, content: 'hi from Dan' })
  assert.equal(r.status, 403)
  assert.match(r.body.error, /row-level security/)
  // Only agents mark messages read: a customer may not, not even in their own conversation.
  const mark = await call('mark_read', carolToken, { conversation_id: conversation })
  assert.equal(mark.status, 403, JSON.stringify(mark.body))
  assert.match(mark.body.error, /permission denied/)
})

test('closing the conversation reaches the widget and the list', async () => {
  const { page: agent } = pages.agent
  const { page: carol } = pages.carol
  await agent.click('#close')
  await carol.waitForSelector('#status:text-is("closed")', { timeout: WAIT })
  await carol.waitForSelector('#send', { state: 'hidden', timeout: WAIT })
  await agent.waitForSelector(`#conversations li[data-id="${conversation}"] .badge:text-is("closed")`, { timeout: WAIT })
})

test('an agent who navigates away goes offline (no leave sent), another comes online', async () => {
  const { page: agent } = pages.agent
  const { page: carol } = pages.carol
  await agent.goto('about:blank')
  await carol.waitForSelector('#agents:text-is("No agent online")', { timeout: WAIT })
  const bo = await openPage('bo', walcast.urls.Bo)
  await ready(bo.page, 'loaded', 'list', 'agents')
  await carol.waitForSelector('#agents:text-is("● Bo online")', { timeout: WAIT })
  for (const [name, rec] of Object.entries(pages)) assert.deepEqual(rec.errors, [], `errors on ${name}'s page`)
})

function screenshotDir() {
  const dir = process.env.SCREENSHOT_DIR ?? path.join(tmpdir(), `walcast-support-chat-screenshots${VSN ? `-${VSN}` : ''}`)
  mkdirSync(dir, { recursive: true })
  return dir
}
