-- walcast.wait_visible(xids): waits (up to timeout_ms) until the given committed transactions are
-- visible to new snapshots, and says whether they are.
--
-- Logical decoding can hand walcast a transaction's commit a moment before the committing
-- backend has left the proc array, so a query issued right away may not see its rows yet. Row
-- level security checks look rows up; before they do, walcast waits here for the transactions
-- whose rows it is about to check. Each statement of this volatile function takes a new
-- snapshot under READ COMMITTED, so the loop sees the transactions become visible.
CREATE OR REPLACE FUNCTION walcast.wait_visible(xids xid[], timeout_ms integer DEFAULT 5000)
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
AS $fn$
DECLARE
  deadline timestamptz := clock_timestamp() + timeout_ms * interval '1 millisecond';
  pending integer;
BEGIN
  LOOP
    SELECT count(*) INTO pending
      FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax8) s,
           unnest(xids) AS x
     WHERE NOT pg_visible_in_snapshot(
             -- The 64-bit id of a recent 32-bit xid: the snapshot's epoch, or the one before
             -- when the xid is above the snapshot's low bits (it wrapped since).
             ((((s.xmax8 >> 32) - CASE WHEN x::text::bigint > (s.xmax8 & 4294967295) THEN 1 ELSE 0 END) << 32)
               | x::text::bigint)::text::xid8,
             pg_current_snapshot());
    EXIT WHEN pending = 0 OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(0.001);
  END LOOP;
  RETURN pending = 0;
END
$fn$;
