-- The support-chat example's database: the data model and row level security of the seed app
-- (an agent dashboard and a customer widget), plus the handful of functions the pages call to
-- read and write. `walcast dev --example support-chat` runs this file at every start: it is
-- idempotent and keeps the data. Everything lives in the schema `support_chat`, so it never
-- touches tables of your own in the development database.
--
-- Who is who: customers sign in with role `authenticated` (as Supabase Auth users do); agents
-- with role `support_agent` (in a Supabase project: a custom access token hook sets it). The
-- JWT's `sub` is the user id (`auth.uid()`), `user_metadata.name` the display name.
--
-- What each may see:
--   conversations  agents: all rows, all columns; customers: their own rows, never `internal_note`
--                  (no column privilege: walcast leaves the column out of their change payloads)
--   messages       agents: all; customers: those of their own conversations
--   read receipts  `messages.read_at`: agents mark customers' messages read (any conversation);
--                  customers may mark nothing (no UPDATE privilege on messages), so a "read"
--                  in the widget always means an agent opened the conversation. The number of
--                  unread customer messages, `conversations.unread_count`, is kept by triggers
--                  and, like `internal_note`, is for agents only
--   typing:<id>    (private broadcast channel) whoever may see conversation <id>
--   support:agents (private presence channel) everyone may see who is online; only agents track

BEGIN;

DO $$
BEGIN
  CREATE ROLE support_agent NOLOGIN NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- walcast checks rows as each subscriber's role; a non-superuser database user must be able to
-- switch to it (a superuser, as in `walcast dev`, already can).
DO $$
BEGIN
  IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
    EXECUTE format('GRANT support_agent TO %I', current_user);
  END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS support_chat;
GRANT USAGE ON SCHEMA support_chat TO authenticated, support_agent;
GRANT USAGE ON SCHEMA auth, realtime TO support_agent;
GRANT EXECUTE ON FUNCTION auth.uid(), auth.jwt(), auth.role(), realtime.topic() TO support_agent;

CREATE TABLE IF NOT EXISTS support_chat.agents (
  id   uuid PRIMARY KEY,
  name text NOT NULL
);

