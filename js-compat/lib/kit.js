// The conformance kit's view of its target: a walcast it starts itself (the default), or an
// external Realtime deployment given by REALTIME_URL (+ ANON_KEY / SERVICE_ROLE_KEY or
// JWT_SECRET, + DATABASE_URL). Tests are declared with `conformance()`, which tags them with the
// checklist lines they check (lib/features.js) and runs them under both vsn, and skips them, with
// the reason, when the target cannot give what they need.
import { test, before, after, afterEach } from 'node:test'
import { randomBytes } from 'node:crypto'
import path from 'node:path'
import pg from 'pg'
import { FEATURE_IDS } from './features.js'
import { testName } from './report.js'
import { SECRET, VSNS, closeClients, signWith, nowSecs, startDev, startServer } from './harness.js'

export const EXTERNAL = Boolean(process.env.REALTIME_URL)

/** What a test needs from the target, and why it is skipped when the target cannot give it. */
const NEEDS = {
  // sign tokens of our choosing (a user id, a short expiry)
  sign: () => (EXTERNAL && !process.env.JWT_SECRET ? 'needs JWT_SECRET to sign test users (external deployment without it)' : null),
  // write rows and create the kit's schema in the target's database
  db: () => (EXTERNAL && !process.env.DATABASE_URL ? 'needs DATABASE_URL to write rows (external deployment without it)' : null),
  // start, stop or reconfigure the server
  control: () => (EXTERNAL ? 'needs control of the server (start it with other settings, restart it): not possible against an external deployment' : null),
  // a walcast extension the original does not have (catch-up on rejoin)
  walcast: () => (EXTERNAL && !process.env.WALCAST_EXTENSIONS ? 'a walcast extension (set WALCAST_EXTENSIONS=1 to check it against a walcast deployment)' : null),
}

export function skipReason(needs) {
  for (const n of needs) {
    if (!NEEDS[n]) throw new Error(`unknown need ${n}`)
    const reason = NEEDS[n]()
    if (reason) return reason
  }
  return null
}

/**
 * The target of one test file. `useTarget({ db: true })` registers the file's hooks: against
 * the kit's own walcast it starts `walcast dev` (with db) or `walcast serve` (without), once per
 * file; against an external deployment it only connects to DATABASE_URL when a test asks for it.
 */
export function useTarget({ db = false, file = 'kit' } = {}) {
  const t = new Target({ db, file })
  before(() => t.start())
  afterEach(closeClients)
  after(() => t.stop())
  return t
}

export class Target {
  constructor({ db, file }) {
    this.wantsDb = db
    this.schema = `rtkit_${path.basename(file).replace(/\W.*$/, '').replace(/[^a-z0-9]/gi, '_').toLowerCase()}_${randomBytes(3).toString('hex')}`
    this.server = null
    this.pool = null
    this.schemaReady = null
    this.extraServers = []
  }

  async start() {
    if (EXTERNAL) {
      this.url = process.env.REALTIME_URL.replace(/\/+$/, '')
      this.dbUrl = process.env.DATABASE_URL ?? null
      this.secret = process.env.JWT_SECRET ?? null
      return
    }
    this.server = this.wantsDb ? await startDev() : await startServer()
    this.url = this.server.url
    this.dbUrl = this.server.dbUrl ?? null
    this.secret = SECRET
  }

  async stop() {
    try {
      if (this.schemaReady && this.pool) await teardownSchema(this.pool, this.schema)
    } finally {
      await this.pool?.end()
      for (const s of this.extraServers) await s.stop()
      await this.server?.stop()
    }
  }

  /** The file's database set-up, run once before the first test that needs 'db' (each such test
   *  fails with its error, e.g. the preflight's refusal). */
  prepare(fn) {
    this.prepareFn = fn
  }

  prepared() {
    this.preparing ??= this.prepareFn ? this.prepareFn() : Promise.resolve()
    return this.preparing
  }

  /** A signed token (needs 'sign'). */
  token(role = 'anon', ttlSecs = 3600, extra = {}) {
    return this.sign({ role, exp: nowSecs() + ttlSecs, sub: `${role}-${Math.random()}`, ...extra })
  }

  sign(claims) {
    if (!this.secret) throw new Error('no JWT_SECRET: this test should have been tagged with needs: [sign]')
    return signWith(this.secret, claims)
  }

  /** The anon key: ANON_KEY when given, else one signed with the secret. */
  anonKey() {
    if (EXTERNAL && process.env.ANON_KEY) return process.env.ANON_KEY
    if (EXTERNAL && !this.secret) throw new Error('set ANON_KEY or JWT_SECRET for an external deployment')
    return this.token('anon')
  }

  serviceKey() {
    if (EXTERNAL && process.env.SERVICE_ROLE_KEY) return process.env.SERVICE_ROLE_KEY
    return this.token('service_role')
  }

