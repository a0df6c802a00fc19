// A raw Phoenix socket for the checklist lines supabase-js does not expose (heartbeat replies,
// malformed frames, duplicate joins, exact reply shapes): JSON frames of vsn 1.0.0 (objects) or
// 2.0.0 (arrays), decoded to { join_ref, ref, topic, event, payload } either way.
import WebSocket from 'ws'
import { Inbox, withTimeout } from './harness.js'

/** The socket URL supabase-js would use for `baseUrl` (`/realtime/v1/websocket`). */
export function socketUrl(baseUrl, params) {
  const u = new URL('realtime/v1/websocket', baseUrl.replace(/\/*$/, '/'))
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:'
  for (const [k, v] of Object.entries(params)) if (v !== undefined) u.searchParams.set(k, v)
  return u.toString()
}

/** Opens a socket; resolves to a RawSocket once open, rejects with { status, body } when the
 *  upgrade is refused. `vsn: undefined` leaves the parameter out. */
export function openRaw(baseUrl, { apikey, vsn = '1.0.0', params = {}, headers = {} } = {}) {
  const ws = new WebSocket(socketUrl(baseUrl, { apikey, vsn, ...params }), { headers })
  return withTimeout(
    new Promise((resolve, reject) => {
      ws.once('open', () => resolve(new RawSocket(ws, vsn ?? '1.0.0')))
      ws.once('unexpected-response', (_req, res) => {
        let body = ''
        res.on('data', (d) => (body += d))
        res.on('end', () => reject(Object.assign(new Error(`upgrade refused with ${res.statusCode}: ${body}`), { status: res.statusCode, body, headers: res.headers })))
      })
      ws.once('error', (e) => reject(e))
    }),
    'the socket to open',
  )
}

export class RawSocket {
  constructor(ws, vsn) {
    this.ws = ws
    this.vsn = vsn
    this.inbox = new Inbox()
    this.ref = 0
    this.closed = new Promise((resolve) => ws.once('close', (code) => resolve(code)))
    ws.on('message', (data, isBinary) => {
      if (isBinary) {
        this.inbox.push({ binary: Buffer.from(data) })
        return
      }
      const m = JSON.parse(data.toString())
      this.inbox.push(Array.isArray(m) ? { join_ref: m[0], ref: m[1], topic: m[2], event: m[3], payload: m[4], raw: m } : { ...m, raw: m })
    })
  }

  /** Sends one message; returns its ref. */
  push(topic, event, payload, { joinRef = null, ref } = {}) {
    const r = ref === undefined ? String(++this.ref) : ref
    this.sendRaw(this.vsn === '2.0.0' ? JSON.stringify([joinRef, r, topic, event, payload]) : JSON.stringify({ topic, event, payload, ref: r, join_ref: joinRef }))
    return r
  }

  sendRaw(text) {
    this.ws.send(text)
  }

  /** The reply to `ref`. */
  reply(ref, what = `the reply to ${ref}`) {
    return this.inbox.next(what, (m) => m.event === 'phx_reply' && m.ref === ref)
  }

  next(what, pred) {
    return this.inbox.next(what, pred)
  }

  /** Joins `topic` with `payload`; resolves to the reply. */
  async join(topic, payload = { config: {} }, joinRef) {
    const jr = joinRef ?? String(this.ref + 1)
    const ref = this.push(topic, 'phx_join', payload, { joinRef: jr })
    return { joinRef: jr, reply: await this.reply(ref, `the join reply of ${topic}`) }
  }

  close() {
    this.ws.close()
  }
}
