// `config.broadcast.replication_ready`, as the original's e2e suite and apps using
// broadcast_changes use it: subscribe, wait for the "Replication connection established"
// system message, then write; the broadcast from the database must arrive. Real supabase-js,
// `walcast dev`, under vsn 2.0.0 and 1.0.0.
import { test, before, after, afterEach } from 'node:test'
import assert from 'node:assert/strict'
import pg from 'pg'
import { randomUUID } from 'node:crypto'
import { startDev, client, closeClients, sign, nowSecs, subscribed, Inbox, VSNS } from '../lib/harness.js'

const SCHEMA = `
  CREATE TABLE broadcast_changes (id uuid PRIMARY KEY, value text NOT NULL, topic text NOT NULL);
  CREATE FUNCTION broadcast_changes_trigger() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
  BEGIN
    PERFORM realtime.broadcast_changes(NEW.topic, TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
    RETURN NULL;
  END $$;
  CREATE TRIGGER broadcast_changes_trigger AFTER INSERT OR UPDATE ON broadcast_changes
    FOR EACH ROW EXECUTE FUNCTION broadcast_changes_trigger();
  CREATE POLICY ready_read ON realtime.messages FOR SELECT TO authenticated
    USING (realtime.topic() LIKE 'ready-%');
`

let server
let db
before(async () => {
  server = await startDev()
  db = new pg.Client({ connectionString: server.dbUrl })
  await db.connect()
  await db.query(SCHEMA)
})
afterEach(closeClients)
after(async () => {
  await db?.end()
  await server?.stop()
})

const READY = 'Replication connection established'

/** Subscribes `channel` and resolves with the replication-ready system message. */
async function openReplicationChannel(channel, system) {
  await subscribed(channel)
  return system.next('the replication-ready system message', (p) => p.message === READY)
}

for (const vsn of VSNS) {
  test(`vsn ${vsn}: a private channel waits for replication_ready, then gets broadcast_changes`, async () => {
    const supabase = client(server, sign({ role: 'authenticated', sub: randomUUID(), exp: nowSecs() + 3600 }), vsn)
    const topic = `ready-${randomUUID()}`
    const system = new Inbox()
    const inserts = new Inbox()
    const channel = supabase
      .channel(topic, { config: { private: true, broadcast: { replication_ready: true } } })
      .on('system', {}, system.push)
      .on('broadcast', { event: 'INSERT' }, inserts.push)
    const ready = await openReplicationChannel(channel, system)
    assert.deepEqual(ready, { extension: 'system', status: 'ok', message: READY, channel: topic })

    const id = randomUUID()
    await db.query('INSERT INTO broadcast_changes (id, value, topic) VALUES ($1, $2, $3)', [id, 'v1', topic])
    const got = await inserts.next('the INSERT broadcast')
    assert.equal(got.payload.operation, 'INSERT')
    assert.equal(got.payload.record.id, id)
    assert.equal(got.payload.old_record, null)
  })

  test(`vsn ${vsn}: a public channel is told too, and realtime.send after it is delivered`, async () => {
    const supabase = client(server, sign({ role: 'anon', exp: nowSecs() + 3600 }), vsn)
    const topic = `public-${randomUUID()}`
    const system = new Inbox()
    const events = new Inbox()
    const channel = supabase
      .channel(topic, { config: { broadcast: { replication_ready: true } } })
      .on('system', {}, system.push)
      .on('broadcast', { event: 'ev' }, events.push)
    const ready = await openReplicationChannel(channel, system)
    assert.equal(ready.status, 'ok')
    await db.query("SELECT realtime.send($1::jsonb, 'ev', $2, false)", [JSON.stringify({ n: 1 }), topic])
    const got = await events.next('the broadcast from the database')
    assert.equal(got.payload.n, 1)
  })
}
