//! TLS to PostgreSQL: a cluster that accepts only TLS (`hostssl`), with a CA and a server
//! certificate made here; every `sslmode`, the original's `DB_SSL`/`DB_SSL_CA_CERT`, the SQL
//! pool and the replication stream alike; and the refusals, each naming its cause.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use protocol_tests::*;
use serde_json::json;

struct TlsCluster {
    port: u16,
    /// The Unix socket directory (trusted, no TLS): the test's own admin connection.
    socket_dir: PathBuf,
    ca: PathBuf,
    wrong_ca: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA in `dir` named `name` (`name.crt`, `name.key`).
fn make_ca(dir: &Path, name: &str) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
        dir,
    );
}

fn cluster() -> &'static TlsCluster {
    static C: OnceLock<TlsCluster> = OnceLock::new();
    C.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("walcast-test-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let c = walcast::dev::DevCluster::start(&dir)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL for tests: {e}"));
        pg::stop_when_this_process_ends(&c, &dir);
        let certs = c.root.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        make_ca(&certs, "ca");
        make_ca(&certs, "wrong-ca");
        // The server's certificate names `localhost` only: reached as 127.0.0.1 its name does
        // not match.
        std::fs::write(
            certs.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &[
                "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr",
            ],
            &certs,
        );
        openssl(
            &[
                "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
            ],
            &certs,
        );
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let is_root = unsafe { libc::geteuid() } == 0;
        if is_root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&certs)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let ok = Command::new("chmod")
            .arg("600")
            .arg(certs.join("server.key"))
            .status()
            .unwrap();
        assert!(ok.success());
        let data = c.root.join("data");
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            certs.join("server.crt").display(),
            certs.join("server.key").display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        // TLS or nothing over TCP; the Unix socket stays open to the test itself.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostssl replication all 127.0.0.1/32 trust\n\
             hostnossl all all 127.0.0.1/32 reject\n\
             hostnossl replication all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        c.restart().expect("restart with TLS");
        TlsCluster {
            port: c.port,
            socket_dir: c.root.clone(),
            ca: certs.join("ca.crt"),
            wrong_ca: certs.join("wrong-ca.crt"),
        }
    })
}

async fn admin(c: &TlsCluster) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(&c.socket_dir)
        .port(c.port)
        .user("postgres")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("admin connection over the Unix socket");
    tokio::spawn(conn);
    client
}

fn url(host: &str, port: u16, query: &str) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?{query}")
}

