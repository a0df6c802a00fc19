// The kit's own tests: its set-up and tear-down on a target database touch only what the kit
// created, and a database that lacks what the kit needs is refused with the reason.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import pg from 'pg'
import { startDev } from '../lib/harness.js'
import { Target, preflight } from '../lib/kit.js'

let dev
let admin
before(async () => {
  dev = await startDev()
  admin = new pg.Client({ connectionString: dev.dbUrl })
  await admin.connect()
})
after(async () => {
  await admin?.end()
  await dev?.stop()
})

test('the kit creates its schema, publishes its tables and adds its policies, and removes exactly those', async () => {
  // What an app already has: a table in the publication and a policy on realtime.messages.
  await admin.query(`
    CREATE TABLE app_messages (id int PRIMARY KEY);
    ALTER PUBLICATION supabase_realtime ADD TABLE app_messages;
    CREATE POLICY app_read ON realtime.messages FOR SELECT TO authenticated USING (true);
  `)
  const t = new Target({ db: true, file: 'file:///x/teardown.test.js' })
  t.dbUrl = dev.dbUrl
  assert.match(t.schema, /^rtkit_teardown_[0-9a-f]{6}$/)
  await t.setupSchema(
    (s) => `CREATE TABLE items (id int PRIMARY KEY);
            CREATE POLICY ${s}_read ON realtime.messages FOR SELECT TO authenticated USING (realtime.topic() LIKE '${s}:%');`,
    { publish: ['items'] },
  )
  const published = async () =>
    (await admin.query("SELECT schemaname || '.' || tablename AS t FROM pg_publication_tables WHERE pubname = 'supabase_realtime' ORDER BY 1")).rows.map((r) => r.t)
  const policies = async () =>
    (await admin.query("SELECT policyname FROM pg_policies WHERE schemaname = 'realtime' AND tablename = 'messages' ORDER BY 1")).rows.map((r) => r.policyname)
  assert.deepEqual(await published(), ['public.app_messages', `${t.schema}.items`])
  assert.deepEqual(await policies(), ['app_read', `${t.schema}_read`])
  // Unqualified names in the tests' SQL land in the kit's schema.
  const db = await t.db()
  await db.query('INSERT INTO items VALUES (1)')
  assert.equal((await admin.query(`SELECT count(*)::int AS n FROM ${t.schema}.items`)).rows[0].n, 1)

  await t.stop()
  assert.deepEqual(await published(), ['public.app_messages'])
  assert.deepEqual(await policies(), ['app_read'])
  assert.equal((await admin.query("SELECT count(*)::int AS n FROM pg_namespace WHERE nspname LIKE 'rtkit_%'")).rows[0].n, 0)
  assert.equal((await admin.query('SELECT count(*)::int AS n FROM app_messages')).rows[0].n, 0, 'the app table is still there')
})

test('a database walcast has set up passes the preflight', async () => {
  const pool = new pg.Pool({ connectionString: dev.dbUrl, max: 1 })
  try {
    await preflight(pool)
  } finally {
    await pool.end()
  }
})

test('a database without the publication, auth.uid() or realtime.messages is refused, with every reason', async () => {
  await admin.query('CREATE DATABASE bare')
  const pool = new pg.Pool({ connectionString: dev.dbUrl.replace(/\/[^/?]+(\?|$)/, '/bare$1'), max: 1 })
  try {
    await assert.rejects(preflight(pool), {
      message:
        'refused: the target database lacks the publication supabase_realtime, the function auth.uid(), the table realtime.messages, ' +
        'the function realtime.topic(), the function realtime.send(), the function realtime.broadcast_changes(); ' +
        'the kit sets up only its own schema and never changes these',
    })
  } finally {
    await pool.end()
  }
})

test('a database without logical replication is refused', async () => {
  // wal_level is server-wide: a stand-in database that answers like one with wal_level=replica
  // and everything else in place.
  const fake = {
    async query(sql) {
      if (sql === 'SHOW wal_level') return { rows: [{ wal_level: 'replica' }] }
      return { rows: [{ ok: true }] }
    },
  }
  await assert.rejects(preflight(fake), {
    message: 'refused: the target database lacks logical replication (wal_level is replica, needs logical); the kit sets up only its own schema and never changes these',
  })
})
