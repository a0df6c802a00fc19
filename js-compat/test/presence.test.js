// Presence between two supabase-js clients: state, join diff, leave diff on disconnect.
import { test, before, after, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import { startServer, client, closeClients, token, subscribed, Inbox, VSNS } from '../lib/harness.js'

let server
before(async () => {
  server = await startServer()
})
afterEach(closeClients)
after(() => server.stop())

for (const vsn of VSNS) {
  test(`vsn ${vsn}: presence state, join and leave between two clients`, async () => {
    const agent = client(server, token('authenticated'), vsn)
    const customer = client(server, token('anon'), vsn)
    const topic = `support-${vsn}`

    const agentEvents = new Inbox()
    const a = agent.channel(topic, { config: { presence: { key: 'agent-1' } } })
    a.on('presence', { event: 'sync' }, () => agentEvents.push({ kind: 'sync' }))
    a.on('presence', { event: 'join' }, (e) => agentEvents.push({ kind: 'join', ...e }))
    a.on('presence', { event: 'leave' }, (e) => agentEvents.push({ kind: 'leave', ...e }))
    await subscribed(a)
    assert.equal(await a.track({ role: 'agent', online_at: 't0' }), 'ok')
    const selfJoin = await agentEvents.next('agent sees itself join', (e) => e.kind === 'join' && e.key === 'agent-1')
    assert.equal(selfJoin.newPresences[0].role, 'agent')
    assert.ok(selfJoin.newPresences[0].presence_ref, 'metas carry a presence_ref')

    const customerEvents = new Inbox()
    const c = customer.channel(topic, { config: { presence: { key: 'customer-9' } } })
    c.on('presence', { event: 'sync' }, () => customerEvents.push({ kind: 'sync' }))
    await subscribed(c)
    // The customer's presence_state already holds the agent.
    await customerEvents.next('customer sync', () => Object.keys(c.presenceState()).includes('agent-1'))
    assert.equal(c.presenceState()['agent-1'][0].role, 'agent')

    assert.equal(await c.track({ role: 'customer' }), 'ok')
    const join = await agentEvents.next('agent sees the customer join', (e) => e.kind === 'join' && e.key === 'customer-9')
    assert.equal(join.newPresences[0].role, 'customer')
    assert.deepEqual(Object.keys(a.presenceState()).sort(), ['agent-1', 'customer-9'])

    // The customer's socket goes away: the agent sees the leave.
    customer.realtime.disconnect()
    const leave = await agentEvents.next('agent sees the customer leave', (e) => e.kind === 'leave' && e.key === 'customer-9')
    assert.equal(leave.leftPresences[0].role, 'customer')
    assert.deepEqual(Object.keys(a.presenceState()), ['agent-1'])
  })

  test(`vsn ${vsn}: untrack sends a leave`, async () => {
    const one = client(server, token('anon'), vsn)
    const two = client(server, token('anon'), vsn)
    const topic = `untrack-${vsn}`
    const events = new Inbox()
    const watcher = two.channel(topic, { config: { presence: { key: 'watcher' } } })
    watcher.on('presence', { event: 'join' }, (e) => events.push({ kind: 'join', ...e }))
    watcher.on('presence', { event: 'leave' }, (e) => events.push({ kind: 'leave', ...e }))
    await subscribed(watcher)
    const ch = one.channel(topic, { config: { presence: { key: 'typist' } } })
    await subscribed(ch)
    assert.equal(await ch.track({ typing: true }), 'ok')
    await events.next('join', (e) => e.kind === 'join' && e.key === 'typist')
    assert.equal(await ch.untrack(), 'ok')
    const leave = await events.next('leave', (e) => e.kind === 'leave' && e.key === 'typist')
    assert.equal(leave.leftPresences[0].typing, true)
  })
}
