// Cluster mode and postgres_changes with the real supabase-js: two walcast nodes sharing one
// database and one slot behind a real nats-server; one node streams the slot, and a client on
// each node gets every change once, under both vsn.
// Run: `node --test --test-force-exit cluster/` (scripts/test does), with WALCAST_BIN set.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { createServer, connect } from 'node:net'
import { test, after } from 'node:test'
import pg from 'pg'
import { client, closeClients, startDev, startServer, subscribedToPostgres, token, Inbox, VSNS, withTimeout } from '../lib/harness.js'

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

// `walcast dev` gives the database (it streams a slot of its own, unused here).
const dev = await startDev()
const sql = new pg.Client({ connectionString: dev.dbUrl })
await sql.connect()
await sql.query(`
  CREATE TABLE IF NOT EXISTS cluster_notes (id serial PRIMARY KEY, k int NOT NULL);
  GRANT SELECT ON cluster_notes TO anon;
  ALTER PUBLICATION supabase_realtime ADD TABLE cluster_notes;
`)
const nats = await startNats()
const env = (name) => ({
  DATABASE_URL: dev.dbUrl,
  SLOT_NAME: 'walcast_cluster_js',
  STARTUP_GRACE_MS: '0',
  CLUSTER_NATS_URL: nats.url,
  NODE_NAME: name,
  CLUSTER_HEARTBEAT_MS: '100',
  CLUSTER_NODE_TIMEOUT_MS: '1000',
})
const nodeA = await startServer(env('a'))
const nodeB = await startServer(env('b'))
after(async () => {
  await closeClients()
  await nodeA.stop()
  await nodeB.stop()
  nats.stop()
  await sql.end()
  await dev.stop()
})

let next = 1
for (const vsn of VSNS) {
  test(`postgres_changes reach a client on each node, once each (vsn ${vsn})`, async () => {
    const inboxes = []
    for (const node of [nodeA, nodeB]) {
      const inbox = new Inbox()
      const ch = client(node, token(), vsn)
        .channel(`cluster-notes-${vsn}-${node.port}`)
        .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'cluster_notes' }, inbox.push)
      await subscribedToPostgres(ch)
      inboxes.push(inbox)
    }
    // Until the follower receives the holder's stream, a probe row may not reach it: insert
    // probes until one reaches both.
    await withTimeout(
      (async () => {
        for (;;) {
          const k = next++
          await sql.query('INSERT INTO cluster_notes (k) VALUES ($1)', [-k])
          const arrived = () => inboxes.every((i) => i.items.some((e) => e.new.k === -k))
          for (let w = 0; w < 25 && !arrived(); w++) await new Promise((r) => setTimeout(r, 20))
          if (arrived()) return
        }
      })(),
      'a probe row to reach both nodes',
      30_000,
    )
    for (const inbox of inboxes) inbox.items.length = 0
    const ks = []
    for (let i = 0; i < 10; i++) ks.push(next++)
    for (const k of ks) await sql.query('INSERT INTO cluster_notes (k) VALUES ($1)', [k])
    for (const [n, inbox] of inboxes.entries()) {
      const got = []
      for (const k of ks) {
        const e = await inbox.next(`row ${k} on node ${n ? 'b' : 'a'}`, (e) => e.new.k > 0)
        assert.equal(e.eventType, 'INSERT')
        got.push(e.new.k)
      }
      assert.deepEqual(got, ks, 'every row once, in commit order')
      assert.equal(inbox.items.filter((e) => e.new.k > 0).length, 0, 'no duplicate')
    }
  })
}
