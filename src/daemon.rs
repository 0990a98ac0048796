//! Wiring of one running relay: token manager, upstream pool, ingress listeners, and their
//! orderly shutdown. `main`, the demo and the integration tests all start it the same way.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    config::{AccountConfig, Config, Credential},
    envelope::{Deliver, Routed},
    ingress::{self, IngressSettings},
    oauth::{
        manager::{ManagerSettings, TokenManager},
        refresh::{AccountRefresher, OAuth2Refresher},
        service_account::ServiceAccountRefresher,
        OAuthError, TokenHandle,
    },
    relay::Relay,
    route::Upstreams,
    spool::{Spool, SpoolError, SpoolSettings, SpoolWriter},
    tls,
    upstream::{UpstreamPool, UpstreamSettings},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("listener failed: {0}")]
    Ingress(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// A started relay.
pub struct Daemon {
    /// The addresses actually bound (useful with port 0).
    pub local_addrs: Vec<SocketAddr>,
    /// The default (or first) account's token handle and pool.
    pub tokens: TokenHandle,
    pub pool: UpstreamPool,
    shutdown: CancellationToken,
    /// Every account's pool, routed by sender.
    pub upstreams: Upstreams,
    serve: JoinHandle<()>,
    managers: Vec<JoinHandle<()>>,
    /// The durable queue, when `[spool]` is configured.
    spool: Option<Spool>,
}

/// Things tests swap in.
#[derive(Default)]
pub struct DaemonHooks {
    /// The spool's writer (e.g. one that fails like a full disk).
    pub spool_writer: Option<Box<dyn SpoolWriter>>,
}

/// Serves the listeners with `deliver` until `shutdown`; a failed listener stops the
/// daemon.
fn spawn_serve<D: Deliver>(
    listeners: Vec<TcpListener>,
    ingress: Arc<IngressSettings>,
    deliver: Arc<D>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = ingress::serve(listeners, ingress, deliver, shutdown.clone()).await {
            error!(error = %e, "listener failed; shutting down");
            shutdown.cancel();
        }
    })
}

/// The ingress settings a config asks for.
pub fn ingress_settings(config: &Config) -> IngressSettings {
    let s = &config.server;
    let mut i = IngressSettings::new(s.hostname.clone());
    i.max_message_size = s.max_message_size;
    i.max_recipients = s.max_recipients;
    i.max_connections = s.max_connections;
    i.command_timeout = s.command_timeout;
    i.data_timeout = s.data_timeout;
    i
}

/// The upstream settings for one account.
pub fn upstream_settings(
    account: &AccountConfig,
    hostname: &str,
) -> Result<UpstreamSettings, DaemonError> {
    let tls = tls::client_config(account.ca_file.as_deref())?;
    let mut u = UpstreamSettings::new(
        account.smtp_host.clone(),
        account.smtp_port,
        hostname.to_owned(),
        account.username.clone(),
        tls,
    );
    u.tls_server_name = account.tls_server_name.clone();
    u.pool_size = account.pool_size;
    u.max_idle = account.max_idle;
    u.max_messages_per_connection = account.max_messages_per_connection;
    Ok(u)
}

/// The token manager's settings for one account of the config at `config_path`.
pub fn manager_settings(account: &AccountConfig, config_path: &std::path::Path) -> ManagerSettings {
    ManagerSettings {
        account: account.name.clone(),
        credential: account.credential.kind(),
        refresh_margin: account.refresh_margin,
        provider_hint: account.provider_hint(),
        config_path: Some(config_path.to_path_buf()),
    }
}

/// The token refresher for one account.
pub fn refresher(account: &AccountConfig) -> Result<AccountRefresher, DaemonError> {
    let client_id = account.client_id.clone();
    let token_url = account.token_url.clone();
    Ok(match (&account.credential, &account.client_secret) {
        (Credential::ServiceAccount { key_file, .. }, _) => {
            AccountRefresher::ServiceAccount(ServiceAccountRefresher::new(
                key_file.clone(),
                account.username.clone(),
                account.scopes.clone(),
                token_url,
            )?)
        }
        (Credential::ClientCredentials, Some(secret)) => {
            AccountRefresher::OAuth2(Box::new(OAuth2Refresher::client_credentials(
                client_id,
                secret.clone(),
                token_url,
                account.scopes.clone(),
            )?))
        }
        (_, secret) => AccountRefresher::OAuth2(Box::new(OAuth2Refresher::new(
            client_id,
            secret.clone(),
            token_url,
        )?)),
    })
}

impl Daemon {
    /// Binds the listeners, starts the token manager and the pool, and serves until
    /// `shutdown()`.
    pub async fn start(config: Config) -> Result<Daemon, DaemonError> {
        Daemon::start_with(config, DaemonHooks::default()).await
    }

