// Filters apps ask for (issue #14 §3): PostgREST `or=(...)` trees with nested `and(...)`, and
// `in` lists of up to 1,000 values (the original stops matching at ~60-70 values without a word),
// with the real supabase-js under vsn 1.0.0 and 2.0.0. Each test writes rows that match and rows
// that do not, then a marker row that matches: when the marker arrives, everything committed
// before it has been decided, so "nothing else arrived" is a real assertion, not a timeout.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, subscribedToPostgres, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const SCHEMA = () => `
  CREATE TABLE tickets (id int PRIMARY KEY, status text NOT NULL, priority int NOT NULL, team int);
  ALTER TABLE tickets REPLICA IDENTITY FULL;
  GRANT SELECT ON tickets TO anon, authenticated;
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
const needs = ['db', 'walcast']
let db
let nextId = 1
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA, { publish: ['tickets'] })
})

async function watch(vsn, binding) {
  const c = client(t, t.anonKey(), vsn)
  const inbox = new Inbox()
  const ch = c.channel(`flt-${randomUUID()}`).on('postgres_changes', { schema: S, table: 'tickets', ...binding }, inbox.push)
  await subscribedToPostgres(ch)
  return inbox
}

/** Waits for the marker row, then returns the ids of every event received up to it, in order. */
async function idsUpTo(inbox, marker, key = (e) => (e.eventType === 'DELETE' ? e.old.id : e.new.id)) {
  await inbox.next(`the marker row ${marker}`, (e) => key(e) === marker)
  return inbox.items.splice(0).map(key)
}

conformance(t, { features: ['or-filters'], needs, title: 'an or=(...) tree with a nested and(...) delivers exactly the matching rows' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'INSERT', filter: 'or=(status.eq.open,and(priority.gt.3,team.eq.7))' })
  const rows = [
    [nextId++, 'open', 1, 1], // matches the first branch
    [nextId++, 'closed', 5, 7], // matches the and(...) branch
    [nextId++, 'closed', 5, 1], // priority matches, team does not
    [nextId++, 'closed', 2, 7], // team matches, priority does not
    [nextId++, 'pending', 9, null], // team null: the and(...) is not true
  ]
  for (const r of rows) await db.query('INSERT INTO tickets VALUES ($1, $2, $3, $4)', r)
  const marker = nextId++
  await db.query('INSERT INTO tickets VALUES ($1, $2, 0, 0)', [marker, 'open'])
  assert.deepEqual(await idsUpTo(inbox, marker), [rows[0][0], rows[1][0]])
})

conformance(t, { features: ['or-filters'], needs, title: 'not.or and an or tree on DELETE (evaluated on the old row)' }, async (vsn) => {
  const inbox = await watch(vsn, { event: 'DELETE', filter: 'not.or=(status.eq.open,priority.lt.3)' })
  const [a, b, c] = [nextId++, nextId++, nextId++]
  await db.query("INSERT INTO tickets VALUES ($1, 'open', 5, 1), ($2, 'closed', 1, 1), ($3, 'closed', 4, 1)", [a, b, c])
  await db.query('DELETE FROM tickets WHERE id = ANY($1)', [[a, b, c]])
  const marker = nextId++
  await db.query("INSERT INTO tickets VALUES ($1, 'closed', 8, 1)", [marker])
  await db.query('DELETE FROM tickets WHERE id = $1', [marker])
  const ids = await idsUpTo(inbox, marker)
  assert.deepEqual(ids, [c], 'only the closed, priority >= 3 row matches not.or')
})

conformance(t, { features: ['or-filters'], needs, title: 'an `in` list of 1,000 values matches its last value; 1,001 values get a clear error' }, async (vsn) => {
  const base = 100_000 + Math.floor(Math.random() * 1_000_000) * 10
  // Even offsets are listed; the odd ones beside them are not.
  const listed = Array.from({ length: 1000 }, (_, i) => base + 2 * i)
  const inbox = await watch(vsn, { event: 'INSERT', filter: `id=in.(${listed.join(',')})` })
  const last = listed[999]
  const first = listed[0]
  for (const id of [base + 1, last, base + 999, first]) {
    await db.query("INSERT INTO tickets VALUES ($1, 'open', 1, 1)", [id])
  }
  assert.deepEqual(await idsUpTo(inbox, first), [last], 'the 1,000th value matched; unlisted values did not')

  const c = client(t, t.anonKey(), vsn)
  const system = new Inbox()
  const tooMany = Array.from({ length: 1001 }, (_, i) => i)
  const ch = c
    .channel(`flt-${randomUUID()}`)
    .on('postgres_changes', { event: '*', schema: S, table: 'tickets', filter: `id=in.(${tooMany.join(',')})` }, () => {})
    .on('system', {}, system.push)
  ch.subscribe()
  const err = await system.next('the postgres_changes error', (p) => p.extension === 'postgres_changes')
  assert.equal(err.status, 'error')
  assert.match(err.message, /too many values for `in` filter\. Maximum 1000/)
})
