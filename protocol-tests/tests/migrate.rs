//! `walcast migrate` and `walcast dev` without PostgreSQL.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::json;

/// `walcast migrate` against `db`, which must succeed.
async fn migrate(db: &TestDb) {
    migrate_with(db, &[]).await;
}

/// `walcast migrate` against `db` with more settings, which must succeed.
async fn migrate_with(db: &TestDb, env: &[(&str, &str)]) {
    migrate_db(db, &[], env).await;
}

#[tokio::test]
async fn migrate_installs_what_a_plain_postgres_needs_and_is_idempotent() {
    let db = TestDb::create("migrate").await;
    for _ in 0..2 {
        migrate_with(&db, &[("PUBLICATION", "chat_pub"), ("LOG_LEVEL", "error")]).await;
    }
    let sql = db.client().await;
    let roles: Vec<String> = sql
        .query("SELECT rolname::text FROM pg_roles WHERE rolname IN ('anon','authenticated','service_role') ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(roles, ["anon", "authenticated", "service_role"]);
    let bypass: bool = sql
        .query_one(
            "SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(bypass);
    // auth.uid() and friends read the claims walcast sets.
    let row = sql
        .query_one(
            "SELECT set_config('request.jwt.claims', '{\"sub\":\"11111111-1111-1111-1111-111111111111\",\"role\":\"authenticated\"}', false),
                    auth.uid()::text, auth.role(), auth.jwt() ->> 'role'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(1),
        "11111111-1111-1111-1111-111111111111"
    );
    assert_eq!(row.get::<_, String>(2), "authenticated");
    assert_eq!(row.get::<_, String>(3), "authenticated");
    let publication = sql
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = 'chat_pub'",
            &[],
        )
        .await
        .unwrap();
    assert!(publication.is_some());
    let versions: i64 = sql
        .query_one("SELECT count(*) FROM walcast.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert!(versions >= 1);
}

#[tokio::test]
async fn existing_auth_functions_are_left_alone() {
    let db = TestDb::create("keep").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE SCHEMA auth; CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql AS $$ SELECT '22222222-2222-2222-2222-222222222222'::uuid $$;")
        .await
        .unwrap();
    migrate(&db).await;
    let uid: String = sql
        .query_one("SELECT auth.uid()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(uid, "22222222-2222-2222-2222-222222222222");
}

#[tokio::test]
async fn dev_without_postgres_binaries_names_the_package() {
    let out = tokio::process::Command::new(walcast_bin())
        .arg("dev")
        .env("PORT", "0")
        .env("PG_BIN", "/nonexistent")
        .env(
            "WALCAST_DEV_DIR",
            std::env::temp_dir().join("walcast-no-pg"),
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PostgreSQL server binaries") && err.contains("apt-get install postgresql"),
        "{err}"
    );
}

#[tokio::test]
async fn wait_visible_waits_for_commits_to_become_visible() {
    let db = TestDb::create("visible").await;
    migrate(&db).await;
    let writer = db.client().await;
    let checker = db.client().await;
    writer
        .batch_execute("CREATE TABLE t (id int); BEGIN; INSERT INTO t VALUES (1);")
        .await
        .unwrap();
    let xid: String = writer
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    let xid32 = (xid.parse::<u64>().unwrap() & 0xffff_ffff).to_string();
    let in_progress: bool = checker
        .query_one(
            "SELECT walcast.wait_visible(ARRAY[$1::text::xid], 200)",
            &[&xid32],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!in_progress, "an open transaction is not visible");
    writer.batch_execute("COMMIT").await.unwrap();
    let committed: bool = checker
        .query_one(
            "SELECT walcast.wait_visible(ARRAY[$1::text::xid], 5000)",
            &[&xid32],
        )
        .await
        .unwrap()
        .get(0);
    assert!(committed);
}

/// `walcast.check_cohorts` runs each lookup after its own cohort's settings, as that cohort's
/// role, and is not callable by PUBLIC (anon, authenticated).
#[tokio::test]
async fn check_cohorts_runs_each_lookup_under_its_own_claims() {
    let db = TestDb::create("cohorts").await;
    migrate(&db).await;
    let sql = db.client().await;
    sql.batch_execute(
        "PREPARE whoami AS SELECT ARRAY[current_user::text, auth.uid()::text, current_setting('request.jwt.claims')];",
    )
    .await
    .unwrap();
    let a = "00000000-0000-0000-0000-00000000000a";
    let b = "00000000-0000-0000-0000-00000000000b";
    let claims = |sub: &str, role: &str| json!({"sub": sub, "role": role}).to_string();
    let rows = sql
        .query(
            "SELECT cohort, visible FROM walcast.check_cohorts($1, $2, $3, $4)",
            &[
                &vec!["authenticated", "anon"],
                &vec![claims(a, "authenticated"), claims(b, "anon")],
                &vec![a, b],
                &vec!["EXECUTE whoami", "EXECUTE whoami"],
            ],
        )
        .await
        .unwrap();
    let got: Vec<(i32, Vec<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, 1);
    assert_eq!(got[0].1[..2], ["authenticated".to_string(), a.to_string()]);
    assert_eq!(got[0].1[2], claims(a, "authenticated"));
    assert_eq!(got[1].0, 2);
    assert_eq!(got[1].1[..2], ["anon".to_string(), b.to_string()]);
    for role in ["anon", "authenticated"] {
        let callable: bool = sql
            .query_one(
                "SELECT has_function_privilege($1, 'walcast.check_cohorts(text[], text[], text[], text[])', 'EXECUTE')",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!callable, "{role} may call check_cohorts");
    }
}

/// With MIGRATE_ON_START=false, a database behind this binary's migrations is refused at start
/// with what to do, instead of running with functions missing; once migrated, it starts.
#[tokio::test]
async fn a_database_behind_the_migrations_is_refused_when_not_migrating() {
    let db = TestDb::create("behind").await;
    let mut env: Vec<(&str, &str)> = Vec::new();
    let db_env = db.env();
    env.extend(db_env.iter().map(|(k, v)| (*k, v.as_str())));
    env.push(("MIGRATE_ON_START", "false"));
    let log = refuses_to_start(&env).await;
    assert!(log.contains("walcast migrate"), "{log}");
    assert!(log.contains("check_cohorts"), "{log}");

    migrate(&db).await;
    // Migrated: the same setting starts (start_with_db waits until it listens).
    let server = Server::start_with_db(&db, &[("MIGRATE_ON_START", "false")]).await;
    drop(server);
}
