//! `walcast dev`: a private PostgreSQL cluster for the embedded default. Created on first run
//! under a local directory (as the `postgres` user when walcast runs as root, since PostgreSQL
//! refuses to run as root), with logical replication on; reused on later runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::db::DbConfig;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. Install them \
         (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql`) or set \
         PG_BIN to the directory that holds them"
    )]
    NoBinaries,
    #[error("running as root, but there is no `postgres` user to run PostgreSQL as (create one, or run walcast dev as a normal user)")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("dev cluster I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A running development cluster. Stop it with [`DevCluster::stop`].
pub struct DevCluster {
    bin: PathBuf,
    /// Where the cluster lives (normally `<dir>/pg`).
    pub root: PathBuf,
    data: PathBuf,
    run_as: Option<String>,
    pub port: u16,
}

/// Finds initdb/pg_ctl: `PG_BIN`, then the newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn find_binaries() -> Result<PathBuf, DevError> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    // PG_BIN, when set, is the only place looked at: a wrong PG_BIN is an error, not a hint.
    if let Some(dir) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        return if has_all(&dir) {
            Ok(dir)
        } else {
            Err(DevError::NoBinaries)
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_all(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_all(&dir) {
            return Ok(dir);
        }
    }
    Err(DevError::NoBinaries)
}

fn run(cmd: &mut Command, what: &str) -> Result<String, DevError> {
    let out = cmd.output().map_err(|e| DevError::Command {
        what: what.to_owned(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(DevError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl DevCluster {
    fn command(&self, program: &str) -> Command {
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(self.bin.join(program));
                c
            }
            None => Command::new(self.bin.join(program)),
        }
    }

    /// Creates the cluster under `dir` if needed and starts it on a free loopback port.
    pub fn start(dir: &Path) -> Result<Self, DevError> {
        let bin = find_binaries()?;
        std::fs::create_dir_all(dir)?;
        let mut root = std::fs::canonicalize(dir)?.join("pg");
        std::fs::create_dir_all(&root)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        #[allow(unsafe_code)]
        let is_root = unsafe { libc::geteuid() } == 0;
        let run_as = if is_root {
            if run(
                Command::new("id").args(["-u", "postgres"]),
                "id -u postgres",
            )
            .is_err()
            {
                return Err(DevError::NoPostgresUser);
            }
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
                "chown",
            )?;
            // The postgres user must reach the directory; under a private parent (root's home,
            // a 0700 temporary directory) it cannot, so the cluster goes to a shared place keyed
            // by the requested path instead.
            let reachable = Command::new("runuser")
                .args(["-u", "postgres", "--", "test", "-w"])
                .arg(&root)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !reachable {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                root.hash(&mut h);
                let base = PathBuf::from("/var/tmp/walcast-dev");
                let shared = base.join(format!("{:016x}", h.finish()));
                std::fs::create_dir_all(&shared)?;
                run(Command::new("chmod").arg("755").arg(&base), "chmod")?;
                run(
                    Command::new("chown")
                        .args(["-R", "postgres:postgres"])
                        .arg(&shared),
                    "chown",
                )?;
                eprintln!(
                    "walcast dev: the postgres user cannot reach {}; the cluster lives in {} instead",
                    root.display(),
                    shared.display()
                );
                root = shared;
            }
            Some("postgres".to_owned())
        } else {
            None
        };
        let data = root.join("data");
        let mut cluster = Self {
            bin,
            root: root.clone(),
            data,
            run_as,
            port: 0,
        };
        if !cluster.data.join("PG_VERSION").exists() {
            run(
                cluster
                    .command("initdb")
                    .arg("-D")
                    .arg(&cluster.data)
                    .args([
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-instructions",
                    ]),
                "initdb",
            )?;
        }
        // A cluster left running by a walcast dev that was killed: stop it first.
        if cluster.data.join("postmaster.pid").exists() {
            let _ = run(
                cluster
                    .command("pg_ctl")
                    .arg("-D")
                    .arg(&cluster.data)
                    .args(["-m", "fast", "-w", "stop"]),
                "pg_ctl stop",
            );
        }
        cluster.port = free_port()?;
        // Logical decoding on, and the slot's retained WAL bounded: a development database
        // should not grow without limit (nor warn about it on every start).
        let opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20 \
             -c max_slot_wal_keep_size=1GB",
            cluster.port,
            root.display()
        );
        run(
            cluster
                .command("pg_ctl")
                .arg("-D")
                .arg(&cluster.data)
                .arg("-l")
                .arg(root.join("postgres.log"))
                .args(["-w", "-o", &opts, "start"]),
            "pg_ctl start",
        )?;
        Ok(cluster)
    }

    /// A streaming replica of this cluster: a base backup (`pg_basebackup -R`, so it follows
    /// this cluster) under `<root>/<name>`, started as a hot standby on a free loopback port.
    /// For tests and benchmarks of read replicas; stop it like any cluster. `settings` are
    /// more `-c name=value` options for the replica (e.g. `recovery_min_apply_delay`).
    pub fn start_replica(&self, name: &str, settings: &[&str]) -> Result<DevCluster, DevError> {
        let root = self.root.join(name);
        let data = root.join("data");
        std::fs::create_dir_all(&root)?;
        if let Some(user) = &self.run_as {
            run(
                Command::new("chown")
                    .args(["-R", &format!("{user}:{user}")])
                    .arg(&root),
                "chown",
            )?;
        }
        let port = self.port.to_string();
        run(
            self.command("pg_basebackup").arg("-D").arg(&data).args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
            ]),
            "pg_basebackup",
        )?;
        let mut replica = Self {
            bin: self.bin.clone(),
            root: root.clone(),
            data,
            run_as: self.run_as.clone(),
            port: free_port()?,
        };
        // A standby needs at least the primary's limits (max_wal_senders and friends).
        let mut opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c wal_level=logical -c max_replication_slots=20 -c max_wal_senders=20 \
             -c hot_standby=on -c track_functions=all",
            replica.port,
            root.display()
        );
        for s in settings {
            opts.push_str(&format!(" -c {s}"));
        }
        run(
            replica
                .command("pg_ctl")
                .arg("-D")
                .arg(&replica.data)
                .arg("-l")
                .arg(root.join("postgres.log"))
                .args(["-w", "-o", &opts, "start"]),
            "pg_ctl start (replica)",
        )?;
        replica.root = root;
        Ok(replica)
    }

    /// Stops the cluster at once, as a crash would (`pg_ctl -m immediate stop`).
    pub fn kill(&self) -> Result<(), DevError> {
        run(
            self.command("pg_ctl").arg("-D").arg(&self.data).args([
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
            "pg_ctl stop -m immediate",
        )
        .map(|_| ())
    }

    pub fn db_config(&self) -> DbConfig {
        DbConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            user: "postgres".into(),
            password: None,
            dbname: "postgres".into(),
            // A private cluster on loopback: plain.
            tls: crate::db::tls::TlsSettings {
                mode: crate::db::tls::SslMode::Disable,
                root_cert: None,
            },
        }
    }

    /// A shell command that stops this cluster, for a watchdog that outlives the caller.
    pub fn stop_shell_command(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let base = format!(
            "'{}' -D '{}' -m immediate -w stop",
            pg_ctl.display(),
            self.data.display()
        );
        match &self.run_as {
            Some(user) => format!("runuser -u {user} -- {base}"),
            None => base,
        }
    }

    /// Restarts the cluster (fast shutdown: connections are cut), keeping its port.
    pub fn restart(&self) -> Result<(), DevError> {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.root.join("postgres.log"))
                .args(["-m", "fast", "-w", "restart"]),
            "pg_ctl restart",
        )
        .map(|_| ())
    }

    pub fn stop(&self) -> Result<(), DevError> {
        run(
            self.command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        )
        .map(|_| ())
    }
}

fn free_port() -> Result<u16, DevError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The example `walcast dev --example NAME` runs: its directory (`schema.sql` and the pages).
/// Looked for in `WALCAST_EXAMPLES_DIR`, then `./examples`, then the source tree this binary was
/// built from.
pub fn example_dir(name: &str) -> Result<PathBuf, DevError> {
    let mut bases: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("WALCAST_EXAMPLES_DIR") {
        bases.push(PathBuf::from(dir));
    }
    bases.push(PathBuf::from("examples"));
    bases.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"));
    for base in &bases {
        let dir = base.join(name);
        if dir.join("schema.sql").is_file() {
            return Ok(std::fs::canonicalize(dir)?);
        }
    }
    Err(DevError::Command {
        what: format!("finding the example {name}"),
        detail: format!(
            "no {name}/schema.sql under {} (run from walcast's source tree, or set WALCAST_EXAMPLES_DIR)",
            bases
                .iter()
                .map(|b| b.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Runs the example's `schema.sql` (idempotent; it keeps the example's data).
pub async fn load_example(
    pool: &std::sync::Arc<crate::db::Pool>,
    dir: &Path,
) -> Result<(), DevError> {
    let sql = std::fs::read_to_string(dir.join("schema.sql"))?;
    let fail = |e: String| DevError::Command {
        what: format!("loading {}", dir.join("schema.sql").display()),
        detail: e,
    };
    let client = pool.get().await.map_err(|e| fail(e.to_string()))?;
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| fail(crate::db::DbError::from(e).to_string()))
}

/// The support-chat example's demo users: (page, label, role, user id, name). The agents' ids
/// are also in `examples/support-chat/schema.sql` (its `agents` rows).
const SUPPORT_CHAT_USERS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "dashboard.html",
        "agent",
        "support_agent",
        "a0000000-0000-4000-8000-000000000001",
        "Ada",
    ),
    (
        "dashboard.html",
        "agent",
        "support_agent",
        "a0000000-0000-4000-8000-000000000002",
        "Bo",
    ),
    (
        "widget.html",
        "customer",
        "authenticated",
        "c0000000-0000-4000-8000-000000000001",
        "Carol",
    ),
    (
        "widget.html",
        "customer",
        "authenticated",
        "c0000000-0000-4000-8000-000000000002",
        "Dan",
    ),
];

/// One line per demo user: a label and the page's URL with the user's token (signed with the
/// dev secret, valid for a day) in the fragment, which browsers do not send to the server.
pub fn support_chat_logins(
    addr: std::net::SocketAddr,
    secret: &str,
) -> Result<Vec<(String, String)>, jsonwebtoken::errors::Error> {
    let exp = crate::auth::now_secs() + 24 * 3600;
    SUPPORT_CHAT_USERS
        .iter()
        .map(|(page, label, role, sub, name)| {
            let token = crate::auth::mint(
                secret,
                &serde_json::json!({
                    "iss": "walcast-dev", "role": role, "sub": sub, "exp": exp,
                    "user_metadata": {"name": name},
                }),
            )?;
            Ok((
                format!("{label} {name}"),
                format!("http://{addr}/examples/support-chat/{page}#token={token}"),
            ))
        })
        .collect()
}
