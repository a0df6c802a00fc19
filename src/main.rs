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
        Command::Dev(dev) => {
            let args = dev.serve_args()?;
            run(args, Some(dev.api_jwt_secret))
        }
    }
}

/// Serves; with `dev_secret`, also prints development keys signed with it.
fn run(args: ServeArgs, dev_secret: Option<String>) -> anyhow::Result<()> {
    init_tracing(&args);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, dev_secret))
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

async fn serve(args: ServeArgs, dev_secret: Option<String>) -> anyhow::Result<()> {
    let settings = args.settings()?;
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
    println!("walcast listening on http://{addr}");
    if let Some(secret) = dev_secret {
        print_dev_keys(addr, &secret)?;
    }
    tracing::info!(%addr, "listening");
    walcast::app::run(listener, settings, verifier, shutdown_signal()).await?;
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
fn print_dev_keys(addr: std::net::SocketAddr, secret: &str) -> anyhow::Result<()> {
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
    println!();
    println!("  Development only: these keys are signed with a well-known secret.");
    Ok(())
}
