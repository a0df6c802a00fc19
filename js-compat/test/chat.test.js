// The support-chat app of shared/seed-realtime-chat.md on walcast: an agent dashboard and a
// website widget, each a real supabase-js client, against `walcast dev` and its PostgreSQL.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, nowSecs, subscribedToPostgres, Inbox } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

// In the kit's own schema (the pool's search_path); functions that policies call carry theirs.
const SCHEMA = (s) => `
  CREATE TABLE agents (id uuid PRIMARY KEY, name text NOT NULL);
  CREATE TABLE conversations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid NOT NULL,
    assigned_agent_id uuid REFERENCES agents,
    status text NOT NULL DEFAULT 'waiting',
    last_message_at timestamptz NOT NULL DEFAULT now()
  );
  CREATE TABLE messages (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id uuid NOT NULL REFERENCES conversations,
    sender_type text NOT NULL CHECK (sender_type IN ('agent', 'customer')),
    sender_id uuid NOT NULL,
    content text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
  );
  CREATE TABLE typing_indicators (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id uuid NOT NULL REFERENCES conversations,
    user_id uuid,
    widget_customer_id uuid,
    is_typing boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
  );
  CREATE FUNCTION is_agent() RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ${s}, public AS
    $$ SELECT EXISTS (SELECT 1 FROM agents WHERE id = auth.uid()) $$;
  CREATE FUNCTION can_see(conv uuid) RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ${s}, public AS
    $$ SELECT is_agent() OR EXISTS (SELECT 1 FROM conversations WHERE id = conv AND customer_id = auth.uid()) $$;
  ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
  ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
  ALTER TABLE typing_indicators ENABLE ROW LEVEL SECURITY;
  CREATE POLICY read ON conversations FOR SELECT TO authenticated USING (customer_id = auth.uid() OR is_agent());
  CREATE POLICY read ON messages FOR SELECT TO authenticated USING (can_see(conversation_id));
  CREATE POLICY read ON typing_indicators FOR SELECT TO authenticated USING (can_see(conversation_id));
  GRANT SELECT ON agents, conversations, messages, typing_indicators TO authenticated;
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
let db
/** Every test here writes rows and signs its users' tokens. */
const needs = ['db', 'sign']
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA, { publish: ['conversations', 'messages', 'typing_indicators'] })
})

const userToken = (id) => t.sign({ role: 'authenticated', sub: id, exp: nowSecs() + 3600 })

async function newAgent(name) {
  const id = randomUUID()
  await db.query('INSERT INTO agents (id, name) VALUES ($1, $2)', [id, name])
  return id
}

async function newConversation(customerId, agentId = null) {
  const { rows } = await db.query(
    'INSERT INTO conversations (customer_id, assigned_agent_id) VALUES ($1, $2) RETURNING id',
    [customerId, agentId],
  )
  return rows[0].id
}

/** What the app's API does when someone sends a message. */
async function sendMessage(conversationId, senderType, senderId, content) {
  const tx = await db.connect()
  try {
    await tx.query('BEGIN')
    const { rows } = await tx.query(
      'INSERT INTO messages (conversation_id, sender_type, sender_id, content) VALUES ($1, $2, $3, $4) RETURNING id',
      [conversationId, senderType, senderId, content],
    )
    await tx.query('UPDATE conversations SET last_message_at = now() WHERE id = $1', [conversationId])
    await tx.query('COMMIT')
    return rows[0].id
  } finally {
    tx.release()
  }
}

/** The widget's two channels for one conversation. */
async function widget(vsn, customerId, conversationId) {
  const supabase = client(t, userToken(customerId), vsn)
  const messages = new Inbox()
  const updates = new Inbox()
  const m = supabase
    .channel(`conversation:${conversationId}:messages`)
    .on('postgres_changes', { event: 'INSERT', schema: S, table: 'messages', filter: `conversation_id=eq.${conversationId}` }, messages.push)
  const u = supabase
    .channel(`conversation:${conversationId}:updates`)
    .on('postgres_changes', { event: 'UPDATE', schema: S, table: 'conversations', filter: `id=eq.${conversationId}` }, updates.push)
  await Promise.all([subscribedToPostgres(m), subscribedToPostgres(u)])
  return { messages, updates }
}

/** The dashboard: the selected conversation's messages and updates, and the conversation list. */
async function dashboard(vsn, agentId, conversationId) {
  const supabase = client(t, userToken(agentId), vsn)
  const messages = new Inbox()
  const updates = new Inbox()
  const list = new Inbox()
  const m = supabase
    .channel(`conversation:${conversationId}:messages`)
    .on('postgres_changes', { event: 'INSERT', schema: S, table: 'messages', filter: `conversation_id=eq.${conversationId}` }, messages.push)
  const u = supabase
    .channel(`conversation:${conversationId}:updates`)
    .on('postgres_changes', { event: 'UPDATE', schema: S, table: 'conversations', filter: `id=eq.${conversationId}` }, updates.push)
  const l = supabase
    .channel('conversations:list')
    .on('postgres_changes', { event: 'INSERT', schema: S, table: 'conversations' }, list.push)
    .on('postgres_changes', { event: 'UPDATE', schema: S, table: 'conversations' }, list.push)
  await Promise.all([subscribedToPostgres(m), subscribedToPostgres(u), subscribedToPostgres(l)])
  return { messages, updates, list }
}

conformance(t, { features: ['pg-event-shape', 'commit-timestamp', 'filters', 'event-filter', 'subscribed-system', 'rls', 'old-record', 'pg-one-message'], needs, title: 'agent → customer: the message appears in the widget' }, async (vsn) => {
  const agent = await newAgent('Ada')
  const customer = randomUUID()
  const conv = await newConversation(customer, agent)
  const w = await widget(vsn, customer, conv)
  const d = await dashboard(vsn, agent, conv)
  const id = await sendMessage(conv, 'agent', agent, 'Hi, how can I help?')
  const got = await w.messages.next('widget receives the agent message')
  assert.equal(got.eventType, 'INSERT')
  assert.equal(got.table, 'messages')
  assert.equal(got.new.id, id)
  assert.equal(got.new.content, 'Hi, how can I help?')
  assert.equal(got.new.sender_type, 'agent')
  assert.equal(got.new.conversation_id, conv)
  assert.deepEqual(got.old, {})
  assert.equal(got.errors, null)
  assert.match(got.commit_timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
  // The dashboard sees its own message once (no duplicates).
  assert.equal((await d.messages.next('dashboard echo')).new.id, id)
  await sendMessage(conv, 'agent', agent, 'second')
  assert.equal((await w.messages.next('second')).new.content, 'second')
  assert.equal(w.messages.items.length, 0)
})

conformance(t, { features: ['event-filter', 'rls', 'pg-one-message'], needs, title: 'customer → agent, and the conversation list moves' }, async (vsn) => {
  const agent = await newAgent('Bo')
  const customer = randomUUID()
  const conv = await newConversation(customer, agent)
  const w = await widget(vsn, customer, conv)
  const d = await dashboard(vsn, agent, conv)
  await sendMessage(conv, 'customer', customer, 'My order is late')
  const got = await d.messages.next('dashboard receives the customer message')
  assert.equal(got.new.content, 'My order is late')
  assert.equal(got.new.sender_id, customer)
  const moved = await d.list.next('conversation list update', (e) => e.eventType === 'UPDATE' && e.new.id === conv)
  assert.ok(moved.new.last_message_at)
  assert.equal((await w.messages.next('widget sees its own message')).new.content, 'My order is late')
})

conformance(t, { features: ['old-record', 'filters', 'pg-event-shape'], needs, title: 'status waiting → active → closed reaches dashboard and widget' }, async (vsn) => {
  const agent = await newAgent('Cy')
  const customer = randomUUID()
  const conv = await newConversation(customer)
  const w = await widget(vsn, customer, conv)
  const d = await dashboard(vsn, agent, conv)
  for (const status of ['active', 'closed']) {
    await db.query('UPDATE conversations SET status = $2, assigned_agent_id = $3 WHERE id = $1', [conv, status, agent])
    const wu = await w.updates.next(`widget sees ${status}`)
    assert.equal(wu.eventType, 'UPDATE')
    assert.equal(wu.new.status, status)
    assert.equal(wu.new.assigned_agent_id, agent)
    assert.deepEqual(wu.old, { id: conv })
    const du = await d.updates.next(`dashboard sees ${status}`)
    assert.equal(du.new.status, status)
  }
})

conformance(t, { features: ['rls', 'filters'], needs, title: 'two agents on one conversation' }, async (vsn) => {
  const a = await newAgent('Agent A')
  const b = await newAgent('Agent B')
  const customer = randomUUID()
  const conv = await newConversation(customer, a)
  const da = await dashboard(vsn, a, conv)
  const db2 = await dashboard(vsn, b, conv)
  await sendMessage(conv, 'agent', a, 'I will take this one')
  assert.equal((await db2.messages.next('agent B sees agent A')).new.content, 'I will take this one')
  assert.equal((await da.messages.next('agent A sees itself')).new.content, 'I will take this one')
})

conformance(t, { features: ['event-filter', 'pg-values', 'filters'], needs, title: 'new conversations and typing indicators reach the dashboard' }, async (vsn) => {
  const agent = await newAgent('Di')
  const first = await newConversation(randomUUID(), agent)
  const d = await dashboard(vsn, agent, first)
  const supabase = client(t, userToken(agent), vsn)
  const typing = new Inbox()
  const typingChannel = supabase
    .channel(`conversation:${first}:typing`)
    .on('postgres_changes', { event: '*', schema: S, table: 'typing_indicators', filter: `conversation_id=eq.${first}` }, typing.push)
  await subscribedToPostgres(typingChannel)
  const customer = randomUUID()
  const conv = await newConversation(customer)
  const created = await d.list.next('new conversation', (e) => e.eventType === 'INSERT' && e.new.id === conv)
  assert.equal(created.new.status, 'waiting')
  assert.equal(created.new.customer_id, customer)
  await db.query('INSERT INTO typing_indicators (conversation_id, widget_customer_id, is_typing) VALUES ($1, $2, true)', [first, randomUUID()])
  const ti = await typing.next('typing indicator')
  assert.equal(ti.eventType, 'INSERT')
  assert.equal(ti.new.is_typing, true)
  await db.query('UPDATE typing_indicators SET is_typing = false WHERE conversation_id = $1', [first])
  assert.equal((await typing.next('typing stopped')).new.is_typing, false)
})

conformance(t, { features: ['rls', 'event-filter'], needs, title: "a customer never sees another customer's messages" }, async (vsn) => {
  const agent = await newAgent('Eve')
  const alice = randomUUID()
  const mallory = randomUUID()
  const aliceConv = await newConversation(alice, agent)
  const malloryConv = await newConversation(mallory, agent)
  const aliceWidget = await widget(vsn, alice, aliceConv)
  // Mallory subscribes to Alice's conversation by id, and to every message with no filter.
  const supabase = client(t, userToken(mallory), vsn)
  const snooped = new Inbox()
  const byId = supabase
    .channel(`conversation:${aliceConv}:messages`)
    .on('postgres_changes', { event: '*', schema: S, table: 'messages', filter: `conversation_id=eq.${aliceConv}` }, snooped.push)
  const everything = supabase
    .channel('all-messages')
    .on('postgres_changes', { event: '*', schema: S, table: '*' }, snooped.push)
  await Promise.all([subscribedToPostgres(byId), subscribedToPostgres(everything)])
  await sendMessage(aliceConv, 'customer', alice, 'my address is 1 Secret Lane')
  await sendMessage(aliceConv, 'agent', agent, 'thanks Alice')
  await db.query("UPDATE conversations SET status = 'active' WHERE id = $1", [aliceConv])
  // Then something Mallory may see, which comes after all of the above.
  await sendMessage(malloryConv, 'agent', agent, 'hello Mallory')
  assert.equal((await aliceWidget.messages.next('alice 1')).new.content, 'my address is 1 Secret Lane')
  const own = await snooped.next('mallory sees her own message', (e) => e.table === 'messages' && e.new.conversation_id === malloryConv)
  assert.equal(own.new.content, 'hello Mallory')
  for (const e of snooped.items) {
    assert.notEqual(e.new?.conversation_id, aliceConv, `leaked: ${JSON.stringify(e)}`)
    assert.notEqual(e.new?.id, aliceConv, `leaked: ${JSON.stringify(e)}`)
  }
})
