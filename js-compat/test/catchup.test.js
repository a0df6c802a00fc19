// Catch-up on rejoin (issue #14, RELIABILITY.md "Catch-up on rejoin"): the real supabase-js, its
// socket killed mid-stream, rows committed while it is down, and supabase-js's own reconnect and
// rejoin receive every one of them, in commit order; a user who lost access to some rows
// meanwhile does not receive those. A change in flight when the socket died may arrive twice
// (bounded, documented): the app de-duplicates on the row's key, as these tests do.
// A reloaded page (a new client: its message refs start again) is told "fresh" and gets no replay.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'
import { client, subscribedToPostgres, withTimeout } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const SCHEMA = (s) => `
  CREATE TABLE ci_members (room int, user_id uuid, PRIMARY KEY (room, user_id));
  CREATE TABLE ci_items (id serial PRIMARY KEY, room int NOT NULL, n int NOT NULL);
  ALTER TABLE ci_items ENABLE ROW LEVEL SECURITY;
  CREATE POLICY ${s}_members ON ci_items FOR SELECT TO authenticated
    USING (EXISTS (SELECT 1 FROM ci_members m WHERE m.room = ci_items.room AND m.user_id = auth.uid()));
  GRANT SELECT ON ci_items, ci_members TO authenticated;
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
let db
let nextRoom = 1
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA, { publish: ['ci_items'] })
})

/** A supabase-js client that reconnects after `delayMs` (the default steps are 1, 2, 5, 10 s). */
function reconnectingClient(key, vsn, delayMs) {
  const c = createClient(t.url, key, {
    realtime: { transport: WebSocket, vsn, reconnectAfterMs: () => delayMs },
    auth: { persistSession: false, autoRefreshToken: false },
  })
  ;(client.all ??= []).push(c)
  return c
}

/** The underlying `ws` of a supabase-js client. */
function socketOf(c) {
  const ws = c.realtime.socketAdapter?.socket?.conn ?? c.realtime.conn
  assert.ok(ws && typeof ws.terminate === 'function', 'the ws transport socket')
  return ws
}

/** Rows received, in arrival order, and the `system` messages. */
function watch(ch, room) {
  const seen = { rows: [], systems: [], waiters: [] }
  const wake = () => {
    for (const w of [...seen.waiters]) w()
  }
  ch.on('postgres_changes', { event: 'INSERT', schema: S, table: 'ci_items', filter: `room=in.(${room},${room + 1})` }, (e) => {
    seen.rows.push(e.new)
    wake()
  })
  ch.on('system', {}, (p) => {
    seen.systems.push({ ...p, at: Date.now() })
    wake()
  })
  seen.until = (what, pred) =>
    withTimeout(
      new Promise((resolve) => {
        const check = () => {
          if (!pred()) return false
          seen.waiters = seen.waiters.filter((w) => w !== check)
          resolve()
          return true
        }
        if (!check()) seen.waiters.push(check)
      }),
      what,
    )
  return seen
}

/** The ns of the rows received, each once (first arrival), and how many came twice. */
function distinct(rows) {
  const ids = new Set()
  const ns = []
  for (const r of rows) {
    if (ids.has(r.id)) continue
    ids.add(r.id)
    ns.push(r.n)
  }
  return { ns, twice: rows.length - ns.length }
}

async function insert(room, n) {
  await db.query('INSERT INTO ci_items (room, n) VALUES ($1, $2)', [room, n])
}

conformance(
  t,
  { features: ['catchup', 'rls'], needs: ['db', 'sign', 'walcast'], title: 'a socket killed mid-stream: supabase-js reconnects and rejoins by itself and receives every row committed while it was down, in order, then live' },
  async (vsn) => {
    const user = randomUUID()
    const room = (nextRoom += 2)
    await db.query('INSERT INTO ci_members VALUES ($1, $2), ($3, $2)', [room, user, room + 1])
    const key = t.sign({ role: 'authenticated', sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })
    const c = reconnectingClient(key, vsn, 1500)
    const ch = c.channel(`ci-${randomUUID()}`)
    const seen = watch(ch, room)
    await subscribedToPostgres(ch)
    for (let n = 1; n <= 3; n++) await insert(room, n)
    await seen.until('rows 1-3', () => seen.rows.length >= 3)
    // Mid-stream: rows keep being committed as the socket dies.
    const streaming = (async () => {
      for (let n = 4; n <= 6; n++) await insert(room, n)
    })()
    socketOf(c).terminate()
    await streaming
    for (let n = 7; n <= 10; n++) await insert(room, n)
    const committed = Date.now()
    await seen.until('the rejoin', () => seen.systems.some((p) => p.catchup?.status === 'resumed'))
    const resumed = seen.systems.find((p) => p.catchup?.status === 'resumed')
    assert.ok(resumed.at >= committed, 'the rows were committed before supabase-js rejoined')
    await seen.until('rows up to 10', () => distinct(seen.rows).ns.includes(10))
    await insert(room, 11)
    await seen.until('row 11, live', () => distinct(seen.rows).ns.includes(11))
    const { ns, twice } = distinct(seen.rows)
    assert.deepEqual(ns, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 'every row once, in commit order')
    assert.ok(twice <= 6, `only rows sent before the socket died may come twice (${twice})`)
  },
)

conformance(
  t,
  { features: ['catchup', 'rls'], needs: ['db', 'sign', 'walcast'], title: 'a user who lost access to rows while its socket was down does not receive them on its rejoin' },
  async (vsn) => {
    const user = randomUUID()
    const room = (nextRoom += 2)
    await db.query('INSERT INTO ci_members VALUES ($1, $2), ($3, $2)', [room, user, room + 1])
    const key = t.sign({ role: 'authenticated', sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })
    const c = reconnectingClient(key, vsn, 1500)
    const ch = c.channel(`ci-${randomUUID()}`)
    const seen = watch(ch, room)
    await subscribedToPostgres(ch)
    await insert(room, 1)
    await seen.until('row 1', () => seen.rows.length >= 1)
    socketOf(c).terminate()
    await insert(room, 2)
    await insert(room + 1, 100) // the room about to be revoked
    await insert(room, 3)
    await db.query('DELETE FROM ci_members WHERE room = $1 AND user_id = $2', [room + 1, user])
    const revoked = Date.now()
    await seen.until('the rejoin', () => seen.systems.some((p) => p.catchup?.status === 'resumed'))
    assert.ok(seen.systems.find((p) => p.catchup?.status === 'resumed').at >= revoked, 'revoked before the rejoin')
    await insert(room, 4)
    await seen.until('row 4, live', () => distinct(seen.rows).ns.includes(4))
    assert.deepEqual(distinct(seen.rows).ns, [1, 2, 3, 4], 'the revoked room\'s row is not replayed')
  },
)

conformance(
  t,
  { features: ['catchup', 'rls'], needs: ['db', 'sign', 'control', 'walcast'], title: 'across a graceful walcast restart: supabase-js reconnects to the new process and its rejoin receives every row committed while walcast was down, in order, then live' },
  async (vsn) => {
    const user = randomUUID()
    const room = (nextRoom += 2)
    await db.query('INSERT INTO ci_members VALUES ($1, $2), ($3, $2)', [room, user, room + 1])
    // A walcast of this test's own (its own slot), restarted on the same port.
    const env = {
      DATABASE_URL: t.dbUrl,
      SLOT_NAME: `ci_restart_${randomUUID().slice(0, 8)}`,
      STARTUP_GRACE_MS: '0', // the backlog goes out at once, before the client is back
    }
    const first = await t.startServer(env)
    const key = t.sign({ role: 'authenticated', sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })
    const c = createClient(first.url, key, {
      realtime: { transport: WebSocket, vsn, reconnectAfterMs: () => 500 },
      auth: { persistSession: false, autoRefreshToken: false },
    })
    ;(client.all ??= []).push(c)
    const ch = c.channel(`ci-${randomUUID()}`)
    const seen = watch(ch, room)
    await subscribedToPostgres(ch)
    await insert(room, 1)
    await seen.until('row 1', () => seen.rows.length >= 1)
    await first.stop() // SIGTERM: 1012 to the client, positions saved
    for (let n = 2; n <= 4; n++) await insert(room, n)
    const committed = Date.now()
    await t.startServer({ ...env, PORT: String(first.port) })
    await seen.until('the rejoin', () => seen.systems.some((p) => p.catchup?.status === 'resumed' && p.at >= committed))
    await seen.until('rows up to 4', () => distinct(seen.rows).ns.includes(4))
    await insert(room, 5)
    await seen.until('row 5, live', () => distinct(seen.rows).ns.includes(5))
    assert.deepEqual(distinct(seen.rows).ns, [1, 2, 3, 4, 5], 'every row once, in commit order')
    assert.equal(distinct(seen.rows).twice, 0, 'nothing twice across a graceful restart')
    assert.ok(!seen.systems.some((p) => p.gap), 'no gap notice')
  },
)

conformance(
  t,
  { features: ['catchup', 'rls'], needs: ['db', 'sign', 'walcast'], title: 'a reloaded page (a new supabase-js client, same token, same channel) is told catchup "fresh" and gets no replay of what the old page had' },
  async (vsn) => {
    const user = randomUUID()
    const room = (nextRoom += 2)
    await db.query('INSERT INTO ci_members VALUES ($1, $2), ($3, $2)', [room, user, room + 1])
    const key = t.sign({ role: 'authenticated', sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })
    const topic = `ci-${randomUUID()}`
    // The old page: it never reconnects by itself within the test.
    const old = reconnectingClient(key, vsn, 600000)
    const oldCh = old.channel(topic)
    const oldSeen = watch(oldCh, room)
    await subscribedToPostgres(oldCh)
    await insert(room, 1)
    await oldSeen.until('row 1 on the old page', () => oldSeen.rows.length >= 1)
    // The reload: the old socket dies without a leave, a row is committed, a new client joins.
    socketOf(old).terminate()
    await insert(room, 2)
    const page = reconnectingClient(key, vsn, 1500)
    const ch = page.channel(topic)
    const seen = watch(ch, room)
    await subscribedToPostgres(ch)
    await seen.until('Subscribed to PostgreSQL', () =>
      seen.systems.some((p) => p.message === 'Subscribed to PostgreSQL'),
    )
    const sub = seen.systems.find((p) => p.message === 'Subscribed to PostgreSQL')
    assert.equal(sub.catchup?.status, 'fresh', JSON.stringify(sub))
    await insert(room, 3)
    await seen.until('row 3, live', () => seen.rows.some((r) => r.n === 3))
    assert.deepEqual(
      seen.rows.map((r) => r.n),
      [3],
      'the new page loads its data itself: rows 1 and 2 are not replayed to it',
    )
  },
)
