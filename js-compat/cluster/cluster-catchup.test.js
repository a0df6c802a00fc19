// Catch-up follows a client to another node (RELIABILITY.md, "Several nodes"): the real
// supabase-js behind a load balancer (a TCP proxy), its node killed (SIGKILL) while rows are
// committed; the proxy sends its own reconnect to another node, where its rejoin is resumed and
// it receives every row, in commit order (de-duplicated on the row's key, as an app does: rows
// sent after its last message on the old node may come twice), then live ones. Both vsn.
// Run: `node --test --test-force-exit cluster/` (scripts/test does), with WALCAST_BIN set.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { existsSync } from 'node:fs'
import { createServer, connect } from 'node:net'
import { test, after } from 'node:test'
import { createClient } from '@supabase/supabase-js'
import pg from 'pg'
import WebSocket from 'ws'
import { client, closeClients, nowSecs, sign, startDev, startServer, subscribedToPostgres, token, VSNS, withTimeout } from '../lib/harness.js'

const NATS_BIN = ['/usr/sbin/nats-server', '/usr/bin/nats-server'].find(existsSync)

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer()
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
    s.on('error', reject)
  })
}

async function startNats() {
  assert.ok(NATS_BIN, 'nats-server not found: apt-get install nats-server')
  const port = await freePort()
  const child = spawn(NATS_BIN, ['-a', '127.0.0.1', '-p', String(port)], { stdio: 'ignore' })
  await withTimeout(
    (async () => {
      for (;;) {
        const up = await new Promise((resolve) => {
          const c = connect(port, '127.0.0.1', () => { c.end(); resolve(true) })
          c.on('error', () => resolve(false))
        })
        if (up) return
        await new Promise((r) => setTimeout(r, 20))
      }
    })(),
    'nats-server to listen',
  )
  return { url: `nats://127.0.0.1:${port}`, stop: () => child.kill('SIGKILL') }
}

/** A load balancer: a TCP proxy to one node at a time. */
async function balancer() {
  let target = 0
  const server = createServer((down) => {
    const up = connect(target, '127.0.0.1')
    const close = () => { down.destroy(); up.destroy() }
    down.pipe(up)
    up.pipe(down)
    for (const s of [down, up]) {
      s.on('error', close)
      s.on('close', close)
    }
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    to(port) { target = port },
    close() { server.close() },
  }
}

/** Polls until `pred()` holds. */
async function until(what, pred, ms) {
  await withTimeout(
    (async () => {
      while (!(await pred())) await new Promise((r) => setTimeout(r, 20))
    })(),
    what,
    ms,
  )
}

/** A gauge of a node's /metrics. */
async function gauge(node, name) {
  const res = await fetch(`${node.url}/metrics`, { headers: { authorization: `Bearer ${token()}` } })
  const text = await res.text()
  const line = text.split('\n').find((l) => l.startsWith(`${name} `))
  return line ? Number(line.split(' ')[1]) : 0
}

const dev = await startDev()
const sql = new pg.Client({ connectionString: dev.dbUrl })
await sql.connect()
await sql.query(`
  CREATE TABLE IF NOT EXISTS cluster_moves (id serial PRIMARY KEY, run text NOT NULL, k int NOT NULL);
  GRANT SELECT ON cluster_moves TO authenticated;
  ALTER PUBLICATION supabase_realtime ADD TABLE cluster_moves;
`)
const nats = await startNats()
const lb = await balancer()
const nodes = []
after(async () => {
  await closeClients()
  for (const n of nodes) await n.stop()
  lb.close()
  nats.stop()
  await sql.end()
  await dev.stop()
})

for (const [i, vsn] of VSNS.entries()) {
  test(`supabase-js whose node is killed resumes on another node (vsn ${vsn})`, async () => {
    // A cluster of two nodes of its own (its own subjects and slot).
    const env = (name) => ({
      DATABASE_URL: dev.dbUrl,
      SLOT_NAME: `walcast_cluster_moves_${i}`,
      STARTUP_GRACE_MS: '0',
      CLUSTER_NATS_URL: nats.url,
      CLUSTER_SUBJECT_PREFIX: `moves${i}`,
      NODE_NAME: name,
      CLUSTER_HEARTBEAT_MS: '100',
      CLUSTER_NODE_TIMEOUT_MS: '1000',
      METRICS_JWT_SECRET: 'walcast-js-compat-secret-with-32-plus-characters',
    })
    const from = await startServer(env('a'))
    const to = await startServer(env('b'))
    nodes.push(from, to)
    lb.to(from.port)
    const run = randomUUID()
    const key = sign({ role: 'authenticated', sub: randomUUID(), exp: nowSecs() + 3600 })
    const c = createClient(lb.url, key, {
      realtime: { transport: WebSocket, vsn, reconnectAfterMs: () => 300 },
      auth: { persistSession: false, autoRefreshToken: false },
    })
    ;(client.all ??= []).push(c)
    const rows = []
    const systems = []
    const ch = c
      .channel(`moves-${run}`)
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'cluster_moves', filter: `run=eq.${run}` }, (e) => rows.push(e.new))
      .on('system', {}, (p) => systems.push(p))
    await subscribedToPostgres(ch)
    const insert = (k) => sql.query('INSERT INTO cluster_moves (run, k) VALUES ($1, $2)', [run, k])
    // Until the node receives the slot's stream, a probe may not reach it.
    let k = 0
    await until('a first row', async () => {
      await insert(++k)
      for (let w = 0; w < 10 && rows.length === 0; w++) await new Promise((r) => setTimeout(r, 20))
      return rows.length > 0
    }, 30_000)
    // The other node has heard of this client's position (published every second).
    await until('the position on the other node', async () => (await gauge(to, 'walcast_catchup_cluster_positions')) >= 1)
    const first = rows[0].k
    // Rows keep being committed as the node dies; the balancer sends the reconnect elsewhere.
    lb.to(to.port)
    const writing = (async () => {
      for (let n = 0; n < 10; n++) await insert(++k)
    })()
    await from.kill()
    await writing
    for (let n = 0; n < 5; n++) await insert(++k)
    await until('the rejoin on the other node', () => systems.some((p) => p.catchup?.status === 'resumed'), 30_000)
    const committed = k
    await until('every row committed meanwhile', () => rows.some((r) => r.k === committed), 30_000)
    await insert(++k)
    await until('a live row', () => rows.some((r) => r.k === k))
    const ids = new Set()
    const ks = []
    for (const r of rows) {
      if (ids.has(r.id)) continue
      ids.add(r.id)
      ks.push(r.k)
    }
    const want = []
    for (let n = first; n <= k; n++) want.push(n)
    assert.deepEqual(ks, want, 'every row once (by key), in commit order')
    assert.ok(!systems.some((p) => p.gap), 'no gap notice')
    await c.removeAllChannels()
    await to.stop()
  })
}
