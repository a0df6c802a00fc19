// Checklist lines that supabase-js relies on but does not expose: raw Phoenix frames over a real
// socket at the URL supabase-js uses (`/realtime/v1/websocket`), vsn 1.0.0 objects and 2.0.0
// arrays, and the HTTP answers of refused upgrades.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { nowSecs } from '../lib/harness.js'
import { openRaw } from '../lib/raw.js'
import { useTarget, conformance } from '../lib/kit.js'

const t = useTarget({ file: import.meta.url })
const run = randomUUID().slice(0, 8)
const topic = (name, vsn) => `realtime:${name}-${run}-${vsn}`

const sockets = []
async function open(vsn, opts = {}) {
  const s = await openRaw(t.url, { apikey: t.anonKey(), vsn, ...opts })
  sockets.push(s)
  return s
}
function closeAll() {
  for (const s of sockets.splice(0)) s.close()
}

/** Resolves to the refusal of an upgrade: { status, body }. */
async function refused(opts) {
  try {
    const s = await openRaw(t.url, opts)
    s.close()
  } catch (e) {
    if (e.status) return { status: e.status, body: e.body, type: e.headers['content-type'] }
    throw e
  }
  throw new Error('the upgrade was accepted')
}

conformance(t, { features: ['heartbeat'], title: 'a heartbeat on topic phoenix is answered ok {} with its ref' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const ref = s.push('phoenix', 'heartbeat', {})
    const r = await s.reply(ref)
    assert.equal(r.topic, 'phoenix')
    assert.deepEqual(r.payload, { status: 'ok', response: {} })
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['vsn', 'v1-framing', 'v2-framing'], title: 'the vsn parameter picks the framing; absent means 1.0.0; another version is refused with 403' }, async (vsn) => {
  try {
    const s = await open(vsn)
    const r = await s.reply(s.push('phoenix', 'heartbeat', {}))
    if (vsn === '2.0.0') {
      assert.ok(Array.isArray(r.raw), 'vsn 2.0.0 answers with arrays')
      assert.equal(r.raw.length, 5)
    } else {
      assert.deepEqual(Object.keys(r.raw).sort(), ['event', 'payload', 'ref', 'topic'], 'vsn 1.0.0 answers with objects, no join_ref')
    }
    const plain = await open(undefined)
    const p = await plain.reply(plain.push('phoenix', 'heartbeat', {}))
    assert.ok(!Array.isArray(p.raw), 'no vsn: 1.0.0 objects')
    const bad = await refused({ apikey: t.anonKey(), vsn: '3.0.0' })
    assert.equal(bad.status, 403)
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['v1-framing', 'v2-framing', 'join-reply'], title: "a join's reply: ok with postgres_changes [] and the join's refs" }, async (vsn) => {
  const s = await open(vsn)
  try {
    const { joinRef, reply } = await s.join(topic('reply', vsn), { config: { broadcast: { self: false }, presence: { key: '' } } }, '7')
    assert.deepEqual(reply.payload, { status: 'ok', response: { postgres_changes: [] } })
    if (vsn === '2.0.0') assert.equal(reply.join_ref, joinRef)
    else assert.ok(!('join_ref' in reply.raw), 'vsn 1.0.0 never emits join_ref')
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['malformed-frames'], title: 'malformed frames are dropped and the socket stays open' }, async (vsn) => {
  const s = await open(vsn)
  try {
    s.sendRaw('not json')
    s.sendRaw('{"topic":"phoenix"}')
    s.sendRaw(vsn === '2.0.0' ? '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"x"}' : '[null,"x","phoenix","heartbeat",{}]')
    s.sendRaw('[1,2]')
    const r = await s.reply(s.push('phoenix', 'heartbeat', {}))
    assert.equal(r.payload.status, 'ok')
    assert.equal(s.ws.readyState, 1, 'still open')
    assert.ok(!s.inbox.items.some((m) => m.ref === 'x'), 'the frame of the other vsn was not answered')
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['unmatched-topic'], title: 'a message to a topic not joined, or a join outside realtime:*, gets unmatched topic' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const ref = s.push(topic('nojoin', vsn), 'broadcast', { type: 'broadcast', event: 'e', payload: {} })
    assert.deepEqual((await s.reply(ref)).payload, { status: 'error', response: { reason: 'unmatched topic' } })
    const ref2 = s.push(`elsewhere:${run}`, 'phx_join', { config: {} }, { joinRef: '9' })
    assert.deepEqual((await s.reply(ref2)).payload, { status: 'error', response: { reason: 'unmatched topic' } })
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['duplicate-join'], title: 'joining a joined topic again closes the old channel, then joins' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const name = topic('dup', vsn)
    await s.join(name, { config: {} }, '1')
    const ref = s.push(name, 'phx_join', { config: {} }, { joinRef: '2' })
    const close = await s.next('phx_close of the old channel', (m) => m.event === 'phx_close' && m.topic === name)
    if (vsn === '2.0.0') assert.equal(close.join_ref, '1')
    const reply = await s.reply(ref)
    assert.equal(reply.payload.status, 'ok')
    assert.ok(s.inbox.items.every((m) => m.event !== 'phx_reply' || m.ref !== ref), 'one reply')
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['leave'], title: 'phx_leave answers ok {} then phx_close; leaving an unjoined topic answers ok {}' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const name = topic('leave', vsn)
    await s.join(name, { config: {} }, '1')
    const ref = s.push(name, 'phx_leave', {}, { joinRef: '1' })
    assert.deepEqual((await s.reply(ref)).payload, { status: 'ok', response: {} })
    await s.next('phx_close after the leave', (m) => m.event === 'phx_close' && m.topic === name)
    const ref2 = s.push(topic('never-joined', vsn), 'phx_leave', {})
    assert.deepEqual((await s.reply(ref2)).payload, { status: 'ok', response: {} })
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['empty-topic', 'join-error'], title: 'joining realtime: with no name is refused with TopicNameRequired' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const { reply } = await s.join('realtime:', { config: {} }, '1')
    assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'TopicNameRequired: You must provide a topic name' } })
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['sb-token-ignored'], title: 'an sb_ access_token in the join is ignored: the connect token is used' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const { reply } = await s.join(topic('sb', vsn), { config: {}, access_token: 'sb_publishable_abc' }, '1')
    assert.equal(reply.payload.status, 'ok')
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['join-lenient', 'stale-join-ref', 'broadcast'], title: 'string booleans in the join config work; pushes with a stale or no join_ref are delivered' }, async (vsn) => {
  const s = await open(vsn)
  try {
    const name = topic('lenient', vsn)
    await s.join(name, { config: { broadcast: { self: 'true', ack: 'TRUE' } } }, '1')
    for (const joinRef of ['1', 'stale', null]) {
      const ref = s.push(name, 'broadcast', { type: 'broadcast', event: 'e', payload: { joinRef } }, { joinRef })
      const echo = await s.next(`the echo of the push with join_ref ${joinRef}`, (m) => m.event === 'broadcast' && m.topic === name)
      assert.deepEqual(echo.payload, { type: 'broadcast', event: 'e', payload: { joinRef } })
      assert.equal((await s.reply(ref)).payload.status, 'ok', 'ack "TRUE" answers')
    }
    for (const payload of ['a string', [1, 2], { config: 5 }]) {
      const { reply } = await s.join(topic(`tolerant-${typeof payload}`, vsn), payload, '5')
      assert.equal(reply.payload.status, 'ok', JSON.stringify(payload))
    }
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['log-level'], title: 'the log_level parameter is accepted' }, async (vsn) => {
  try {
    for (const level of ['info', 'warning', 'error']) {
      const s = await open(vsn, { params: { log_level: level } })
      assert.equal((await s.reply(s.push('phoenix', 'heartbeat', {}))).payload.status, 'ok')
    }
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['token-source'], title: 'the x-api-key header wins over the apikey parameter; whitespace in the token is ignored' }, async (vsn) => {
  try {
    const s = await open(vsn, { apikey: 'not-a-token', headers: { 'x-api-key': t.anonKey() } })
    assert.equal((await s.reply(s.push('phoenix', 'heartbeat', {}))).payload.status, 'ok')
    const key = t.anonKey()
    const spaced = await open(vsn, { apikey: `${key.slice(0, 10)}\n ${key.slice(10)} ` })
    assert.equal((await spaced.reply(spaced.push('phoenix', 'heartbeat', {}))).payload.status, 'ok')
  } finally {
    closeAll()
  }
})

conformance(t, { features: ['connect-errors', 'token-source', 'jwt'], needs: ['sign'], title: 'refused upgrades answer 401 with the exact JSON error' }, async (vsn) => {
  const cases = [
    [undefined, 'API key is missing'],
    ['not-a-jwt', 'The token provided is not a valid JWT'],
    [t.secret ? t.sign({ role: 'anon', exp: nowSecs() - 10 }) : '', 'Token has expired'],
    [t.secret ? t.sign({ exp: nowSecs() + 100 }) : '', 'Fields `role` and `exp` are required in JWT'],
  ]
  for (const [apikey, error] of cases) {
    const r = await refused({ apikey, vsn })
    assert.equal(r.status, 401, error)
    assert.deepEqual(JSON.parse(r.body), { error })
    assert.match(r.type, /application\/json/)
  }
})

conformance(t, { features: ['http-misc'], title: 'GET /api/ping answers {"message":"Success"}' }, async () => {
  const res = await fetch(new URL('realtime/v1/api/ping', t.url.replace(/\/*$/, '/')), { headers: { apikey: t.anonKey(), authorization: `Bearer ${t.anonKey()}` } })
  assert.equal(res.status, 200)
  assert.deepEqual(await res.json(), { message: 'Success' })
})
