// DELETEs and leaves under row level security (issue #14, RELIABILITY.md "DELETEs and leaves
// under RLS"): the real supabase-js. A DELETE reaches only the users who could see the row (the
// original sends every DELETE's key to every subscriber of the table); a binding with
// `leaves: true` (an extra key supabase-js passes through in the join) hears, as a DELETE of the
// row's key, that an UPDATE took a row out of its view (a conversation reassigned).
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, nowSecs, subscribedToPostgres, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

const SCHEMA = (s) => `
  CREATE TABLE rd_conversations (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), customer_id uuid NOT NULL, agent_id uuid, status text NOT NULL DEFAULT 'waiting');
  ALTER TABLE rd_conversations ENABLE ROW LEVEL SECURITY;
  CREATE POLICY ${s}_participants ON rd_conversations FOR SELECT TO authenticated
    USING (customer_id = auth.uid() OR agent_id = auth.uid());
  GRANT SELECT ON rd_conversations TO authenticated;
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
let db
const needs = ['db', 'sign', 'walcast']
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA, { publish: ['rd_conversations'] })
})

const userToken = (id) => t.sign({ role: 'authenticated', sub: id, exp: nowSecs() + 3600 })

/** A user's channel on the conversations table; resolves to its inbox. */
async function watch(vsn, user, binding = {}) {
  const inbox = new Inbox()
  const ch = client(t, userToken(user), vsn)
    .channel(`rd-${randomUUID()}`)
    .on('postgres_changes', { event: '*', schema: S, table: 'rd_conversations', ...binding }, inbox.push)
  await subscribedToPostgres(ch)
  return inbox
}

async function newConversation(customer, agent = null) {
  const { rows } = await db.query('INSERT INTO rd_conversations (customer_id, agent_id) VALUES ($1, $2) RETURNING id', [customer, agent])
  return rows[0].id
}

const remove = (id) => db.query('DELETE FROM rd_conversations WHERE id = $1', [id])

conformance(t, { features: ['rls-deletes', 'rls', 'old-record'], needs, title: 'a DELETE under RLS reaches the user who could see the row, not the other users subscribed to the table' }, async (vsn) => {
  const [alice, bob] = [randomUUID(), randomUUID()]
  const a = await watch(vsn, alice)
  const b = await watch(vsn, bob)
  const mine = await newConversation(alice)
  const theirs = await newConversation(bob)
  assert.equal((await a.next('alice: her INSERT')).new.id, mine)
  assert.equal((await b.next('bob: his INSERT')).new.id, theirs)
  await remove(mine)
  await remove(theirs)
  const gone = await a.next('alice: the DELETE of her conversation')
  assert.equal(gone.eventType, 'DELETE')
  assert.deepEqual(gone.old, { id: mine })
  // Bob's next event is his own row's DELETE: alice's id never reached him.
  const his = await b.next('bob: the DELETE of his conversation')
  assert.deepEqual(his.old, { id: theirs }, `bob got alice's DELETE: ${JSON.stringify(his)}`)
  assert.equal(a.items.length + b.items.length, 0)
})

conformance(t, { features: ['rls-deletes', 'rls'], needs, title: 'a reassigned conversation: the old agent\'s `leaves: true` binding gets a DELETE of its key, a plain binding nothing, the new agent the UPDATE' }, async (vsn) => {
  const [customer, x, y] = [randomUUID(), randomUUID(), randomUUID()]
  const xLeaves = await watch(vsn, x, { leaves: true })
  const xPlain = await watch(vsn, x)
  const yLeaves = await watch(vsn, y, { leaves: true })
  const id = await newConversation(customer, x)
  assert.equal((await xLeaves.next('x: the INSERT')).eventType, 'INSERT')
  assert.equal((await xPlain.next('x (plain): the INSERT')).eventType, 'INSERT')
  await db.query('UPDATE rd_conversations SET agent_id = $2 WHERE id = $1', [id, y])
  const left = await xLeaves.next('x: the leave')
  assert.equal(left.eventType, 'DELETE', 'supabase-js hands a leave to the callback as a DELETE')
  assert.deepEqual(left.old, { id })
  assert.deepEqual(left.new, {})
  const gained = await yLeaves.next('y: the UPDATE that gives it the conversation')
  assert.equal(gained.eventType, 'UPDATE')
  assert.equal(gained.new.agent_id, y)
  // The plain binding's next event is the next row it may see: no leave came before it.
  const next = await newConversation(customer, x)
  const after = await xPlain.next('x (plain): the next INSERT')
  assert.equal(after.eventType, 'INSERT', `x (plain) got ${JSON.stringify(after)} before the next INSERT`)
  assert.equal(after.new.id, next)
  await xLeaves.next('x: the next INSERT')
  // The conversation's DELETE goes to its new agent only.
  await remove(id)
  const deleted = await yLeaves.next('y: the DELETE')
  assert.equal(deleted.eventType, 'DELETE')
  assert.deepEqual(deleted.old, { id })
  await remove(next)
  assert.deepEqual((await xPlain.next('x (plain): the DELETE of its own next row')).old, { id: next })
  assert.deepEqual((await xLeaves.next('x: the DELETE of its own next row')).old, { id: next })
  assert.equal(xLeaves.items.length + xPlain.items.length + yLeaves.items.length, 0)
})
