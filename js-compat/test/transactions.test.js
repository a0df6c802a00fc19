// Changes that share a transaction: the original's e2e case (one channel, three bindings on one
// RLS table, the INSERT, UPDATE and DELETE in one transaction) must deliver all three; a DELETE
// sharing its batch with row checks of the same table and user was lost before. Real supabase-js.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, subscribedToPostgres, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const SCHEMA = (s) => `
  CREATE TABLE tx_items (id int PRIMARY KEY, value text, owner uuid);
  ALTER TABLE tx_items ENABLE ROW LEVEL SECURITY;
  CREATE POLICY ${s}_own ON tx_items FOR SELECT TO authenticated USING (owner = auth.uid());
  GRANT SELECT ON tx_items TO authenticated;
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
let db
let nextId = 1
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA, { publish: ['tx_items'] })
})

conformance(
  t,
  { features: ['rls', 'event-filter', 'delete-filters', 'old-record'], needs: ['db', 'sign'], title: 'INSERT, UPDATE and DELETE in one transaction on an RLS table all reach one channel with three bindings' },
  async (vsn) => {
    const user = randomUUID()
    const [kept, doomed, added] = [nextId++, nextId++, nextId++]
    await db.query('INSERT INTO tx_items VALUES ($1, $3, $4), ($2, $3, $4)', [kept, doomed, 'old', user])
    const c = client(t, t.sign({ role: 'authenticated', sub: user, exp: Math.floor(Date.now() / 1000) + 3600 }), vsn)
    const inbox = new Inbox()
    const ch = c
      .channel(`tx-${randomUUID()}`)
      .on('postgres_changes', { event: 'INSERT', schema: S, table: 'tx_items', filter: `value=eq.new-${added}` }, inbox.push)
      .on('postgres_changes', { event: 'UPDATE', schema: S, table: 'tx_items', filter: `id=eq.${kept}` }, inbox.push)
      .on('postgres_changes', { event: 'DELETE', schema: S, table: 'tx_items', filter: `id=eq.${doomed}` }, inbox.push)
    await subscribedToPostgres(ch)

    const tx = await db.connect()
    try {
      await tx.query('BEGIN')
      await tx.query('INSERT INTO tx_items VALUES ($1, $2, $3)', [added, `new-${added}`, user])
      await tx.query('UPDATE tx_items SET value = $2 WHERE id = $1', [kept, 'updated'])
      await tx.query('DELETE FROM tx_items WHERE id = $1', [doomed])
      await tx.query('COMMIT')
    } finally {
      tx.release()
    }
    const insert = await inbox.next('the INSERT', (e) => e.eventType === 'INSERT')
    assert.equal(insert.new.id, added)
    const update = await inbox.next('the UPDATE', (e) => e.eventType === 'UPDATE')
    assert.equal(update.new.value, 'updated')
    const del = await inbox.next('the DELETE', (e) => e.eventType === 'DELETE')
    assert.deepEqual(del.old, { id: doomed }, 'a deleted row under RLS carries its key only')
  },
)