CREATE TABLE IF NOT EXISTS support_chat.conversations (
  id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  customer_id       uuid NOT NULL DEFAULT auth.uid(),
  customer_name     text NOT NULL DEFAULT coalesce(auth.jwt() -> 'user_metadata' ->> 'name', 'Guest'),
  assigned_agent_id uuid REFERENCES support_chat.agents,
  status            text NOT NULL DEFAULT 'waiting' CHECK (status IN ('waiting', 'active', 'closed')),
  -- Agents' notes for each other. Customers have no privilege on this column.
  internal_note     text,
  created_at        timestamptz NOT NULL DEFAULT now(),
  last_message_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversations_customer ON support_chat.conversations (customer_id, created_at);

CREATE TABLE IF NOT EXISTS support_chat.messages (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  conversation_id uuid NOT NULL REFERENCES support_chat.conversations ON DELETE CASCADE,
  sender_type     text NOT NULL CHECK (sender_type IN ('agent', 'customer')),
  sender_id       uuid NOT NULL DEFAULT auth.uid(),
  sender_name     text NOT NULL DEFAULT coalesce(auth.jwt() -> 'user_metadata' ->> 'name', 'Guest'),
  content         text NOT NULL CHECK (length(content) BETWEEN 1 AND 4000),
  created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_conversation ON support_chat.messages (conversation_id, created_at);

-- Read receipts (added later: ADD COLUMN IF NOT EXISTS upgrades an existing dev database).
ALTER TABLE support_chat.messages ADD COLUMN IF NOT EXISTS read_at timestamptz;
ALTER TABLE support_chat.conversations ADD COLUMN IF NOT EXISTS unread_count integer NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS messages_unread ON support_chat.messages (conversation_id)
  WHERE read_at IS NULL AND sender_type = 'customer';
-- A database from before the column: count what is unread (a no-op once the counts are right).
UPDATE support_chat.conversations c SET unread_count = u.n
  FROM (SELECT c2.id, (SELECT count(*) FROM support_chat.messages m
                        WHERE m.conversation_id = c2.id AND m.read_at IS NULL
                          AND m.sender_type = 'customer')::int AS n
          FROM support_chat.conversations c2) u
 WHERE u.id = c.id AND c.unread_count <> u.n;

-- The two demo agents whose tokens `walcast dev --example support-chat` prints.
INSERT INTO support_chat.agents (id, name) VALUES
  ('a0000000-0000-4000-8000-000000000001', 'Ada'),
  ('a0000000-0000-4000-8000-000000000002', 'Bo')
ON CONFLICT (id) DO UPDATE SET name = excluded.name;

-- Privileges, reset at every load. Customers: no `internal_note`, and only the columns a new
-- conversation or message needs (ids, names and sender come from defaults: auth.uid() and the
-- token's name).
REVOKE ALL ON support_chat.agents, support_chat.conversations, support_chat.messages
  FROM authenticated, support_agent;
GRANT SELECT ON support_chat.agents TO authenticated, support_agent;
GRANT SELECT (id, customer_id, customer_name, assigned_agent_id, status, created_at, last_message_at)
  ON support_chat.conversations TO authenticated;
GRANT INSERT (status) ON support_chat.conversations TO authenticated;
GRANT SELECT ON support_chat.conversations TO support_agent;
GRANT UPDATE (status, assigned_agent_id, internal_note) ON support_chat.conversations TO support_agent;
GRANT SELECT ON support_chat.messages TO authenticated, support_agent;
GRANT INSERT (conversation_id, sender_type, content) ON support_chat.messages TO authenticated, support_agent;
GRANT UPDATE (read_at) ON support_chat.messages TO support_agent;

ALTER TABLE support_chat.agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE support_chat.conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE support_chat.messages ENABLE ROW LEVEL SECURITY;

-- Whether the caller may see conversation `conv`: the conversations policies decide (agents see
-- all, customers their own), since this runs as the caller.
CREATE OR REPLACE FUNCTION support_chat.can_see(conv uuid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT EXISTS (SELECT 1 FROM support_chat.conversations c WHERE c.id = conv)
$$;
REVOKE ALL ON FUNCTION support_chat.can_see(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION support_chat.can_see(uuid) TO authenticated, support_agent;

DROP POLICY IF EXISTS agents_read ON support_chat.agents;
CREATE POLICY agents_read ON support_chat.agents FOR SELECT TO authenticated, support_agent USING (true);

DROP POLICY IF EXISTS customer_read ON support_chat.conversations;
CREATE POLICY customer_read ON support_chat.conversations FOR SELECT TO authenticated
  USING (customer_id = auth.uid());
DROP POLICY IF EXISTS customer_start ON support_chat.conversations;
CREATE POLICY customer_start ON support_chat.conversations FOR INSERT TO authenticated
  WITH CHECK (customer_id = auth.uid() AND status = 'waiting');
DROP POLICY IF EXISTS agent_read ON support_chat.conversations;
CREATE POLICY agent_read ON support_chat.conversations FOR SELECT TO support_agent USING (true);
DROP POLICY IF EXISTS agent_update ON support_chat.conversations;
CREATE POLICY agent_update ON support_chat.conversations FOR UPDATE TO support_agent
  USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS read ON support_chat.messages;
CREATE POLICY read ON support_chat.messages FOR SELECT TO authenticated, support_agent
  USING (support_chat.can_see(conversation_id));
DROP POLICY IF EXISTS customer_write ON support_chat.messages;
CREATE POLICY customer_write ON support_chat.messages FOR INSERT TO authenticated
  WITH CHECK (
    sender_type = 'customer' AND sender_id = auth.uid()
    AND EXISTS (SELECT 1 FROM support_chat.conversations c
                 WHERE c.id = conversation_id AND c.customer_id = auth.uid() AND c.status <> 'closed'));
DROP POLICY IF EXISTS agent_write ON support_chat.messages;
CREATE POLICY agent_write ON support_chat.messages FOR INSERT TO support_agent
  WITH CHECK (
    sender_type = 'agent' AND sender_id = auth.uid()
    AND EXISTS (SELECT 1 FROM support_chat.agents a WHERE a.id = auth.uid()));
-- Read receipts: agents mark customers' messages read (the column privilege above allows
-- `read_at` only). Customers have no UPDATE privilege on messages at all.
DROP POLICY IF EXISTS agent_mark_read ON support_chat.messages;
CREATE POLICY agent_mark_read ON support_chat.messages FOR UPDATE TO support_agent
  USING (sender_type = 'customer') WITH CHECK (sender_type = 'customer' AND read_at IS NOT NULL);

-- A new message moves its conversation to the top of the dashboard's list. Trusted server-side
-- logic (SECURITY DEFINER): customers may not update conversations themselves.
CREATE OR REPLACE FUNCTION support_chat.touch_conversation() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
  UPDATE support_chat.conversations
     SET last_message_at = NEW.created_at,
         unread_count = unread_count + CASE WHEN NEW.sender_type = 'customer' AND NEW.read_at IS NULL
                                            THEN 1 ELSE 0 END
   WHERE id = NEW.conversation_id;
  RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS touch_conversation ON support_chat.messages;
CREATE TRIGGER touch_conversation AFTER INSERT ON support_chat.messages
  FOR EACH ROW EXECUTE FUNCTION support_chat.touch_conversation();

-- A customer's message read: one fewer unread in its conversation (agents have no privilege on
-- `unread_count`; this trigger keeps it). The conversation's row lock orders concurrent readers.
CREATE OR REPLACE FUNCTION support_chat.count_read() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
  UPDATE support_chat.conversations SET unread_count = greatest(unread_count - 1, 0)
   WHERE id = NEW.conversation_id;
  RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS count_read ON support_chat.messages;
CREATE TRIGGER count_read AFTER UPDATE OF read_at ON support_chat.messages
  FOR EACH ROW WHEN (OLD.read_at IS NULL AND NEW.read_at IS NOT NULL AND NEW.sender_type = 'customer')
  EXECUTE FUNCTION support_chat.count_read();

-- Private channels: typing indicators per conversation, and agents' presence.
GRANT SELECT, INSERT ON realtime.messages TO support_agent;
DROP POLICY IF EXISTS support_chat_read ON realtime.messages;
CREATE POLICY support_chat_read ON realtime.messages FOR SELECT TO authenticated, support_agent
  USING (
    (realtime.topic() = 'support:agents' AND extension = 'presence')
    OR (realtime.topic() ~ '^typing:[0-9a-f-]{36}$' AND extension = 'broadcast'
        AND support_chat.can_see(substring(realtime.topic() FROM 8)::uuid)));
DROP POLICY IF EXISTS support_chat_write ON realtime.messages;
CREATE POLICY support_chat_write ON realtime.messages FOR INSERT TO authenticated, support_agent
  WITH CHECK (
    (realtime.topic() = 'support:agents' AND extension = 'presence' AND current_user = 'support_agent')
    OR (realtime.topic() ~ '^typing:[0-9a-f-]{36}$' AND extension = 'broadcast'
        AND support_chat.can_see(substring(realtime.topic() FROM 8)::uuid)));

-- What the pages call (through the example's endpoint, as the caller's role with the caller's
-- claims: every statement below runs under the policies and privileges above). SECURITY
-- INVOKER, the default: a function grants nothing its caller does not have.
CREATE OR REPLACE FUNCTION support_chat.start_conversation(args jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE conv uuid;
BEGIN
  INSERT INTO support_chat.conversations (status) VALUES ('waiting') RETURNING id INTO conv;
  INSERT INTO support_chat.messages (conversation_id, sender_type, content)
    VALUES (conv, 'customer', args ->> 'content');
  RETURN jsonb_build_object('id', conv);
END
$$;

CREATE OR REPLACE FUNCTION support_chat.send_message(args jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE msg uuid;
BEGIN
  INSERT INTO support_chat.messages (conversation_id, sender_type, content)
    VALUES ((args ->> 'conversation_id')::uuid,
            CASE current_user WHEN 'support_agent' THEN 'agent' ELSE 'customer' END,
            args ->> 'content')
    RETURNING id INTO msg;
  RETURN jsonb_build_object('id', msg);
END
$$;

CREATE OR REPLACE FUNCTION support_chat.set_status(args jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
  UPDATE support_chat.conversations
     SET status = args ->> 'status',
         assigned_agent_id = CASE WHEN args ->> 'status' = 'active' THEN auth.uid() ELSE assigned_agent_id END
   WHERE id = (args ->> 'conversation_id')::uuid;
  IF NOT FOUND THEN RAISE EXCEPTION 'no such conversation'; END IF;
  RETURN '{}'::jsonb;
END
$$;

CREATE OR REPLACE FUNCTION support_chat.set_internal_note(args jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
  UPDATE support_chat.conversations SET internal_note = args ->> 'note'
   WHERE id = (args ->> 'conversation_id')::uuid;
  IF NOT FOUND THEN RAISE EXCEPTION 'no such conversation'; END IF;
  RETURN '{}'::jsonb;
END
$$;

-- An agent has read conversation `conversation_id`: its customer's unread messages get `read_at`.
-- Runs as the caller: for a customer, PostgreSQL refuses the UPDATE (no privilege).
CREATE OR REPLACE FUNCTION support_chat.mark_read(args jsonb) RETURNS jsonb
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE n int;
BEGIN
  UPDATE support_chat.messages SET read_at = now()
   WHERE conversation_id = (args ->> 'conversation_id')::uuid
     AND sender_type = 'customer' AND read_at IS NULL;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN jsonb_build_object('read', n);
END
$$;

-- The caller's conversations, newest activity first (agents: all, with notes).
CREATE OR REPLACE FUNCTION support_chat.list_conversations(args jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
BEGIN
  IF current_user = 'support_agent' THEN
    RETURN coalesce((SELECT jsonb_agg(to_jsonb(c) ORDER BY c.last_message_at DESC)
                       FROM (SELECT * FROM support_chat.conversations
                              ORDER BY last_message_at DESC LIMIT 200) c), '[]');
  END IF;
  RETURN coalesce((SELECT jsonb_agg(to_jsonb(c) ORDER BY c.last_message_at DESC)
                     FROM (SELECT id, customer_id, customer_name, assigned_agent_id, status,
                                  created_at, last_message_at
                             FROM support_chat.conversations
                            ORDER BY last_message_at DESC LIMIT 200) c), '[]');
END
$$;

CREATE OR REPLACE FUNCTION support_chat.list_messages(args jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.created_at, m.id), '[]')
    FROM (SELECT * FROM support_chat.messages
           WHERE conversation_id = (args ->> 'conversation_id')::uuid
           ORDER BY created_at DESC LIMIT 500) m
$$;

REVOKE ALL ON FUNCTION support_chat.start_conversation(jsonb), support_chat.send_message(jsonb),
  support_chat.set_status(jsonb), support_chat.set_internal_note(jsonb), support_chat.mark_read(jsonb),
  support_chat.list_conversations(jsonb), support_chat.list_messages(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION support_chat.start_conversation(jsonb), support_chat.send_message(jsonb),
  support_chat.set_status(jsonb), support_chat.set_internal_note(jsonb), support_chat.mark_read(jsonb),
  support_chat.list_conversations(jsonb), support_chat.list_messages(jsonb)
  TO authenticated, support_agent;

-- postgres_changes streams these tables.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'supabase_realtime'
                    AND schemaname = 'support_chat' AND tablename = 'conversations') THEN
    ALTER PUBLICATION supabase_realtime ADD TABLE support_chat.conversations;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'supabase_realtime'
                    AND schemaname = 'support_chat' AND tablename = 'messages') THEN
    ALTER PUBLICATION supabase_realtime ADD TABLE support_chat.messages;
  END IF;
END
$$;

COMMIT;
