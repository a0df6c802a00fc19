// Two supabase-js clients broadcasting to each other: self, ack, httpSend, REST fallback.
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
  test(`vsn ${vsn}: two clients broadcast to each other, self off, ack on and off`, async () => {
    const alice = client(server, token('anon'), vsn)
    const bob = client(server, token('anon'), vsn)
    const aliceInbox = new Inbox()
    const bobInbox = new Inbox()
    const a = alice.channel(`room-${vsn}`, { config: { broadcast: { ack: true } } })
    a.on('broadcast', { event: 'chat' }, aliceInbox.push)
    const b = bob.channel(`room-${vsn}`)
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

  test(`vsn ${vsn}: self on echoes to the sender`, async () => {
    const alice = client(server, token('anon'), vsn)
    const inbox = new Inbox()
    const ch = alice.channel(`echo-${vsn}`, { config: { broadcast: { self: true, ack: true } } })
    ch.on('broadcast', { event: 'ping' }, inbox.push)
    await subscribed(ch)
    assert.equal(await ch.send({ type: 'broadcast', event: 'ping', payload: { n: 1 } }), 'ok')
    const echo = await inbox.next('own message')
    assert.deepEqual(echo.payload, { n: 1 })
  })

  test(`vsn ${vsn}: httpSend reaches subscribers`, async () => {
    const alice = client(server, token('anon'), vsn)
    const bob = client(server, token('anon'), vsn)
    const inbox = new Inbox()
    const b = bob.channel(`http-${vsn}`)
    b.on('broadcast', { event: 'via-http' }, inbox.push)
    await subscribed(b)
    const a = alice.channel(`http-${vsn}`)
    const res = await a.httpSend('via-http', { from: 'rest' })
    assert.deepEqual(res, { success: true })
    const got = await inbox.next('httpSend message')
    assert.deepEqual(got.payload, { from: 'rest' })
  })

  test(`vsn ${vsn}: send() on a channel that is not joined falls back to REST`, async () => {
    const alice = client(server, token('anon'), vsn)
    const bob = client(server, token('anon'), vsn)
    const inbox = new Inbox()
    const b = bob.channel(`fallback-${vsn}`)
    b.on('broadcast', { event: 'fb' }, inbox.push)
    await subscribed(b)
    const a = alice.channel(`fallback-${vsn}`)
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
}

test('a vsn 2.0.0 client and a vsn 1.0.0 client talk to each other', async () => {
  const v2 = client(server, token('anon'), '2.0.0')
  const v1 = client(server, token('anon'), '1.0.0')
  const in2 = new Inbox()
  const in1 = new Inbox()
  const c2 = v2.channel('mixed', { config: { broadcast: { ack: true } } })
  c2.on('broadcast', { event: 'm' }, in2.push)
  const c1 = v1.channel('mixed', { config: { broadcast: { ack: true } } })
  c1.on('broadcast', { event: 'm' }, in1.push)
  await subscribed(c2)
  await subscribed(c1)
  assert.equal(await c2.send({ type: 'broadcast', event: 'm', payload: { from: 'v2' } }), 'ok')
  assert.deepEqual((await in1.next('v1 receives v2')).payload, { from: 'v2' })
  assert.equal(await c1.send({ type: 'broadcast', event: 'm', payload: { from: 'v1' } }), 'ok')
  assert.deepEqual((await in2.next('v2 receives v1')).payload, { from: 'v1' })
})
