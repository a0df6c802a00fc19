// Tokens as supabase-js uses them: a bad token, setAuth() refresh, and expiry.
import { test, before, after, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import { startServer, client, closeClients, token, sign, nowSecs, subscribed, Inbox, withTimeout, VSNS } from '../lib/harness.js'

let server
before(async () => {
  server = await startServer()
})
afterEach(closeClients)
after(() => server.stop())

/** Resolves with every status the channel reports until `until` matches. */
function statuses(channel, until) {
  const seen = []
  return withTimeout(
    new Promise((resolve) => {
      channel.subscribe((status, err) => {
        seen.push({ status, message: err?.message })
        if (until(status)) resolve(seen)
      })
    }),
    `${channel.topic} statuses`,
  )
}

for (const vsn of VSNS) {
  test(`vsn ${vsn}: a bad token gives CHANNEL_ERROR with the server's reason`, async () => {
    const c = client(server, token('anon'), vsn)
    await c.realtime.setAuth('not-a-jwt')
    const ch = c.channel(`bad-${vsn}`)
    const seen = await statuses(ch, (s) => s === 'CHANNEL_ERROR')
    const err = seen.find((s) => s.status === 'CHANNEL_ERROR')
    assert.equal(err.message, 'MalformedJWT: The token provided is not a valid JWT')
    assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'))
  })

  test(`vsn ${vsn}: a socket with a bad key never subscribes`, async () => {
    const c = client(server, 'garbage-key', vsn)
    const ch = c.channel(`badkey-${vsn}`)
    const seen = await statuses(ch, (s) => s === 'CHANNEL_ERROR' || s === 'TIMED_OUT')
    assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), JSON.stringify(seen))
  })

  test(`vsn ${vsn}: setAuth() with a new token keeps the channel alive past the old token's expiry`, async () => {
    const exp = nowSecs() + 2
    const short = sign({ role: 'authenticated', exp, sub: 'u1' })
    const c = client(server, short, vsn)
    const statusLog = []
    const inbox = new Inbox()
    const ch = c.channel(`refresh-${vsn}`, { config: { broadcast: { self: true, ack: true } } })
    ch.on('broadcast', { event: 'x' }, inbox.push)
    ch.on('system', {}, (p) => statusLog.push(p))
    await subscribed(ch)
    await c.realtime.setAuth(token('authenticated'))
    // Cross the old token's expiry, then prove the channel still works.
    await withTimeout(
      new Promise((resolve) => {
        const t = setInterval(() => {
          if (nowSecs() > exp + 1) {
            clearInterval(t)
            resolve()
          }
        }, 100)
      }),
      'the old token to expire',
    )
    assert.equal(await ch.send({ type: 'broadcast', event: 'x', payload: { alive: true } }), 'ok')
    assert.deepEqual((await inbox.next('own broadcast')).payload, { alive: true })
    assert.equal(ch.state, 'joined')
    assert.deepEqual(statusLog, [], 'no system error was sent')
  })

  test(`vsn ${vsn}: an expired token ends the channel with the server's message`, async () => {
    const short = sign({ role: 'anon', exp: nowSecs() + 2 })
    const c = client(server, short, vsn)
    const system = new Inbox()
    const ch = c.channel(`expire-${vsn}`)
    ch.on('system', {}, system.push)
    const seen = statuses(ch, (s) => s === 'CLOSED')
    const msg = await system.next('token expiry system message')
    assert.equal(msg.status, 'error')
    assert.match(msg.message, /^Token has expired \d+ seconds ago$/)
    const all = await seen
    assert.deepEqual(all.map((s) => s.status), ['SUBSCRIBED', 'CLOSED'])
  })
}
