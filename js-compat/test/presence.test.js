// Presence between two supabase-js clients: state, join diff, leave diff on disconnect.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, subscribed, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const t = useTarget({ file: import.meta.url })
const run = randomUUID().slice(0, 8)

conformance(t, { features: ['presence', 'presence-shapes'], title: 'presence state, join and leave between two clients' }, async (vsn) => {
  const agent = client(t, t.anonKey(), vsn)
  const customer = client(t, t.anonKey(), vsn)
  const topic = `support-${run}-${vsn}`

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

conformance(t, { features: ['presence'], title: 'untrack sends a leave' }, async (vsn) => {
  const one = client(t, t.anonKey(), vsn)
  const two = client(t, t.anonKey(), vsn)
  const topic = `untrack-${run}-${vsn}`
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
