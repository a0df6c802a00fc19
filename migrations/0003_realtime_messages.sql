-- The `realtime` schema objects user SQL depends on: realtime.messages (broadcast from the
-- database, private channel policies, replay), realtime.topic(), realtime.send(),
-- realtime.send_binary() and realtime.broadcast_changes(), compatible in names, signatures and
-- behaviour with supabase/realtime's. Existing objects (a real Supabase database) are kept: a
-- function that exists is neither replaced nor re-granted (on hosted Supabase they belong to
-- supabase_realtime_admin, which the connecting user may not be).

CREATE SCHEMA IF NOT EXISTS realtime;
GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;

DO $$
BEGIN
  IF to_regclass('realtime.messages') IS NULL THEN
    -- Not partitioned (walcast's janitor deletes old rows); the columns, defaults, key and
    -- check are the original's.
    CREATE TABLE realtime.messages (
      topic          text                        NOT NULL,
      extension      text                        NOT NULL,
      payload        jsonb,
      event          text,
      private        boolean                     DEFAULT false,
      updated_at     timestamp without time zone NOT NULL DEFAULT now(),
      inserted_at    timestamp without time zone NOT NULL DEFAULT now(),
      id             uuid                        NOT NULL DEFAULT gen_random_uuid(),
      binary_payload bytea,
      CONSTRAINT messages_payload_exclusive CHECK (payload IS NULL OR binary_payload IS NULL),
      CONSTRAINT messages_pkey PRIMARY KEY (id, inserted_at)
    );
    CREATE INDEX messages_inserted_at_topic_index ON realtime.messages (inserted_at DESC, topic)
      WHERE extension = 'broadcast' AND private IS TRUE;
    ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
    -- The policies on it are the user's: with none, nobody may read or write a private topic.
    GRANT INSERT, SELECT, UPDATE ON realtime.messages TO anon, authenticated, service_role;
  END IF;
END
$$;

-- The topic being authorized (set by walcast while it evaluates policies) or sent to.
DO $do$
BEGIN
  IF to_regprocedure('realtime.topic()') IS NULL THEN
    EXECUTE $def$
CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE AS $fn$
  SELECT nullif(current_setting('realtime.topic', true), '')::text
$fn$
    $def$;
    GRANT EXECUTE ON FUNCTION realtime.topic() TO anon, authenticated, service_role;
  END IF;
END
$do$;

DO $do$
BEGIN
  IF to_regprocedure('realtime.send(jsonb, text, text, boolean)') IS NULL THEN
    EXECUTE $def$
CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
  generated_id uuid;
  final_payload jsonb;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();
    -- The payload gets the message id unless it has an id of its own.
    IF payload ? 'id' THEN
      final_payload := payload;
    ELSE
      final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
    END IF;
    EXECUTE format('SET LOCAL realtime.topic TO %L', topic);
    INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
    VALUES (generated_id, final_payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
  END;
END
$fn$
    $def$;
    GRANT EXECUTE ON FUNCTION realtime.send(jsonb, text, text, boolean) TO anon, authenticated, service_role;
  END IF;
END
$do$;

DO $do$
BEGIN
  IF to_regprocedure('realtime.send_binary(bytea, text, text, boolean)') IS NULL THEN
    EXECUTE $def$
CREATE FUNCTION realtime.send_binary(payload bytea, event text, topic text, private boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
  generated_id uuid;
BEGIN
  BEGIN
    generated_id := gen_random_uuid();
    EXECUTE format('SET LOCAL realtime.topic TO %L', topic);
    INSERT INTO realtime.messages (id, binary_payload, event, topic, private, extension)
    VALUES (generated_id, payload, event, topic, private, 'broadcast');
  EXCEPTION
    WHEN OTHERS THEN
      RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
  END;
END
$fn$
    $def$;
    GRANT EXECUTE ON FUNCTION realtime.send_binary(bytea, text, text, boolean) TO anon, authenticated, service_role;
  END IF;
END
$do$;

DO $do$
BEGIN
  IF to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)') IS NULL THEN
    EXECUTE $def$
CREATE FUNCTION realtime.broadcast_changes(
  topic_name text, event_name text, operation text, table_name text, table_schema text,
  new record, old record, level text DEFAULT 'ROW'::text
) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
  row_data jsonb := '{}'::jsonb;
BEGIN
  IF level = 'STATEMENT' THEN
    RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
  END IF;
  IF operation = 'INSERT' OR operation = 'UPDATE' OR operation = 'DELETE' THEN
    row_data := jsonb_build_object('old_record', OLD, 'record', NEW, 'operation', operation,
                                   'table', table_name, 'schema', table_schema);
    PERFORM realtime.send(row_data, event_name, topic_name);
  ELSE
    RAISE EXCEPTION 'Unexpected operation type: %', operation;
  END IF;
EXCEPTION
  WHEN OTHERS THEN
    RAISE EXCEPTION 'Failed to process the row: %', SQLERRM;
END
$fn$
    $def$;
    GRANT EXECUTE ON FUNCTION realtime.broadcast_changes(text, text, text, text, text, record, record, text) TO anon, authenticated, service_role;
  END IF;
END
$do$;


-- The change stream carries realtime.messages through its own publication, so that user tables
-- and broadcast messages travel in one slot.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime_messages_publication') THEN
    CREATE PUBLICATION supabase_realtime_messages_publication FOR TABLE realtime.messages;
  END IF;
END
$$;
