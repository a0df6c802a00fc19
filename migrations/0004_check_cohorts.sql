-- walcast.check_cohorts(roles, claims, subs, statements): row level security checks for many
-- claims cohorts in one call.
--
-- For cohort i it sets the role and the JWT claims the way PostgREST does (transaction-local),
-- then runs statements[i]: an EXECUTE of a statement walcast prepared on this connection, which
-- returns the primary keys (as text) of the rows that cohort may see. Every check is its own
-- statement, run after its cohort's settings and under its cohort's role; nothing of one
-- cohort's settings is left for the next, which sets all four again.
--
-- One call instead of two statements per cohort: PostgreSQL's cost per statement, not the
-- policy, was what limited authorized deliveries per second.
--
-- It runs with the caller's rights (not SECURITY DEFINER), so it lets a caller do nothing it
-- could not do with plain SQL; EXECUTE is still kept from PUBLIC.
CREATE OR REPLACE FUNCTION walcast.check_cohorts(roles text[], claims text[], subs text[], statements text[])
RETURNS TABLE (cohort integer, visible text[])
LANGUAGE plpgsql
VOLATILE
AS $fn$
DECLARE
  i integer;
BEGIN
  FOR i IN 1 .. coalesce(array_length(statements, 1), 0) LOOP
    PERFORM set_config('role', roles[i], true),
            set_config('request.jwt.claims', claims[i], true),
            set_config('request.jwt.claim.sub', subs[i], true),
            set_config('request.jwt.claim.role', roles[i], true);
    cohort := i;
    EXECUTE statements[i] INTO visible;
    RETURN NEXT;
  END LOOP;
END
$fn$;

REVOKE ALL ON FUNCTION walcast.check_cohorts(text[], text[], text[], text[]) FROM PUBLIC;
