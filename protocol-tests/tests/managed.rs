//! Managed PostgreSQL: the database user is not a superuser (as on Supabase and RDS). walcast
//! works with `REPLICATION` and ownership of the database, and names the missing grant when one
//! is missing.

use protocol_tests::pg::TestDb;
use protocol_tests::*;
use serde_json::json;

const USER_A: &str = "00000000-0000-4000-8000-00000000000a";

/// Roles as a managed provider has them: the API roles exist (made by the provider), and the
/// app's user is an ordinary role with the attributes named.
async fn managed_db(hint: &str, user: &str, attributes: &str) -> (TestDb, String) {
    let db = TestDb::create(hint).await;
    let sql = db.client().await;
    sql.batch_execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN NOINHERIT; END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN NOINHERIT; END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS; END IF;
         END $$;
         CREATE ROLE {user} LOGIN {attributes};
         ALTER DATABASE {db} OWNER TO {user};
         ALTER SCHEMA public OWNER TO {user};",
        db = db.name
    ))
    .await
    .unwrap();
    let url = format!("postgres://{user}@127.0.0.1:{}/{}", db.port, db.name);
    (db, url)
}

#[tokio::test]
async fn a_user_with_replication_but_not_superuser_streams_under_rls() {
    let user = format!("mgd_ok_{}", std::process::id());
    let (db, url) = managed_db("mgd_ok", &user, "REPLICATION CREATEROLE").await;
    let server = Server::start_with(&[
        ("DATABASE_URL", url.as_str()),
        ("SLOT_NAME", &format!("s_{}", db.name)),
    ])
    .await;
    // The app's tables, made by the app's user (as on Supabase, where `postgres` is not a
    // superuser).
    let (app, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={user} dbname={}",
            db.port, db.name
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    app.batch_execute(
        "CREATE TABLE notes (id serial PRIMARY KEY, owner uuid, body text);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON notes FOR SELECT TO authenticated USING (owner = auth.uid());
         GRANT SELECT ON notes TO authenticated;
         ALTER PUBLICATION supabase_realtime ADD TABLE notes;",
    )
    .await
    .unwrap();
    let mut c = server
        .connect(
            Vsn::V2,
            &sign(json!({"role": "authenticated", "sub": USER_A, "exp": now() + 3600})),
        )
        .await;
    let (_, reply) = c
        .join(
            "realtime:notes",
            json!({"config": {"postgres_changes": [
                {"event": "INSERT", "schema": "public", "table": "notes"}
            ]}}),
        )
        .await;
    assert_eq!(reply.payload()["status"], "ok", "{:?}", reply.payload());
    let sys = c.recv_until("subscribed", |f| f.event() == "system").await;
    assert_eq!(sys.payload()["status"], "ok", "{:?}", sys.payload());
    app.batch_execute(
        "INSERT INTO notes (owner, body) VALUES ('00000000-0000-4000-8000-00000000000b', 'not mine');",
    )
    .await
    .unwrap();
    app.execute(
        "INSERT INTO notes (owner, body) VALUES ($1::text::uuid, 'mine')",
        &[&USER_A],
    )
    .await
    .unwrap();
    let f = c
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.payload()["data"]["record"]["body"], "mine", "{f:?}");
}

#[tokio::test]
async fn a_user_without_replication_is_told_which_grant_is_missing() {
    let user = format!("mgd_norep_{}", std::process::id());
    let (db, url) = managed_db("mgd_norep", &user, "CREATEROLE").await;
    let log = refuses_to_start(&[
        ("DATABASE_URL", url.as_str()),
        ("SLOT_NAME", &format!("s_{}", db.name)),
    ])
    .await;
    assert!(
        log.contains(&format!("ALTER ROLE {user} REPLICATION")),
        "{log}"
    );
}

#[tokio::test]
async fn a_user_that_cannot_switch_to_the_api_roles_is_told_which_grant_is_missing() {
    // REPLICATION, but no CREATEROLE and no membership: it cannot check rows as `authenticated`.
    let user = format!("mgd_norole_{}", std::process::id());
    let (db, url) = managed_db("mgd_norole", &user, "REPLICATION").await;
    let log = refuses_to_start(&[
        ("DATABASE_URL", url.as_str()),
        ("SLOT_NAME", &format!("s_{}", db.name)),
    ])
    .await;
    assert!(
        log.contains(&format!(
            "GRANT anon, authenticated, service_role TO {user}"
        )),
        "{log}"
    );
}

/// A stand-in for a connection pooler in front of PostgreSQL: ordinary connections are passed
/// through, a replication startup is refused as PgBouncer refuses it.
async fn fake_pooler(upstream: u16) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 4];
                    if client.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let n = u32::from_be_bytes(len) as usize;
                    if !(8..=10_000).contains(&n) {
                        return;
                    }
                    let mut body = vec![0u8; n - 4];
                    if client.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    if code == 80_877_103 || code == 80_877_104 {
                        // SSLRequest / GSSENCRequest: not here.
                        if client.write_all(b"N").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let params: Vec<&[u8]> = body[4..].split(|b| *b == 0).collect();
                    if params.contains(&&b"replication"[..]) {
                        let mut fields = Vec::new();
                        for (t, v) in [
                            (b'S', "FATAL"),
                            (b'C', "08P01"),
                            (b'M', "unsupported startup parameter: replication"),
                        ] {
                            fields.push(t);
                            fields.extend_from_slice(v.as_bytes());
                            fields.push(0);
                        }
                        fields.push(0);
                        let mut msg = vec![b'E'];
                        msg.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
                        msg.extend_from_slice(&fields);
                        let _ = client.write_all(&msg).await;
                        return;
                    }
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let mut startup = len.to_vec();
                    startup.extend_from_slice(&body);
                    if server.write_all(&startup).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn replication_through_a_pooler_is_refused_with_the_reason() {
    let db = TestDb::create("pooler").await;
    let port = fake_pooler(db.port).await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    // The SQL pool goes through (the migrations ran); the replication stream cannot.
    let log = refuses_to_start(&[
        ("DATABASE_URL", url.as_str()),
        ("SLOT_NAME", &format!("s_{}", db.name)),
    ])
    .await;
    assert!(
        log.contains("this looks like a connection pooler")
            && log.contains("logical replication needs a direct connection"),
        "{log}"
    );
}
