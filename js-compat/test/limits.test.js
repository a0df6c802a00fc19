// Limits as supabase-js meets them. The presence rate limit holds at its default (the
// original's 5 per 30 s); the others are checked on a walcast the kit starts with a low limit, so
// against an external deployment they are skipped (its settings are not the kit's to change).
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, subscribed, Inbox, withTimeout } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const t = useTarget({ file: import.meta.url })
const run = randomUUID().slice(0, 8)

/** Resolves with the channel's statuses until `until` matches. */
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

conformance(t, { features: ['presence-limits', 'channel-shutdown'], title: 'a sixth presence message within 30 s ends the channel with "Client presence rate limit exceeded"' }, async (vsn) => {
  const c = client(t, t.anonKey(), vsn)
  const system = new Inbox()
  const ch = c.channel(`presence-flood-${run}-${vsn}`, { config: { presence: { key: 'k' } } })
  ch.on('system', {}, system.push)
  const closed = statuses(ch, (s) => s === 'CLOSED')
  for (let i = 0; i < 5; i++) assert.equal(await ch.track({ n: i }), 'ok', `track ${i + 1}`)
  ch.track({ n: 6 })
  const msg = await system.next('the presence limit system message', (p) => p.status === 'error')
  assert.equal(msg.message, 'Client presence rate limit exceeded')
  assert.equal(msg.extension, 'system')
  assert.deepEqual((await closed).map((s) => s.status), ['SUBSCRIBED', 'CLOSED'])
})

conformance(t, { features: ['limits', 'join-error'], needs: ['control'], title: 'one channel more than TENANT_MAX_CHANNELS_PER_CLIENT is refused with ChannelRateLimitReached' }, async (vsn) => {
  const server = await t.startServer({ TENANT_MAX_CHANNELS_PER_CLIENT: '2' })
  const c = client(server, t.anonKey(), vsn)
  await subscribed(c.channel(`one-${vsn}`))
  await subscribed(c.channel(`two-${vsn}`))
  const seen = await statuses(c.channel(`three-${vsn}`), (s) => s === 'CHANNEL_ERROR')
  assert.equal(seen.at(-1).message, 'ChannelRateLimitReached: Too many channels')
})

conformance(t, { features: ['broadcast-size', 'limits'], needs: ['control'], title: 'a broadcast over TENANT_MAX_PAYLOAD_SIZE_IN_KB is dropped and its ack is an error' }, async (vsn) => {
  const server = await t.startServer({ TENANT_MAX_PAYLOAD_SIZE_IN_KB: '1' })
  const sender = client(server, t.anonKey(), vsn)
  const receiver = client(server, t.anonKey(), vsn)
  const inbox = new Inbox()
  const r = receiver.channel(`size-${vsn}`)
  r.on('broadcast', { event: '*' }, inbox.push)
  await subscribed(r)
  const s = sender.channel(`size-${vsn}`, { config: { broadcast: { ack: true } } })
  await subscribed(s)
  assert.equal(await s.send({ type: 'broadcast', event: 'big', payload: { text: 'x'.repeat(4000) } }), 'error')
  assert.equal(await s.send({ type: 'broadcast', event: 'small', payload: { text: 'fits' } }), 'ok')
  const got = await inbox.next('the small broadcast')
  assert.equal(got.event, 'small', 'the big one never arrived')
})
