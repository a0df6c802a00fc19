// Start the real walcast binary on a free port and make supabase-js clients for it.
// Every wait has a deadline; nothing sleeps to synchronise.
import { spawn } from 'node:child_process'
import { createHmac } from 'node:crypto'
import { chmodSync, existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import path from 'node:path'
import { createClient } from '@supabase/supabase-js'
import WebSocket from 'ws'

export const SECRET = 'walcast-js-compat-secret-with-32-plus-characters'
export const WAIT_MS = 10_000
export const VSNS = ['2.0.0', '1.0.0']

const here = path.dirname(fileURLToPath(import.meta.url))

export function walcastBin() {
  const bin = process.env.WALCAST_BIN ?? path.join(here, '..', '..', 'target', 'debug', 'walcast')
  if (!existsSync(bin)) {
    throw new Error(`walcast binary not found at ${bin}: run \`cargo build\` first (or set WALCAST_BIN)`)
  }
  return bin
}

/** Starts `walcast dev` (its own PostgreSQL in a temporary directory); resolves to
 *  { url, port, dbUrl, stop() }. */
export async function startDev(env = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'walcast-js-'))
  chmodSync(dir, 0o755) // walcast dev runs PostgreSQL as `postgres` when we are root
  const child = spawn(walcastBin(), ['dev'], {
    env: {
      PATH: process.env.PATH,
      PORT: '0',
      API_JWT_SECRET: SECRET,
      WALCAST_DEV_DIR: dir,
      CHANNEL_ERROR_BACKOFF_MS: '0',
      CONNECT_ERROR_BACKOFF_MS: '0',
      STARTUP_GRACE_MS: '0',
      ...env,
    },
    stdio: ['ignore', 'pipe', process.env.WALCAST_TEST_LOG ? 'inherit' : 'ignore'],
  })
  const lines = createInterface({ input: child.stdout })
  const info = await withTimeout(
    new Promise((resolve, reject) => {
      const seen = {}
      lines.on('line', (line) => {
        const m = line.match(/^walcast listening on http:\/\/(.*)$/)
        if (m) seen.url = `http://${m[1]}`
        const db = line.match(/PostgreSQL:\s+(\S+)/)
        if (db) {
          seen.dbUrl = db[1]
          resolve(seen)
        }
      })
      child.once('exit', (code) => reject(new Error(`walcast dev exited with ${code}`)))
    }),
    'walcast dev start',
    60_000,
  )
  return {
    ...info,
    port: Number(info.url.split(':').pop()),
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((resolve) => child.once('exit', resolve))
        child.kill('SIGTERM')
        await withTimeout(exited, 'walcast dev exit', 30_000)
      }
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** Starts walcast; resolves to { url, port, stop(), kill() }. */
export async function startServer(env = {}) {
  const child = spawn(walcastBin(), ['serve'], {
    env: {
      PATH: process.env.PATH,
      PORT: '0',
      WALCAST_BIND: '127.0.0.1',
      API_JWT_SECRET: SECRET,
      CONNECT_ERROR_BACKOFF_MS: '0',
      CHANNEL_ERROR_BACKOFF_MS: '0',
      ...env,
    },
    stdio: ['ignore', 'pipe', process.env.WALCAST_TEST_LOG ? 'inherit' : 'ignore'],
  })
  const lines = createInterface({ input: child.stdout })
  const line = await withTimeout(
    new Promise((resolve, reject) => {
      lines.once('line', resolve)
      child.once('exit', (code) => reject(new Error(`walcast exited with ${code} before listening`)))
    }),
    'walcast start',
  )
  const port = Number(line.split(':').pop())
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.kill('SIGTERM')
      await withTimeout(exited, 'walcast exit')
    },
    /** SIGKILL: a crash. */
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.kill('SIGKILL')
      await withTimeout(exited, 'walcast exit')
    },
  }
}

function b64url(data) {
  return Buffer.from(data).toString('base64url')
}

/** An HS256 JWT signed with `secret`. */
export function signWith(secret, claims) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))
  const body = b64url(JSON.stringify(claims))
  const sig = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url')
  return `${header}.${body}.${sig}`
}

/** An HS256 JWT signed with SECRET (the secret of the walcast the kit starts). */
export function sign(claims) {
  return signWith(SECRET, claims)
}

export const nowSecs = () => Math.floor(Date.now() / 1000)

export function token(role = 'anon', ttlSecs = 3600, extra = {}) {
  return sign({ role, exp: nowSecs() + ttlSecs, sub: `${role}-${Math.random()}`, ...extra })
}

/** A supabase-js client with its defaults, only the transport (Node 20) and vsn set. */
export function client(server, key, vsn) {
  const clients = (client.all ??= [])
  const c = createClient(server.url, key, {
    realtime: { transport: WebSocket, vsn },
    auth: { persistSession: false, autoRefreshToken: false },
  })
  clients.push(c)
  return c
}

export async function closeClients() {
  // supabase-js's disconnect() leaves a 10 s timer armed, which would hold each test file's
  // process open; `npm test` passes --test-force-exit for that reason.
  for (const c of client.all ?? []) {
    await c.removeAllChannels()
    await c.realtime.disconnect()
  }
  client.all = []
}

export function withTimeout(promise, what, ms = WAIT_MS) {
  let timer
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

/** Subscribes and resolves with the first status in `want` (rejects on any other final status). */
export function subscribed(channel, want = ['SUBSCRIBED']) {
  return withTimeout(
    new Promise((resolve, reject) => {
      channel.subscribe((status, err) => {
        if (want.includes(status)) resolve({ status, err })
        else if (status !== 'SUBSCRIBED') reject(new Error(`channel ${channel.topic}: ${status} ${err?.message ?? ''}`))
      })
    }),
    `${channel.topic} to reach ${want.join('/')}`,
  )
}

/** Subscribes and resolves once the server says "Subscribed to PostgreSQL" (what apps wait for
 *  before they rely on postgres_changes). Rejects on a postgres_changes error. */
export function subscribedToPostgres(channel) {
  return withTimeout(
    new Promise((resolve, reject) => {
      channel.on('system', {}, (p) => {
        if (p.extension !== 'postgres_changes') return
        if (p.status === 'ok') resolve(p)
        else reject(new Error(`postgres_changes error on ${channel.topic}: ${p.message}`))
      })
      channel.subscribe((status, err) => {
        if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT' || status === 'CLOSED') {
          reject(new Error(`channel ${channel.topic}: ${status} ${err?.message ?? ''}`))
        }
      })
    }),
    `${channel.topic} to be subscribed to PostgreSQL`,
  )
}

/** Collects events pushed by `register(cb)`; `next(pred)` waits for one that matches. */
export class Inbox {
  constructor() {
    this.items = []
    this.waiters = []
  }
  push = (item) => {
    this.items.push(item)
    for (const w of [...this.waiters]) w()
  }
  next(what, pred = () => true) {
    return withTimeout(
      new Promise((resolve) => {
        const check = () => {
          const i = this.items.findIndex(pred)
          if (i >= 0) {
            const [item] = this.items.splice(i, 1)
            this.waiters = this.waiters.filter((w) => w !== check)
            resolve(item)
            return true
          }
          return false
        }
        if (!check()) this.waiters.push(check)
      }),
      what,
    )
  }
}
