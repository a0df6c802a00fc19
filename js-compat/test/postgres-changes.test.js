// postgres_changes details that apps meet: binding errors, DELETE filters on the old identity,
// REPLICA IDENTITY FULL, column privileges, value encoding, TOAST, oversized records; and
// broadcast replay of stored messages. Real supabase-js, tables in the kit's own schema.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, nowSecs, subscribed, subscribedToPostgres, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const SCHEMA = (s) => `
  CREATE TABLE items (id int PRIMARY KEY, grp int NOT NULL, label text);
  ALTER TABLE items REPLICA IDENTITY FULL;
  CREATE TABLE plain (id int PRIMARY KEY, grp int NOT NULL, label text);
  CREATE TABLE profiles (id int PRIMARY KEY, name text, secret text);
  CREATE TABLE vals (id int PRIMARY KEY, b bytea, j jsonb, n numeric, big bigint, flag boolean, tags text[], at timestamptz);
  CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
  ALTER TABLE docs REPLICA IDENTITY FULL;
  CREATE TABLE unpublished (id int PRIMARY KEY);
  GRANT SELECT ON items, plain, vals, docs, unpublished TO anon, authenticated;
  GRANT SELECT (id, name) ON profiles TO anon, authenticated;
  CREATE POLICY ${s}_replay_read ON realtime.messages FOR SELECT TO authenticated
    USING (realtime.topic() LIKE '${s}-replay-%');
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
const needs = ['db']
let db
let nextId = 1
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA, { publish: ['items', 'plain', 'profiles', 'vals', 'docs'] })
})

/** A channel with one postgres_changes binding, subscribed; resolves to its inbox. */
async function watch(vsn, binding, key = t.anonKey()) {
  const c = client(t, key, vsn)
  const inbox = new Inbox()
  const ch = c.channel(`pg-${randomUUID()}`).on('postgres_changes', { schema: S, ...binding }, inbox.push)
  await subscribedToPostgres(ch)
  return inbox
}

/** The system message a binding gets instead of "Subscribed to PostgreSQL". */
async function bindingError(vsn, binding) {
  const c = client(t, t.anonKey(), vsn)
  const system = new Inbox()
  const ch = c.channel(`pgerr-${randomUUID()}`).on('postgres_changes', binding, () => {}).on('system', {}, system.push)
  ch.subscribe()
  return system.next('a postgres_changes system message', (p) => p.extension === 'postgres_changes')
}

conformance(t, { features: ['pg-binding-errors'], needs, title: 'a table outside the publication and a bad filter get a postgres_changes error' }, async (vsn) => {
  const outside = await bindingError(vsn, { event: '*', schema: S, table: 'unpublished' })
  assert.equal(outside.status, 'error')
  assert.match(outside.message, /unpublished|publication/i)
  const bad = await bindingError(vsn, { event: '*', schema: S, table: 'items', filter: 'grp=nope.1' })
  assert.equal(bad.status, 'error')
  assert.ok(bad.message.length > 0)
})

conformance(t, { features: ['delete-filters', 'old-record', 'event-filter'], needs, title: 'DELETE filters match the old row (REPLICA IDENTITY FULL); old holds the whole row' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'DELETE', table: 'items', filter: 'grp=eq.1' })
  const [a, b] = [nextId++, nextId++]
  await db.query('INSERT INTO items VALUES ($1, 1, $3), ($2, 2, $3)', [a, b, 'x'])
  await db.query('DELETE FROM items WHERE id = ANY($1)', [[b, a]])
  const got = await inbox.next('the DELETE of the grp 1 row')
  assert.equal(got.eventType, 'DELETE')
  assert.deepEqual(got.old, { id: a, grp: 1, label: 'x' })
  assert.deepEqual(got.new, {})
  // The grp 2 row was deleted first and never matched: a later matching DELETE arrives with
  // nothing queued before it.
  await db.query('INSERT INTO items VALUES ($1, 1, null)', [nextId])
  await db.query('DELETE FROM items WHERE id = $1', [nextId++])
  await inbox.next('the marker DELETE')
  assert.equal(inbox.items.length, 0)
})