    /// `start`, with test hooks.
    pub async fn start_with(config: Config, hooks: DaemonHooks) -> Result<Daemon, DaemonError> {
        tls::install_crypto_provider();
        let shutdown = CancellationToken::new();
        // The default account (or the first): its handle and pool are `tokens`/`pool`.
        let main = config.accounts.iter().position(|a| a.default).unwrap_or(0);
        let account = config.accounts[main].clone();

        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for addr in &config.server.listen {
            let l = TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind {
                addr: *addr,
                hint: if source.kind() == std::io::ErrorKind::PermissionDenied {
                    " (ports below 1024 need root or CAP_NET_BIND_SERVICE; the systemd unit grants it)"
                } else if source.kind() == std::io::ErrorKind::AddrInUse {
                    " (another mail server, e.g. postfix or exim, may already use this port)"
                } else {
                    ""
                },
                source,
            })?;
            local_addrs.push(l.local_addr().unwrap_or(*addr));
            listeners.push(l);
        }

        // One token manager and one pool per account.
        let mut handles = Vec::new();
        let mut managers = Vec::new();
        let mut pools = Vec::new();
        for account in &config.accounts {
            let store = account.token_store();
            // The tokens must not be readable by others: refuse to run on them.
            store.check_private().map_err(OAuthError::from)?;
            let settings = manager_settings(account, &config.path);
            let (tokens, manager) =
                TokenManager::start(settings, store, refresher(account)?, shutdown.clone())?;
            let pool = UpstreamPool::new(
                upstream_settings(account, &config.server.hostname)?,
                tokens.clone(),
            );
            {
                // Warm the pool once the first token is there, without holding up start.
                let pool = pool.clone();
                let tokens = tokens.clone();
                tokio::spawn(async move {
                    if tokens.ready(Duration::from_secs(60)).await.is_ok() {
                        pool.warm().await;
                    }
                });
            }
            handles.push(tokens);
            managers.push(manager);
            pools.push(pool);
        }
        let tokens = handles[main].clone();
        let pool = pools[main].clone();
        let upstreams = Upstreams::new(&config.accounts, pools);

        let ingress = Arc::new(ingress_settings(&config));
        let spool = match &config.spool {
            None => None,
            Some(sc) => Some(
                Spool::start(
                    SpoolSettings::new(sc.clone(), &config.server.hostname, &account.smtp_host),
                    upstreams.clone(),
                    hooks
                        .spool_writer
                        .unwrap_or_else(|| Box::new(crate::spool::DiskWriter)),
                )
                .await?,
            ),
        };
        let serve = match &spool {
            None => {
                let relay = Relay::new(upstreams.clone(), config.server.hostname.clone());
                let routed = Routed {
                    inner: relay,
                    upstreams: upstreams.clone(),
                };
                spawn_serve(listeners, ingress, Arc::new(routed), shutdown.clone())
            }
            Some(sp) => {
                let routed = Routed {
                    inner: sp.deliverer(),
                    upstreams: upstreams.clone(),
                };
                spawn_serve(listeners, ingress, Arc::new(routed), shutdown.clone())
            }
        };
        info!(
            listen = ?local_addrs,
            accounts = %config.accounts.iter().map(|a| format!("{} via {}:{} (pool {})", a.name, a.smtp_host, a.smtp_port, a.pool_size)).collect::<Vec<_>>().join(", "),
            spool = %config.spool.as_ref().map(|s| s.dir.display().to_string()).unwrap_or_else(|| "none (synchronous delivery)".into()),
            "smtp-oauth-relay started"
        );
        Ok(Daemon {
            local_addrs,
            tokens,
            pool,
            upstreams,
            shutdown,
            serve,
            managers,
            spool,
        })
    }

    /// The spool's counters, when there is a spool.
    pub async fn spool_stats(&self) -> Option<crate::spool::SpoolStats> {
        match &self.spool {
            Some(s) => s.stats().await,
            None => None,
        }
    }

    /// A token that, when cancelled, stops the daemon.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets sessions finish (idle ones get 421 4.3.0), closes the
    /// upstream connections and stops the token manager.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the daemon stopped (after `shutdown_token().cancel()`).
    pub async fn wait(self) {
        if let Err(e) = self.serve.await {
            warn!(error = %e, "listener task ended abnormally");
        }
        self.shutdown.cancel();
        if let Some(spool) = self.spool {
            spool.stop().await;
        }
        self.upstreams.close().await;
        for m in self.managers {
            let _ = m.await;
        }
        info!("smtp-oauth-relay stopped");
    }
}