  /** A pg pool on the target's database, after the preflight checks (refuses with the reason). */
  async db() {
    if (!this.dbUrl) throw new Error('no database URL: this test should have been tagged with needs: [db]')
    if (!this.pool) {
      // Unqualified names in the tests' SQL mean the kit's own schema.
      this.pool = new pg.Pool({ connectionString: this.dbUrl, max: 3, options: `-c search_path=${this.schema},public` })
      this.pool.on('error', () => {})
      this.preflight = preflight(this.pool)
    }
    await this.preflight
    return this.pool
  }

  /** Creates the kit's own schema (named `this.schema`) once per file; `sql(schema)` returns
   *  the statements that create its objects. Tables listed in `publish` join the publication
   *  `supabase_realtime` (dropped with the schema at the end). */
  async setupSchema(sql, { publish = [] } = {}) {
    const db = await this.db()
    this.schemaReady ??= (async () => {
      const s = this.schema
      await db.query(`CREATE SCHEMA ${s}; GRANT USAGE ON SCHEMA ${s} TO anon, authenticated, service_role;`)
      await db.query(sql(s))
      const { rows } = await db.query("SELECT puballtables FROM pg_publication WHERE pubname = 'supabase_realtime'")
      if (publish.length && !rows[0]?.puballtables) {
        await db.query(`ALTER PUBLICATION supabase_realtime ADD TABLE ${publish.map((tb) => `${s}.${tb}`).join(', ')}`)
      }
    })()
    return this.schemaReady
  }

  /** Starts another walcast of the kit's with extra settings (needs 'control'). */
  async startServer(env) {
    if (EXTERNAL) throw new Error('no control of an external deployment: this test should have been tagged with needs: [control]')
    const s = await startServer(env)
    this.extraServers.push(s)
    return s
  }
}

/** The kit never changes what it did not create: its objects live in schema `rtkit_*` and its
 *  policies on realtime.messages are named after that schema. */
async function teardownSchema(db, schema) {
  const { rows } = await db.query(
    "SELECT policyname FROM pg_policies WHERE schemaname = 'realtime' AND tablename = 'messages' AND policyname LIKE $1",
    [`${schema}%`],
  )
  for (const r of rows) await db.query(`DROP POLICY "${r.policyname}" ON realtime.messages`)
  await db.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`)
}

/** What the kit needs of a target database; a refusal names everything that is missing. */
export async function preflight(db) {
  const missing = []
  const one = async (sql, params = []) => (await db.query(sql, params)).rows[0]
  const wal = await one('SHOW wal_level')
  if (wal.wal_level !== 'logical') missing.push(`logical replication (wal_level is ${wal.wal_level}, needs logical)`)
  if (!(await one("SELECT 1 AS ok FROM pg_publication WHERE pubname = 'supabase_realtime'"))) missing.push('the publication supabase_realtime')
  for (const role of ['anon', 'authenticated', 'service_role']) {
    if (!(await one('SELECT 1 AS ok FROM pg_roles WHERE rolname = $1', [role]))) missing.push(`the role ${role}`)
  }
  if (!(await one("SELECT 1 AS ok FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'auth' AND p.proname = 'uid'"))) missing.push('the function auth.uid()')
  if (!(await one("SELECT to_regclass('realtime.messages') IS NOT NULL AS ok")).ok) missing.push('the table realtime.messages')
  for (const fn of ['topic', 'send', 'broadcast_changes']) {
    if (!(await one("SELECT 1 AS ok FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'realtime' AND p.proname = $1", [fn]))) missing.push(`the function realtime.${fn}()`)
  }
  if (!(await one("SELECT has_database_privilege(current_user, current_database(), 'CREATE') AS ok")).ok) missing.push('the CREATE privilege on the database (for the kit\'s own schema)')
  if (missing.length) {
    throw new Error(`refused: the target database lacks ${missing.join(', ')}; the kit sets up only its own schema and never changes these`)
  }
}

/**
 * Declares one conformance test per vsn:
 *   conformance(t, { features: ['broadcast'], needs: ['sign'], title: '...' }, async (vsn) => {...})
 * `vsns` defaults to both; a test that mixes versions passes `vsns: ['2.0.0+1.0.0']`.
 */
export function conformance(t, { features, needs = [], title, vsns = VSNS }, fn) {
  for (const id of features) if (!FEATURE_IDS.has(id)) throw new Error(`unknown checklist feature ${id} in "${title}"`)
  if (t.wantsDb === false && needs.includes('db')) throw new Error(`"${title}" needs db: useTarget({ db: true })`)
  const skip = skipReason(needs)
  for (const vsn of vsns) {
    test(testName(features, vsn, title), skip ? { skip } : {}, async () => {
      if (needs.includes('db')) await t.prepared()
      return fn(vsn)
    })
  }
}
