use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use walcast::auth::JwtVerifier;
use walcast::config::{Cli, Command, LogFormat, ServeArgs};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => run(args, None),
        Command::Dev(dev) => run_dev(dev),
        Command::Token(t) => {
            let claims = match t.claims.as_deref() {
                None => serde_json::Map::new(),
                Some(text) => match serde_json::from_str::<serde_json::Value>(text)? {
                    serde_json::Value::Object(m) => m,
                    _ => anyhow::bail!("--claims must be a JSON object"),
                },
            };
            let claims = walcast::auth::claims_for(claims, &t.role, t.sub.as_deref(), t.expires_in);
            println!("{}", walcast::auth::mint(&t.api_jwt_secret, &claims)?);
            Ok(())
        }
        Command::Migrate(args) => {
            init_tracing(&args.serve);
            let db = args
                .serve
                .database()?
                .context("walcast migrate needs a database: set DB_HOST or DATABASE_URL")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = if args.hand_back {
                let pool = walcast::db::Pool::new(&db.db, 1);
                runtime.block_on(walcast::db::handback::hand_back(
                    &pool,
                    &db.slot,
                    args.dry_run,
                ))?
            } else {
                runtime.block_on(walcast::db::migrations::migrate(
                    &db.db,
                    &db.publication,
                    args.dry_run,
                ))?
            };
            for line in report {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// `walcast dev`: start (or reuse) the private cluster, serve, stop the cluster on exit.
fn run_dev(dev: walcast::config::DevArgs) -> anyhow::Result<()> {
    let args = dev.serve_args()?;
    if dev.no_db {
        return run(
            args,
            Some(Dev {
                secret: dev.api_jwt_secret,
                cluster: None,
                example: None,
            }),
        );
    }
    let example = match dev.example.as_deref() {
        // The example's SQL (a role, a schema, policies on realtime.messages) goes into walcast
        // dev's own PostgreSQL only, never into a database of yours.
        Some(_) if args.database()?.is_some() => anyhow::bail!(
            "--example loads its SQL into walcast dev's own PostgreSQL only: unset DB_HOST and DATABASE_URL to run it"
        ),
        Some(name) => Some(walcast::dev::example_dir(name)?),
        None => None,
    };
    let cluster = walcast::dev::DevCluster::start(&dev.data_dir)?;
    let result = run(
        args,
        Some(Dev {
            secret: dev.api_jwt_secret,
            cluster: Some(&cluster),
            example,
        }),
    );
    if let Err(e) = cluster.stop() {
        eprintln!("stopping the dev PostgreSQL failed: {e}");
    }
    result
}

struct Dev<'a> {
    secret: String,
    cluster: Option<&'a walcast::dev::DevCluster>,
    /// `--example support-chat`: the example's directory.
    example: Option<std::path::PathBuf>,
}

/// Serves; in dev mode also prints development keys and uses the dev cluster.
fn run(args: ServeArgs, dev: Option<Dev<'_>>) -> anyhow::Result<()> {
    init_tracing(&args);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, dev))
}