/// Starts walcast with `env`, subscribes, inserts a row and receives it: the pool (joins) and
/// the replication stream both work. Then checks that walcast's connections are encrypted.
async fn serves(c: &TlsCluster, env: &[(&str, &str)], n: i32) {
    let sql = admin(c).await;
    sql.batch_execute("CREATE TABLE IF NOT EXISTS tls_rows (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let server = Server::start_with(env).await;
    // The roles exist once walcast has migrated the database.
    sql.batch_execute(
        "GRANT SELECT ON tls_rows TO anon, authenticated, service_role;
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_publication_tables WHERE tablename = 'tls_rows') THEN
             ALTER PUBLICATION supabase_realtime ADD TABLE tls_rows;
           END IF;
         END $$;",
    )
    .await
    .unwrap();
    let mut client = server.connect(Vsn::V2, &token("service_role")).await;
    let (_, reply) = client
        .join(
            "realtime:tls",
            json!({"config": {"postgres_changes": [
                {"event": "INSERT", "schema": "public", "table": "tls_rows", "filter": format!("id=eq.{n}")}
            ]}}),
        )
        .await;
    assert_eq!(
        reply.payload()["status"],
        "ok",
        "{env:?}: {:?}",
        reply.payload()
    );
    let sys = client
        .recv_until("subscribed", |f| f.event() == "system")
        .await;
    assert_eq!(
        sys.payload()["status"],
        "ok",
        "{env:?}: {:?}",
        sys.payload()
    );
    sql.execute("INSERT INTO tls_rows VALUES ($1, 'over tls')", &[&n])
        .await
        .unwrap();
    let f = client
        .recv_until("change", |f| f.event() == "postgres_changes")
        .await;
    assert_eq!(f.payload()["data"]["record"]["id"], n, "{env:?}");
    // Every walcast connection, the walsender included, is encrypted.
    let row = sql
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl),
                    count(*) FILTER (WHERE a.backend_type = 'walsender' AND s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name LIKE 'walcast%'",
            &[],
        )
        .await
        .unwrap();
    let (tls, plain, walsender): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(
        tls >= 2 && plain == 0 && walsender == 1,
        "{env:?}: tls {tls}, plain {plain}, walsender {walsender}"
    );
    drop(client);
    drop(server);
    // The next start streams the same slot: wait until this one's walsender is gone.
    let gone = tokio::time::timeout(WAIT, async {
        loop {
            let n: i64 = sql
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE active",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the slot stayed active after walcast stopped");
}

#[tokio::test]
async fn every_sslmode_against_a_tls_only_database() {
    let c = cluster();
    let ca = c.ca.display().to_string();
    let wrong = c.wrong_ca.display().to_string();
    let p = c.port;

    // Accepted: encryption without verification, the chain, the chain and the name.
    for (i, query) in [
        "sslmode=prefer".to_owned(),
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ]
    .iter()
    .enumerate()
    {
        serves(
            c,
            &[("DATABASE_URL", &url("127.0.0.1", p, query))],
            i as i32,
        )
        .await;
    }
    serves(
        c,
        &[(
            "DATABASE_URL",
            &url(
                "localhost",
                p,
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
        )],
        10,
    )
    .await;
    // The original's settings: DB_SSL=true with a CA verifies the chain and the name.
    let port = p.to_string();
    serves(
        c,
        &[
            ("DB_HOST", "localhost"),
            ("DB_PORT", &port),
            ("DB_USER", "postgres"),
            ("DB_NAME", "postgres"),
            ("DB_SSL", "true"),
            ("DB_SSL_CA_CERT", &ca),
        ],
        11,
    )
    .await;
    // DB_SSL=true alone: encrypted, not verified.
    serves(
        c,
        &[
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", &port),
            ("DB_USER", "postgres"),
            ("DB_SSL", "true"),
        ],
        12,
    )
    .await;

    // Refused, each with its cause.
    let log = refuses_to_start(&[("DATABASE_URL", &url("127.0.0.1", p, "sslmode=disable"))]).await;
    assert!(log.contains("no encryption"), "{log}");
    let log = refuses_to_start(&[(
        "DATABASE_URL",
        &url(
            "127.0.0.1",
            p,
            &format!("sslmode=verify-ca&sslrootcert={wrong}"),
        ),
    )])
    .await;
    assert!(log.contains("certificate is not trusted"), "{log}");
    let log = refuses_to_start(&[(
        "DATABASE_URL",
        &url(
            "127.0.0.1",
            p,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    )])
    .await;
    assert!(log.contains("does not name the host 127.0.0.1"), "{log}");
    let log = refuses_to_start(&[
        ("DB_HOST", "localhost"),
        ("DB_PORT", &port),
        ("DB_SSL", "true"),
        ("DB_SSL_CA_CERT", &wrong),
    ])
    .await;
    assert!(log.contains("certificate is not trusted"), "{log}");
    let log = refuses_to_start(&[(
        "DATABASE_URL",
        &url(
            "127.0.0.1",
            p,
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ),
    )])
    .await;
    assert!(
        log.contains("cannot read the root certificate /nonexistent/ca.pem"),
        "{log}"
    );
    let log =
        refuses_to_start(&[("DATABASE_URL", &url("127.0.0.1", p, "sslmode=verify_full"))]).await;
    assert!(log.contains("sslmode=verify_full is not one of"), "{log}");
}

/// A server without TLS: `require` is refused with that cause; `prefer` connects in plain.
#[tokio::test]
async fn a_server_without_tls() {
    let db = pg::TestDb::create("notls").await;
    let base = db.url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let log = refuses_to_start(&[("DATABASE_URL", &format!("{base}{sep}sslmode=require"))]).await;
    assert!(log.contains("the server does not support TLS"), "{log}");
    let server =
        Server::start_with(&[("DATABASE_URL", &format!("{base}{sep}sslmode=prefer"))]).await;
    let mut c = server.connect(Vsn::V2, &token("anon")).await;
    c.join_ok("realtime:plain", json!({})).await;
}
