// Tokens as supabase-js uses them: a bad token, setAuth() refresh, and expiry.
import assert from 'node:assert/strict'
import { client, nowSecs, subscribed, Inbox, withTimeout } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const t = useTarget({ file: import.meta.url })

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

conformance(t, { features: ['join-error', 'jwt', 'join-payload'], title: "a bad access_token gives CHANNEL_ERROR with the server's reason" }, async (vsn) => {
  const c = client(t, t.anonKey(), vsn)
  await c.realtime.setAuth('not-a-jwt')
  const ch = c.channel(`bad-${vsn}`)
  const seen = await statuses(ch, (s) => s === 'CHANNEL_ERROR')
  const err = seen.find((s) => s.status === 'CHANNEL_ERROR')
  assert.equal(err.message, 'MalformedJWT: The token provided is not a valid JWT')
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'))
})

conformance(t, { features: ['connect-errors', 'token-source'], title: 'a socket with a bad key never subscribes' }, async (vsn) => {
  const c = client(t, 'garbage-key', vsn)
  const ch = c.channel(`badkey-${vsn}`)
  const seen = await statuses(ch, (s) => s === 'CHANNEL_ERROR' || s === 'TIMED_OUT')
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), JSON.stringify(seen))
})

conformance(t, { features: ['access-token', 'token-expiry'], needs: ['sign'], title: "setAuth() with a new token keeps the channel alive past the old token's expiry" }, async (vsn) => {
  const exp = nowSecs() + 2
  const short = t.sign({ role: 'authenticated', exp, sub: 'u1' })
  const c = client(t, short, vsn)
  const statusLog = []
  const inbox = new Inbox()
  const ch = c.channel(`refresh-${vsn}`, { config: { broadcast: { self: true, ack: true } } })
  ch.on('broadcast', { event: 'x' }, inbox.push)
  ch.on('system', {}, (p) => statusLog.push(p))
  await subscribed(ch)
  await c.realtime.setAuth(t.token('authenticated'))
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

conformance(t, { features: ['token-expiry', 'channel-shutdown'], needs: ['sign'], title: "an expired token ends the channel with the server's message" }, async (vsn) => {
  const short = t.sign({ role: 'anon', exp: nowSecs() + 2 })
  const c = client(t, short, vsn)
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
