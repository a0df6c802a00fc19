// Two supabase-js clients broadcasting to each other: self, ack, httpSend, REST fallback.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, subscribed, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const t = useTarget({ file: import.meta.url })
const run = randomUUID().slice(0, 8) // topics of this run, apart from other runs on a shared deployment

conformance(t, { features: ['broadcast', 'v2-binary', 'v1-framing', 'v2-framing', 'ws-endpoint'], title: 'two clients broadcast to each other, self off, ack on and off' }, async (vsn) => {
  const alice = client(t, t.anonKey(), vsn)
  const bob = client(t, t.anonKey(), vsn)
  const aliceInbox = new Inbox()
  const bobInbox = new Inbox()
  const a = alice.channel(`room-${run}-${vsn}`, { config: { broadcast: { ack: true } } })
  a.on('broadcast', { event: 'chat' }, aliceInbox.push)
  const b = bob.channel(`room-${run}-${vsn}`)
  b.on('broadcast', { event: '*' }, bobInbox.push)
  await subscribed(a)
  await subscribed(b)

  // ack on: send() resolves 'ok' from the server's reply.
  assert.equal(await a.send({ type: 'broadcast', event: 'chat', payload: { text: 'hi bob' } }), 'ok')
  const got = await bobInbox.next('bob receives alice')
  assert.equal(got.event, 'chat')
  assert.deepEqual(got.payload, { text: 'hi bob' })

  // ack off: resolves at once; alice receives.
  assert.equal(await b.send({ type: 'broadcast', event: 'chat', payload: { text: 'hi alice' } }), 'ok')
  const back = await aliceInbox.next('alice receives bob')
  assert.deepEqual(back.payload, { text: 'hi alice' })

  // self off: alice never got her own message back (bob's reply arrived after it would have).
  assert.equal(aliceInbox.items.length, 0)
  assert.equal(bobInbox.items.length, 0)
})

conformance(t, { features: ['broadcast'], title: 'self on echoes to the sender' }, async (vsn) => {
  const alice = client(t, t.anonKey(), vsn)
  const inbox = new Inbox()
  const ch = alice.channel(`echo-${run}-${vsn}`, { config: { broadcast: { self: true, ack: true } } })
  ch.on('broadcast', { event: 'ping' }, inbox.push)
  await subscribed(ch)
  assert.equal(await ch.send({ type: 'broadcast', event: 'ping', payload: { n: 1 } }), 'ok')
  const echo = await inbox.next('own message')
  assert.deepEqual(echo.payload, { n: 1 })
})

conformance(t, { features: ['rest-broadcast'], title: 'httpSend reaches subscribers' }, async (vsn) => {
  const alice = client(t, t.anonKey(), vsn)
  const bob = client(t, t.anonKey(), vsn)
  const inbox = new Inbox()
  const b = bob.channel(`http-${run}-${vsn}`)
  b.on('broadcast', { event: 'via-http' }, inbox.push)
  await subscribed(b)
  const a = alice.channel(`http-${run}-${vsn}`)
  const res = await a.httpSend('via-http', { from: 'rest' })
  assert.deepEqual(res, { success: true })
  const got = await inbox.next('httpSend message')
  assert.deepEqual(got.payload, { from: 'rest' })
})

conformance(t, { features: ['rest-broadcast'], title: 'send() on a channel that is not joined falls back to REST' }, async (vsn) => {
  const alice = client(t, t.anonKey(), vsn)
  const bob = client(t, t.anonKey(), vsn)
  const inbox = new Inbox()
  const b = bob.channel(`fallback-${run}-${vsn}`)
  b.on('broadcast', { event: 'fb' }, inbox.push)
  await subscribed(b)
  const a = alice.channel(`fallback-${run}-${vsn}`)
  const warn = console.warn
  console.warn = () => {} // supabase-js warns about the fallback
  try {
    assert.equal(await a.send({ type: 'broadcast', event: 'fb', payload: { rest: true } }), 'ok')
  } finally {
    console.warn = warn
  }
  const got = await inbox.next('REST fallback message')
  assert.deepEqual(got.payload, { rest: true })
})

conformance(t, { features: ['broadcast', 'v2-binary'], vsns: ['2.0.0+1.0.0'], title: 'a vsn 2.0.0 client and a vsn 1.0.0 client talk to each other' }, async () => {
  const v2 = client(t, t.anonKey(), '2.0.0')
  const v1 = client(t, t.anonKey(), '1.0.0')
  const in2 = new Inbox()
  const in1 = new Inbox()
  const c2 = v2.channel(`mixed-${run}`, { config: { broadcast: { ack: true } } })
  c2.on('broadcast', { event: 'm' }, in2.push)
  const c1 = v1.channel(`mixed-${run}`, { config: { broadcast: { ack: true } } })
  c1.on('broadcast', { event: 'm' }, in1.push)
  await subscribed(c2)
  await subscribed(c1)
  assert.equal(await c2.send({ type: 'broadcast', event: 'm', payload: { from: 'v2' } }), 'ok')
  assert.deepEqual((await in1.next('v1 receives v2')).payload, { from: 'v2' })
  assert.equal(await c1.send({ type: 'broadcast', event: 'm', payload: { from: 'v1' } }), 'ok')
  assert.deepEqual((await in2.next('v2 receives v1')).payload, { from: 'v1' })
})
