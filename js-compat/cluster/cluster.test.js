// Cluster mode with the real supabase-js: two walcast nodes behind a real nats-server
// (CLUSTER_NATS_URL), one client on each. Broadcast and presence cross nodes, under both vsn.
// Run: `node --test --test-force-exit cluster/` (scripts/test does), with WALCAST_BIN set.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { createServer, connect } from 'node:net'
import { test, after } from 'node:test'
import { client, closeClients, startServer, subscribed, token, Inbox, VSNS, withTimeout } from '../lib/harness.js'

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

const nats = await startNats()
const env = (name) => ({ CLUSTER_NATS_URL: nats.url, NODE_NAME: name, CLUSTER_HEARTBEAT_MS: '100', CLUSTER_NODE_TIMEOUT_MS: '1000' })
const nodeA = await startServer(env('a'))
const nodeB = await startServer(env('b'))
after(async () => {
  await closeClients()
  await nodeA.stop()
  await nodeB.stop()
  nats.stop()
})

for (const vsn of VSNS) {
  test(`broadcast crosses nodes, in order, with ack (vsn ${vsn})`, async () => {
    const topic = `cluster-room-${vsn}`
    const alice = client(nodeA, token(), vsn)
    const bob = client(nodeB, token(), vsn)
    const inbox = new Inbox()
    const a = alice.channel(topic, { config: { broadcast: { ack: true } } })
    const b = bob.channel(topic)
    b.on('broadcast', { event: '*' }, inbox.push)
    await subscribed(a)
    await subscribed(b)
    // Node b follows the topic on NATS within a round trip of bob's join: probe until then.
    let crossed = false
    b.on('broadcast', { event: 'probe' }, () => { crossed = true })
    await withTimeout(
      (async () => {
        for (let n = 0; !crossed; n++) {
          await a.send({ type: 'broadcast', event: 'probe', payload: { n } })
          for (let w = 0; w < 10 && !crossed; w++) await new Promise((r) => setTimeout(r, 20))
        }
      })(),
      'a probe to cross from node a to node b',
    )
    for (let i = 0; i < 20; i++) {
      assert.equal(await a.send({ type: 'broadcast', event: 'chat', payload: { i } }), 'ok')
    }
    for (let i = 0; i < 20; i++) {
      const got = await inbox.next(`message ${i} on node b`, (e) => e.event === 'chat')
      assert.deepEqual(got.payload, { i })
    }
  })

  test(`presence is one state across nodes (vsn ${vsn})`, async () => {
    const topic = `cluster-presence-${vsn}`
    const agent = client(nodeA, token(), vsn)
    const customer = client(nodeB, token(), vsn)
    const agentEvents = new Inbox()
    const a = agent.channel(topic, { config: { presence: { key: 'agent-1' } } })
    a.on('presence', { event: 'join' }, (e) => agentEvents.push({ kind: 'join', ...e }))
    a.on('presence', { event: 'leave' }, (e) => agentEvents.push({ kind: 'leave', ...e }))
    await subscribed(a)
    assert.equal(await a.track({ role: 'agent' }), 'ok')

    const customerEvents = new Inbox()
    const c = customer.channel(topic, { config: { presence: { key: 'customer-9' } } })
    c.on('presence', { event: 'sync' }, () => customerEvents.push({ kind: 'sync' }))
    await subscribed(c)
    await customerEvents.next('the customer on node b sees the agent on node a', () =>
      Object.keys(c.presenceState()).includes('agent-1'))
    assert.equal(c.presenceState()['agent-1'][0].role, 'agent')

    assert.equal(await c.track({ role: 'customer' }), 'ok')
    const join = await agentEvents.next('the agent sees the customer join', (e) => e.kind === 'join' && e.key === 'customer-9')
    assert.equal(join.newPresences[0].role, 'customer')

    customer.realtime.disconnect()
    await agentEvents.next('the agent sees the customer leave', (e) => e.kind === 'leave' && e.key === 'customer-9')
    assert.deepEqual(Object.keys(a.presenceState()), ['agent-1'])
  })
}
