// `config.broadcast.replication_ready`, as the original's e2e suite and apps using
// broadcast_changes use it: subscribe, wait for the "Replication connection established"
// system message, then write; the broadcast from the database must arrive. Real supabase-js,
// `walcast dev`, under vsn 2.0.0 and 1.0.0.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, nowSecs, subscribed, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const SCHEMA = (s) => `
  CREATE TABLE broadcast_changes (id uuid PRIMARY KEY, value text NOT NULL, topic text NOT NULL);
  CREATE FUNCTION broadcast_changes_trigger() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = ${s}, public AS $$
  BEGIN
    PERFORM realtime.broadcast_changes(NEW.topic, TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
    RETURN NULL;
  END $$;
  CREATE TRIGGER broadcast_changes_trigger AFTER INSERT OR UPDATE ON broadcast_changes
    FOR EACH ROW EXECUTE FUNCTION broadcast_changes_trigger();
  CREATE POLICY ${s}_ready_read ON realtime.messages FOR SELECT TO authenticated
    USING (realtime.topic() LIKE '${s}-ready-%');
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
const needs = ['db', 'sign']
let db
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA)
})

const READY = 'Replication connection established'

/** Subscribes `channel` and resolves with the replication-ready system message. */
async function openReplicationChannel(channel, system) {
  await subscribed(channel)
  return system.next('the replication-ready system message', (p) => p.message === READY)
}

conformance(t, { features: ['replication-ready', 'db-broadcast', 'join-payload'], needs, title: 'a private channel waits for replication_ready, then gets broadcast_changes' }, async (vsn) => {
  const supabase = client(t, t.sign({ role: 'authenticated', sub: randomUUID(), exp: nowSecs() + 3600 }), vsn)
  const topic = `${S}-ready-${randomUUID()}`
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

conformance(t, { features: ['replication-ready', 'db-broadcast'], needs, title: 'a public channel is told too, and realtime.send after it is delivered' }, async (vsn) => {
  const supabase = client(t, t.sign({ role: 'anon', exp: nowSecs() + 3600 }), vsn)
  const topic = `${S}-public-${randomUUID()}`
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
