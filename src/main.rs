//! The `smtp-oauth-relay` binary: parse the command line, set up logging, dispatch.

use std::{process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use smtp_oauth_relay::{
    cli::{Cli, Command, QueueCommand, TokenCommand},
    config::Config,
    daemon::{self, Daemon},
    demo, oauth, signals,
    spool::control::{self, Request, Response},
    tls,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: under systemd, stderr goes to the journal as plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("smtp-oauth-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("smtp-oauth-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            let daemon = Daemon::start(config).await?;
            let stop = daemon.shutdown_token();
            tokio::select! {
                _ = signals::terminated() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
            daemon.wait().await;
        }
        Command::CheckConfig => {
            let config = Config::load(&cli.config)?;
            for a in &config.accounts {
                daemon::upstream_settings(a, &config.server.hostname)?;
                daemon::refresher(a)?;
                let store = a.token_store();
                store
                    .check_private()
                    .and_then(|()| store.load().map(drop))
                    .with_context(|| format!("account {}: `token_file`", a.name))?;
            }
            println!("{}: OK", cli.config.display());
        }
        Command::Token { command } => {
            let config = Config::load(&cli.config)?;
            match command {
                TokenCommand::Status { account, json } => {
                    let a = config.account(account.as_deref())?;
                    let store = a.token_store();
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or(Duration::ZERO)
                        .as_secs();
                    let status =
                        oauth::status_with(&store, now, a.provider_hint(), a.credential.kind())?;
                    if json {
                        println!("{}", status.to_json(&a.name));
                    } else {
                        println!("account {} ({}):\n{status}", a.name, a.username);
                    }
                }
                TokenCommand::Refresh { account } => {
                    let a = config.account(account.as_deref())?;
                    let store = a.token_store();
                    let refresher = daemon::refresher(a)?;
                    let result = oauth::refresh_now(&store, &refresher).await;
                    if let Err(oauth::OAuthError::Refresh(e)) = &result {
                        if let Some(fix) = daemon::manager_settings(a, &config.path).remedy(e) {
                            eprintln!("{fix}");
                        }
                    }
                    result
                        .with_context(|| format!("refreshing the token of account {}", a.name))?;
                    println!(
                        "account {}: access token refreshed and saved to {}",
                        a.name,
                        a.token_file.display()
                    );
                }
            }
        }
        Command::Demo {
            listen,
            mail_dir,
            token_lifetime,
            pool_size,
        } => {
            demo::run(demo::DemoOptions {
                listen,
                mail_dir,
                token_lifetime: Duration::from_secs(token_lifetime.max(10)),
                pool_size,
            })
            .await?;
        }
        Command::Sandbox(args) => demo::run_sandbox(args).await?,
        Command::Authorize {
            account,
            device: true,
            ..
        } => {
            let config = Config::load(&cli.config)?;
            refuse_authorize(&config, account.as_deref())?;
            oauth::device::run_device(
                &config,
                account.as_deref(),
                oauth::device::DeviceOptions::default(),
            )
            .await?;
        }
        Command::Authorize {
            account,
            no_browser,
            port,
            device: false,
        } => {
            let config = Config::load(&cli.config)?;
            refuse_authorize(&config, account.as_deref())?;
            oauth::authorize::run(
                &config,
                account.as_deref(),
                oauth::authorize::AuthorizeOptions::new(no_browser, port),
            )
            .await?;
        }
        Command::Queue { json, command } => {
            let config = Config::load(&cli.config)?;
            let Some(spool) = &config.spool else {
                anyhow::bail!(
                    "{}: no [spool] table; without a spool, mail is delivered synchronously and nothing is queued",
                    cli.config.display()
                );
            };
            let req = match command {
                QueueCommand::List => Request::List,
                QueueCommand::Show { id } => Request::Show { id },
                QueueCommand::Flush => Request::Flush,
                QueueCommand::Delete { ids } => Request::Delete { ids },
                QueueCommand::Stats => Request::Stats,
            };
            let dir = spool.dir.clone();
            let resp = tokio::task::spawn_blocking(move || control::query(&dir, &req)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&resp)?);
            } else {
                print!("{}", control::render(&resp));
            }
            let failed = match &resp {
                Response::Error { .. } => true,
                Response::Deleted { missing, .. } => !missing.is_empty(),
                _ => false,
            };
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `authorize` for an account that gets tokens without a user's sign-in is a mistake.
fn refuse_authorize(config: &Config, account: Option<&str>) -> anyhow::Result<()> {
    match config.account(account)?.authorize_refusal() {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}