fn init_tracing(args: &ServeArgs) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("walcast={}", args.log_filter())));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: ServeArgs, dev: Option<Dev<'_>>) -> anyhow::Result<()> {
    // Before anything that takes time: from here on a signal means a graceful stop.
    let shutdown = shutdown_signal().context("cannot install the signal handlers")?;
    let mut settings = args.settings()?;
    let mut database = args.database()?;
    if let Some(cluster) = dev.as_ref().and_then(|d| d.cluster) {
        // `walcast dev` uses the database you configured, else its own cluster, and always
        // migrates it.
        let db = match database.take() {
            Some(configured) => configured.db,
            None => cluster.db_config(),
        };
        database = Some(walcast::config::DatabaseSettings {
            migrate_on_start: true,
            ..args.database_on(db)?
        });
    }
    let verifier = JwtVerifier::new(
        args.api_jwt_secret.as_deref(),
        args.jwt_jwks.as_deref(),
        args.jwt_claim_validators.as_deref(),
    )?;
    let operator = walcast::app::Operator {
        admin: match args.api_jwt_secret.as_deref().filter(|s| !s.is_empty()) {
            Some(secret) => Some(JwtVerifier::new(Some(secret), None, None)?),
            None => None,
        },
        metrics: match args.metrics_jwt_secret.as_deref().filter(|s| !s.is_empty()) {
            Some(secret) => Some(JwtVerifier::new(Some(secret), None, None)?),
            None => {
                tracing::info!("METRICS_JWT_SECRET is not set: /metrics answers 403");
                None
            }
        },
    };
    note_ignored_settings();
    if let Some(limit) = args.rlimit_nofile {
        raise_nofile(limit);
    }
    let listener = TcpListener::bind((args.bind, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.bind, args.port))?;
    let addr = listener.local_addr()?;
    // The one line on stdout: tests and scripts read the bound port from it.
    let db_url = database.as_ref().map(|d| {
        format!(
            "postgres://{}@{}:{}/{}",
            d.db.user, d.db.host, d.db.port, d.db.dbname
        )
    });
    let dev_secret = dev.as_ref().map(|d| d.secret.clone());
    let database = match database {
        Some(db) => Some(walcast::app::Database::connect(db).await?),
        None => None,
    };
    let example = dev.as_ref().and_then(|d| d.example.clone());
    if let (Some(dir), Some(db)) = (&example, &database) {
        walcast::dev::load_example(&db.pg.pool, dir).await?;
        settings.example_dir = Some(dir.clone());
    }
    let app = walcast::app::run(listener, settings, verifier, operator, database, shutdown);
    println!("walcast listening on http://{addr}");
    if let Some(secret) = dev_secret {
        print_dev_keys(addr, &secret, db_url.as_deref())?;
        if let Some(dir) = &example {
            println!();
            println!("  Support-chat example ({}):", dir.display());
            for (who, url) in walcast::dev::support_chat_logins(addr, &secret)? {
                println!("    {who:<16} {url}");
            }
        }
    }
    tracing::info!(%addr, "listening");
    app.await?;
    tracing::info!("stopped");
    Ok(())
}

fn note_ignored_settings() {
    let present = walcast::config::elixir_only_settings_present();
    if !present.is_empty() {
        tracing::info!(settings = ?present, "ignoring settings that only apply to the Elixir realtime server");
    }
}

/// Raises the soft open-file limit (one file per socket) towards `limit`, within the hard limit.
#[allow(unsafe_code)] // sound: see the SAFETY comment inside
fn raise_nofile(limit: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass; no other memory is touched.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return;
        }
        let wanted = (limit as libc::rlim_t).min(rl.rlim_max);
        if wanted > rl.rlim_cur {
            rl.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                tracing::warn!(limit, "could not raise the open-file limit");
                return;
            }
        }
    }
    tracing::info!(limit = rl.rlim_cur, "open-file limit");
}

/// SIGTERM or Ctrl-C (SIGINT). The handlers are installed when this is called, not when the
/// future is first polled: a signal that comes right after start-up still stops walcast
/// gracefully instead of killing it with the default action.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// Development keys, valid for ten years, as a local Supabase stack prints them.
fn print_dev_keys(
    addr: std::net::SocketAddr,
    secret: &str,
    db_url: Option<&str>,
) -> anyhow::Result<()> {
    let exp = walcast::auth::now_secs() + 10 * 365 * 24 * 3600;
    let sign = |role: &str| {
        walcast::auth::mint(
            secret,
            &serde_json::json!({"iss": "walcast-dev", "role": role, "exp": exp}),
        )
    };
    println!();
    println!("  Realtime URL (createClient):  http://{addr}");
    println!("  WebSocket:                   ws://{addr}/realtime/v1/websocket");
    println!("  anon key:          {}", sign("anon")?);
    println!("  service_role key:  {}", sign("service_role")?);
    if let Some(url) = db_url {
        println!("  PostgreSQL:        {url}");
    }
    println!();
    println!("  Development only: these keys are signed with a well-known secret.");
    Ok(())
}
