//! The command line (clap): verbs, flags and their help texts. Dispatch is in `main.rs`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "smtp-oauth-relay",
    version,
    about = "Plain SMTP on loopback in, STARTTLS + AUTH XOAUTH2 out: lets printers, cron and legacy apps send through Gmail/Google Workspace with OAuth 2.0",
    propagate_version = true
)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH, env = "SMTP_OAUTH_RELAY_CONFIG")]
    pub config: PathBuf,

    /// Log filter (tracing-subscriber syntax, e.g. "info", "debug", "smtp_oauth_relay=debug").
    /// RUST_LOG overrides it.
    #[arg(long, global = true, value_name = "FILTER", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay in the foreground (logs to stderr), until SIGTERM or Ctrl-C.
    Run,
    /// Check the configuration: exit 0 if it is valid, else name the key at fault.
    CheckConfig,
    /// Inspect or refresh the stored OAuth tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the relay against a built-in sandbox provider (fake Gmail + token endpoint):
    /// no Google account needed. Messages land in --mail-dir.
    Demo {
        /// Where the relay listens.
        #[arg(long, default_value = "127.0.0.1:2525")]
        listen: SocketAddr,
        /// Where the sandbox writes each message it receives.
        #[arg(long, default_value = "demo-mail", value_name = "DIR")]
        mail_dir: PathBuf,
        /// Lifetime of the sandbox's access tokens in seconds (short, so refreshes show).
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        token_lifetime: u64,
        /// Upstream connections kept open and authenticated.
        #[arg(long, default_value_t = 4)]
        pool_size: usize,
    },
    /// Run only the sandbox provider (fake Gmail + token endpoint) in the foreground,
    /// for testing apps and other relays against it; prints a message count each second.
    Sandbox(SandboxArgs),
    /// The spool's queue (like mailq / postqueue / postsuper): through the running
    /// daemon's control socket, or from the files when no daemon runs.
    Queue {
        /// Print JSON (for scripts) instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Sign in once (authorization code + PKCE, or --device) and write the account's token file.
    /// Listens on http://127.0.0.1:PORT/ for the browser's redirect; on a server without
    /// a browser, open the printed URL anywhere and paste back the URL it ends on.
    Authorize {
        /// The account (default: the first one).
        #[arg(long)]
        account: Option<String>,
        /// Do not try to open a browser here: open the URL on any machine, then paste the
        /// redirected URL (or just the code).
        #[arg(long)]
        no_browser: bool,
        /// Loopback port for the redirect (default: any free port). Fix it to forward it
        /// over SSH (`ssh -L N:127.0.0.1:N server`) and let the redirect arrive by itself.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// Use the device code flow (RFC 8628; Microsoft 365's natural choice): print a
        /// URL and a code to enter on any device, no redirect, nothing to paste.
        #[arg(long, conflicts_with_all = ["no_browser", "port"])]
        device: bool,
    },
}

/// Options of `smtp-oauth-relay sandbox`.
#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Where the fake Gmail (STARTTLS + XOAUTH2) listens.
    #[arg(long, default_value = "127.0.0.1:2587")]
    pub smtp_listen: SocketAddr,
    /// Where the fake token endpoint listens.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub token_listen: SocketAddr,
    /// Write each received message here (default: keep nothing, count only).
    #[arg(long, value_name = "DIR")]
    pub mail_dir: Option<PathBuf>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3599, value_name = "SECS")]
    pub token_lifetime: u64,
    /// Also accept AUTH PLAIN with this password (for comparing password-only clients
    /// such as Postfix against the same fake; Gmail itself refuses PLAIN).
    #[arg(long, value_name = "PASSWORD")]
    pub plain_password: Option<String>,
    /// Directory where the sandbox writes its CA certificate, a token file and a relay
    /// config pointing at it.
    #[arg(long, value_name = "DIR", default_value = "sandbox-state")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Every queued message: ID, age, size, sender, recipients, attempts, next attempt,
    /// last error.
    List,
    /// One message: envelope, each recipient's state, and its header section.
    Show { id: String },
    /// Try every queued message now (the daemon must be running).
    Flush,
    /// Remove messages from the queue, without delivering or bouncing them.
    Delete {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// Spool counters: queued, in flight, commits, fsyncs per message.
    Stats,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Show access token expiry, last refresh and warnings (never the tokens themselves).
    Status {
        /// The account (default: the first one).
        #[arg(long)]
        account: Option<String>,
        /// One JSON object, for monitoring (exit status 0 either way; see "healthy").
        #[arg(long)]
        json: bool,
    },
    /// Refresh the access token now and save it in the token file.
    Refresh {
        /// The account (default: the first one).
        #[arg(long)]
        account: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_flags() {
        let cli = Cli::try_parse_from([
            "smtp-oauth-relay",
            "--config",
            "/tmp/c.toml",
            "authorize",
            "--account",
            "gmail",
            "--no-browser",
            "--port",
            "8765",
        ])
        .unwrap();
        match cli.command {
            Command::Authorize {
                account,
                no_browser,
                port,
                device,
            } => {
                assert_eq!(account.as_deref(), Some("gmail"));
                assert!(no_browser && !device);
                assert_eq!(port, Some(8765));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["smtp-oauth-relay", "authorize"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Authorize {
                account: None,
                no_browser: false,
                port: None,
                device: false,
            }
        ));
        assert!(Cli::try_parse_from(["smtp-oauth-relay", "authorize", "--port", "x"]).is_err());
        let cli = Cli::try_parse_from(["smtp-oauth-relay", "authorize", "--device"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Authorize { device: true, .. }
        ));
        assert!(
            Cli::try_parse_from(["smtp-oauth-relay", "authorize", "--device", "--no-browser"])
                .is_err()
        );
    }
}
