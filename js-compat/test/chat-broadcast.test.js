// The support-chat app in the form Supabase now recommends: a trigger on `messages` calls
// realtime.broadcast_changes into a private topic per conversation; policies on
// realtime.messages let only the conversation's customer and the agents in. Typing indicators
// are broadcasts, agent online status is presence. Real supabase-js, `walcast dev`.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { client, nowSecs, subscribed, Inbox, withTimeout } from '../lib/harness.js'
import { useTarget, conformance } from '../lib/kit.js'

// In the kit's own schema; its topics start with the schema's name and so do its policies on
// realtime.messages, which admit only those topics.
const SCHEMA = (s) => `
  CREATE TABLE agents (id uuid PRIMARY KEY, name text NOT NULL);
  CREATE TABLE conversations (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), customer_id uuid NOT NULL,
                              status text NOT NULL DEFAULT 'waiting');
  CREATE TABLE messages (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), conversation_id uuid NOT NULL REFERENCES conversations,
                         sender_id uuid NOT NULL, content text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());

  -- Topics look like "<schema>:conversation:<uuid>"; who may use one:
  CREATE FUNCTION conversation_member(topic text) RETURNS boolean LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = ${s}, public AS $$
    SELECT topic LIKE '${s}:%' AND (
           EXISTS (SELECT 1 FROM agents WHERE id = auth.uid())
        OR EXISTS (SELECT 1 FROM conversations c
                    WHERE '${s}:conversation:' || c.id::text = topic AND c.customer_id = auth.uid()))
  $$;
  CREATE POLICY ${s}_members_read ON realtime.messages FOR SELECT TO authenticated
    USING (${s}.conversation_member(realtime.topic()));
  CREATE POLICY ${s}_members_write ON realtime.messages FOR INSERT TO authenticated
    WITH CHECK (${s}.conversation_member(realtime.topic()));

  CREATE FUNCTION messages_broadcast() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = ${s}, public AS $$
  BEGIN
    PERFORM realtime.broadcast_changes('${s}:conversation:' || NEW.conversation_id::text, TG_OP, TG_OP,
                                       TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD);
    RETURN NULL;
  END $$;
  CREATE TRIGGER messages_broadcast AFTER INSERT OR UPDATE ON messages
    FOR EACH ROW EXECUTE FUNCTION messages_broadcast();
`

const t = useTarget({ db: true, file: import.meta.url })
const S = t.schema
const needs = ['db', 'sign']
let db
t.prepare(async () => {
  db = await t.db()
  await t.setupSchema(SCHEMA)
})

const userToken = (id) => t.sign({ role: 'authenticated', sub: id, exp: nowSecs() + 3600 })
const topicOf = (conversationId) => `${S}:conversation:${conversationId}`

async function newAgent() {
  const id = randomUUID()
  await db.query('INSERT INTO agents (id, name) VALUES ($1, $2)', [id, 'agent'])
  return id
}

async function newConversation(customerId) {
  const { rows } = await db.query('INSERT INTO conversations (customer_id) VALUES ($1) RETURNING id', [customerId])
  return rows[0].id
}

/** Joins the conversation's private topic; resolves with the channel and what it receives. */
async function openConversation(vsn, userId, conversationId, presenceKey) {
  const supabase = client(t, userToken(userId), vsn)
  const messages = new Inbox()
  const typing = new Inbox()
  const presence = new Inbox()
  const channel = supabase
    .channel(topicOf(conversationId), { config: { private: true, broadcast: { ack: true }, presence: { key: presenceKey } } })
    .on('broadcast', { event: 'INSERT' }, messages.push)
    .on('broadcast', { event: 'typing' }, typing.push)
    .on('presence', { event: 'sync' }, () => presence.push({ state: channel.presenceState() }))
  await subscribed(channel)
  return { channel, messages, typing, presence }
}

async function sendMessage(conversationId, senderId, content) {
  const { rows } = await db.query(
    'INSERT INTO messages (conversation_id, sender_id, content) VALUES ($1, $2, $3) RETURNING id',
    [conversationId, senderId, content],
  )
  return rows[0].id
}

conformance(t, { features: ['db-broadcast', 'private-channels', 'db-bootstrap'], needs, title: "agent and customer see each other's messages through broadcast_changes" }, async (vsn) => {
  const agent = await newAgent()
  const customer = randomUUID()
  const conv = await newConversation(customer)
  const a = await openConversation(vsn, agent, conv, 'agent')
  const c = await openConversation(vsn, customer, conv, 'customer')

  const id = await sendMessage(conv, agent, 'Hello, I am here to help')
  const got = await c.messages.next('customer receives the agent message')
  assert.equal(got.event, 'INSERT')
  assert.equal(got.payload.operation, 'INSERT')
  assert.equal(got.payload.table, 'messages')
  assert.equal(got.payload.schema, S)
  assert.equal(got.payload.record.id, id)
  assert.equal(got.payload.record.content, 'Hello, I am here to help')
  assert.equal(got.payload.old_record, null)
  assert.ok(got.meta?.id || got.payload.id, 'the stored message id travels with it')
  assert.equal((await a.messages.next('agent sees it too')).payload.record.id, id)

  await sendMessage(conv, customer, 'Thanks!')
  assert.equal((await a.messages.next('agent receives the customer message')).payload.record.content, 'Thanks!')
})

conformance(t, { features: ['private-channels', 'join-error'], needs, title: 'the customer of another conversation is refused' }, async (vsn) => {
  const alice = randomUUID()
  const mallory = randomUUID()
  const conv = await newConversation(alice)
  await newConversation(mallory)
  const supabase = client(t, userToken(mallory), vsn)
  const snoop = new Inbox()
  const channel = supabase
    .channel(topicOf(conv), { config: { private: true } })
    .on('broadcast', { event: '*' }, snoop.push)
  const status = await withTimeout(
    new Promise((resolve) => channel.subscribe((s, err) => { if (s !== 'SUBSCRIBED') resolve({ s, err }) })),
    'refusal',
  )
  assert.equal(status.s, 'CHANNEL_ERROR')
  assert.equal(status.err.message, `Unauthorized: You do not have permissions to read from this Channel topic: ${topicOf(conv)}`)
  // Alice's conversation goes on; Mallory receives nothing of it.
  const aliceView = await openConversation(vsn, alice, conv, 'alice')
  await sendMessage(conv, alice, 'private matter')
  await aliceView.messages.next('alice sees her message')
  assert.equal(snoop.items.length, 0)
  supabase.removeAllChannels()
})

conformance(t, { features: ['broadcast', 'presence', 'private-channels'], needs, title: 'typing indicators as broadcast, agent online status as presence' }, async (vsn) => {
  const agent = await newAgent()
  const customer = randomUUID()
  const conv = await newConversation(customer)
  const c = await openConversation(vsn, customer, conv, 'customer')
  const a = await openConversation(vsn, agent, conv, 'agent')
  assert.equal(await a.channel.send({ type: 'broadcast', event: 'typing', payload: { who: 'agent', typing: true } }), 'ok')
  assert.deepEqual((await c.typing.next('customer sees the agent typing')).payload, { who: 'agent', typing: true })
  assert.equal(await a.channel.track({ status: 'online' }), 'ok')
  const online = await c.presence.next('customer sees the agent online', (e) => e.state.agent?.[0]?.status === 'online')
  assert.equal(online.state.agent.length, 1)
  await a.channel.untrack()
  await c.presence.next('agent offline', (e) => !e.state.agent)
})
