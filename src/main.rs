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
        Command::Migrate(args) => {
            init_tracing(&args);
            let db = args
                .database()?
                .context("walcast migrate needs a database: set DB_HOST or DATABASE_URL")?;
            let applied = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(walcast::app::migrate(&db))?;
            println!(
                "migrations applied: {applied:?} (publication {:?} ready)",
                db.publication
            );
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
            }),
        );
    }
    let cluster = walcast::dev::DevCluster::start(&dev.data_dir)?;
    let result = run(
        args,
        Some(Dev {
            secret: dev.api_jwt_secret,
            cluster: Some(&cluster),
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: ServeArgs, dev: Option<Dev<'_>>) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let mut database = args.database()?;
    if let Some(cluster) = dev.as_ref().and_then(|d| d.cluster) {
        let mut db = walcast::config::DatabaseSettings {
            db: cluster.db_config(),
            pool_size: args.db_pool_size,
            publication: args.publication.clone(),
            slot: args.slot_name.clone(),
            max_record_bytes: args.max_record_bytes,
            migrate_on_start: true,
            run_janitor: args.run_janitor,
            messages_retention: std::time::Duration::from_secs(
                args.messages_retention_hours.saturating_mul(3600),
            ),
        };
        if let Some(configured) = database.take() {
            db.db = configured.db;
        }
        database = Some(db);
    }
    let verifier = JwtVerifier::new(
        args.api_jwt_secret.as_deref(),
        args.jwt_jwks.as_deref(),
        args.jwt_claim_validators.as_deref(),
    )?;
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
    let app = walcast::app::run(listener, settings, verifier, database, shutdown_signal());
    println!("walcast listening on http://{addr}");
    if let Some(secret) = dev_secret {
        print_dev_keys(addr, &secret, db_url.as_deref())?;
    }
    tracing::info!(%addr, "listening");
    app.await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Development keys, valid for ten years, as a local Supabase stack prints them.
fn print_dev_keys(
    addr: std::net::SocketAddr,
    secret: &str,
    db_url: Option<&str>,
) -> anyhow::Result<()> {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let exp = walcast::auth::now_secs() + 10 * 365 * 24 * 3600;
    let key = EncodingKey::from_secret(secret.as_bytes());
    let sign = |role: &str| {
        encode(
            &Header::default(),
            &serde_json::json!({"iss": "walcast-dev", "role": role, "exp": exp}),
            &key,
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