conformance(t, { features: ['old-record'], needs, title: 'UPDATE under the default replica identity: old holds the primary key only' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'UPDATE', table: 'plain' })
  const id = nextId++
  await db.query('INSERT INTO plain VALUES ($1, 1, $2)', [id, 'before'])
  await db.query('UPDATE plain SET label = $2 WHERE id = $1', [id, 'after'])
  const got = await inbox.next('the UPDATE')
  assert.deepEqual(got.old, { id })
  assert.equal(got.new.label, 'after')
})

conformance(t, { features: ['pg-columns'], needs: ['db', 'sign'], title: 'columns the role may not SELECT are left out' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'INSERT', table: 'profiles' }, t.token('authenticated'))
  const id = nextId++
  await db.query('INSERT INTO profiles VALUES ($1, $2, $3)', [id, 'Ada', 'hunter2'])
  const got = await inbox.next('the INSERT')
  assert.deepEqual(got.new, { id, name: 'Ada' })
})

conformance(t, { features: ['pg-values'], needs, title: 'values arrive as to_jsonb gives them (bytea as hex, jsonb as JSON, arrays, timestamps)' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'INSERT', table: 'vals' })
  const id = nextId++
  await db.query(
    "INSERT INTO vals VALUES ($1, '\\x01ff'::bytea, '{\"a\":[1,\"two\"]}', 12.50, 9007199254740993, true, '{x,\"y z\"}', '2026-01-02 03:04:05.678+00')",
    [id],
  )
  const got = await inbox.next('the INSERT')
  assert.equal(got.new.id, id)
  assert.equal(got.new.b, '01ff', 'bytea: hex without \\x')
  assert.deepEqual(got.new.j, { a: [1, 'two'] })
  assert.equal(got.new.flag, true)
  assert.deepEqual(got.new.tags, ['x', 'y z'])
  assert.equal(got.new.at, '2026-01-02T03:04:05.678+00:00')
  assert.equal(Number(got.new.n), 12.5)
})

conformance(t, { features: ['toast'], needs, title: 'an UPDATE that leaves a TOASTed value alone still carries it (REPLICA IDENTITY FULL)' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'UPDATE', table: 'docs' })
  const id = nextId++
  await db.query("INSERT INTO docs VALUES ($1, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i), 0)", [id])
  await db.query('UPDATE docs SET n = 1 WHERE id = $1', [id])
  const got = await inbox.next('the UPDATE')
  assert.equal(got.new.n, 1)
  assert.equal(got.new.body?.length, 64000)
})

conformance(t, { features: ['pg-error-payloads'], needs, title: 'a record over 1 MiB arrives with "Error 413: Payload Too Large" and its long values left out' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'INSERT', table: 'plain' })
  const id = nextId++
  await db.query("INSERT INTO plain VALUES ($1, 7, (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 40000) i))", [id])
  const got = await inbox.next('the INSERT')
  assert.deepEqual(got.errors, ['Error 413: Payload Too Large'])
  assert.equal(got.new.id, id)
  assert.equal(got.new.grp, 7)
  assert.equal(got.new.label, undefined)
})

conformance(t, { features: ['replay', 'db-broadcast', 'private-channels'], needs: ['db', 'sign'], title: 'a private channel joined with replay gets the stored messages, marked replayed' }, async (vsn) => {
  const topic = `${S}-replay-${randomUUID()}`
  const since = Date.now() - 1000
  for (const n of [1, 2]) await db.query("SELECT realtime.send($1::jsonb, 'stored', $2, true)", [JSON.stringify({ n }), topic])
  const c = client(t, t.sign({ role: 'authenticated', sub: randomUUID(), exp: nowSecs() + 3600 }), vsn)
  const inbox = new Inbox()
  const ch = c.channel(topic, { config: { private: true, broadcast: { replay: { since, limit: 10 } } } })
  ch.on('broadcast', { event: 'stored' }, inbox.push)
  await subscribed(ch)
  const first = await inbox.next('the first stored message')
  const second = await inbox.next('the second stored message')
  assert.deepEqual([first.payload.n, second.payload.n], [1, 2])
  assert.equal(first.meta?.replayed, true)
  assert.ok(first.meta?.id)
})
