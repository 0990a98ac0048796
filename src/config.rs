//! The TOML configuration: schema (serde, unknown keys refused), defaults per provider in
//! one place, and a validation pass whose every error names the key at fault and the fix.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::SecretString;
use serde::Deserialize;

use crate::oauth::client_json::{ClientKind, ClientSecretJson};
use crate::oauth::service_account::ServiceAccountKey;

/// Where `--config` points when it is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/smtp-oauth-relay/config.toml";

/// Google's authorization endpoint, as in the console's client file.
pub const GMAIL_AUTH_URL: &str = "https://accounts.google.com/o/oauth2/auth";

/// The scope Gmail's SMTP needs for XOAUTH2.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

/// Microsoft 365's SMTP AUTH submission host.
pub const MICROSOFT_SMTP_HOST: &str = "smtp.office365.com";

/// Scopes Microsoft 365's SMTP AUTH needs: `SMTP.Send` (delegated) and `offline_access`
/// (without it no refresh token comes back).
pub const MICROSOFT_SCOPES: [&str; 2] = ["https://outlook.office.com/SMTP.Send", "offline_access"];

/// The default `tenant` for provider "microsoft": any work or school (Entra ID) account.
/// The scope of Microsoft 365 app-only SMTP (`SMTP.SendAsApp`) for client credentials.
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const MICROSOFT_DEFAULT_TENANT: &str = "organizations";

/// Microsoft rejects access tokens close to expiry: refresh at least this far ahead.
pub const MICROSOFT_MIN_REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}` (`token`,
/// `authorize`, `devicecode`).
pub fn microsoft_url(tenant: &str, endpoint: &str) -> String {
    format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{endpoint}")
}

/// Gmail's advertised SIZE limit, also our default.
pub const GMAIL_MAX_MESSAGE_SIZE: usize = 35_882_577;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass another file with --config PATH)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The file as written. Every table refuses keys it does not know.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub account: Vec<RawAccount>,
    /// Optional: without it, delivery is synchronous (no queue).
    pub spool: Option<RawSpool>,
}

/// `[spool]`: the durable queue. Durations in seconds (fractions allowed for retries).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpool {
    pub dir: Option<PathBuf>,
    pub max_queue_lifetime_secs: Option<f64>,
    pub min_retry_secs: Option<f64>,
    pub max_retry_secs: Option<f64>,
    pub workers: Option<usize>,
    pub probe_max_secs: Option<f64>,
    pub quota_retry_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub max_message_size: Option<usize>,
    pub max_recipients: Option<usize>,
    pub max_connections: Option<usize>,
    /// Listening on a non-loopback address must be asked for explicitly: the relay does
    /// no client authentication, so anyone who can reach it can send as the account.
    pub allow_non_loopback: Option<bool>,
    pub command_timeout_secs: Option<u64>,
    pub data_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    pub name: Option<String>,
    /// The account for senders no other account claims.
    pub default: Option<bool>,
    /// Envelope senders routed to this account besides its `username`: exact addresses
    /// (`"app@example.com"`) or whole domains (`"@example.com"`).
    pub senders: Option<Vec<String>>,
    pub provider: Option<String>,
    /// How the account gets access tokens: "refresh_token" (default: `authorize` once),
    /// "service_account" (Google Workspace, domain-wide delegation) or
    /// "client_credentials" (Microsoft 365 app-only).
    pub credential: Option<String>,
    /// A Google service account's JSON key (implies `credential = "service_account"`).
    pub service_account_json: Option<PathBuf>,
    pub username: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretString>,
    pub client_secret_file: Option<PathBuf>,
    /// Google's downloaded client file (`installed` or `web` shape): supplies client id,
    /// secret, auth/token URIs and redirect URIs; explicit keys override it.
    pub client_secret_json: Option<PathBuf>,
    /// Authorization endpoint used by `authorize`.
    pub auth_url: Option<String>,
    /// Device authorization endpoint (RFC 8628) used by `authorize --device`.
    pub device_auth_url: Option<String>,
    /// Provider "microsoft": the Entra ID tenant (directory ID, a verified domain, or
    /// "organizations"; default "organizations").
    pub tenant: Option<String>,
    /// Scopes requested by `authorize`.
    pub scopes: Option<Vec<String>>,
    /// Redirect URI registered for the client (a "Web application" client); `authorize`
    /// then asks for the redirected URL to be pasted instead of listening on loopback.
    pub redirect_uri: Option<String>,
    pub token_file: Option<PathBuf>,
    pub refresh_margin_secs: Option<u64>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    pub token_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Name presented in the upstream's TLS certificate, if not `smtp_host`.
    pub tls_server_name: Option<String>,
    pub pool_size: Option<usize>,
    pub max_idle_secs: Option<u64>,
    pub max_messages_per_connection: Option<u32>,
}

/// Which provider's defaults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Gmail,
    /// Microsoft 365 (Exchange Online), `smtp.office365.com`.
    Microsoft,
    Custom,
}

impl Provider {
    fn parse(s: &str) -> Option<Provider> {
        match s {
            "gmail" | "google" => Some(Provider::Gmail),
            "microsoft" | "office365" | "outlook" => Some(Provider::Microsoft),
            "custom" => Some(Provider::Custom),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::Gmail => "gmail",
            Provider::Microsoft => "microsoft",
            Provider::Custom => "custom",
        }
    }
}

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub accounts: Vec<AccountConfig>,
    /// `None`: no `[spool]` table, delivery is synchronous.
    pub spool: Option<SpoolConfig>,
}

/// The validated `[spool]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    /// Holds `queue/`, `tmp/`, `failed/`, `corrupt/`, `control.sock` and `lock`.
    pub dir: PathBuf,
    /// A message still undelivered after this long is bounced (default 5 days).
    pub max_queue_lifetime: Duration,
    /// First retry delay after a 4xx (default 60 s); it doubles per attempt…
    pub min_retry: Duration,
    /// …up to this (default 3600 s).
    pub max_retry: Duration,
    /// Delivery attempts in flight at once (default: the account's `pool_size`, at least 1).
    pub workers: usize,
    /// Longest wait between probes of an upstream found down (default 60 s).
    pub probe_max: Duration,
    /// Wait before trying again after Gmail's daily quota reply 550 5.4.5 (default 3600 s).
    pub quota_retry: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AccountConfig {
    pub name: String,
    /// Takes mail from senders no other account claims.
    pub default: bool,
    /// Lower-cased sender patterns: exact addresses and `@domain`s (see `RawAccount`).
    pub senders: Vec<String>,
    pub provider: Provider,
    pub credential: Credential,
    pub username: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub token_file: PathBuf,
    pub refresh_margin: Duration,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub tls_server_name: String,
    pub token_url: String,
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub max_idle: Duration,
    pub max_messages_per_connection: u32,
    /// Authorization endpoint for `authorize`; `None` only for provider "custom" without
    /// `auth_url` (the relay itself never needs it).
    pub auth_url: Option<String>,
    /// Device authorization endpoint for `authorize --device`; `None` when the provider
    /// has none (Gmail: Google's device flow does not allow the Gmail scope).
    pub device_auth_url: Option<String>,
    /// Scopes `authorize` asks for (Gmail: `https://mail.google.com/`).
    pub scopes: Vec<String>,
    /// The redirect URI `authorize` uses: `redirect_uri`, else the first registered one of
    /// a "web" client file. `None`: a loopback listener on `http://127.0.0.1:PORT/`.
    pub redirect_uri: Option<String>,
    /// What `client_secret_json` said, if given (for `authorize`'s messages).
    pub client_file: Option<ClientFileInfo>,
}

/// How an account gets its access tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A refresh token from `authorize`, kept in `token_file`.
    RefreshToken,
    /// A Google service account acting for `username` (JWT bearer grant).
    ServiceAccount {
        key_file: PathBuf,
        client_email: String,
    },
    /// Client id + secret, no user (Microsoft 365 app-only, `SMTP.SendAsApp`).
    ClientCredentials,
}

impl Credential {
    pub fn kind(&self) -> crate::oauth::CredentialKind {
        use crate::oauth::CredentialKind;
        match self {
            Credential::RefreshToken => CredentialKind::RefreshToken,
            Credential::ServiceAccount { .. } => CredentialKind::ServiceAccount,
            Credential::ClientCredentials => CredentialKind::ClientCredentials,
        }
    }
}

/// Where an account's client came from when `client_secret_json` is used.
#[derive(Debug, Clone)]
pub struct ClientFileInfo {
    pub path: PathBuf,
    pub kind: ClientKind,
    pub redirect_uris: Vec<String>,
}

impl AccountConfig {
    /// The account's token file: it holds the refresh token, or for the other
    /// credentials only the cached access token (and may not exist yet).
    pub fn token_store(&self) -> crate::oauth::TokenStore {
        let path = self.token_file.clone();
        if self.credential.kind().uses_refresh_token() {
            crate::oauth::TokenStore::new(path)
        } else {
            crate::oauth::TokenStore::without_refresh_token(path)
        }
    }

    /// Why `authorize` has nothing to do for this account (`None`: it needs a refresh token).
    pub fn authorize_refusal(&self) -> Option<String> {
        let what = match &self.credential {
            Credential::RefreshToken => return None,
            Credential::ServiceAccount { client_email, .. } => {
                format!("uses the service account {client_email}")
            }
            Credential::ClientCredentials => "uses client credentials (app-only)".to_owned(),
        };
        Some(format!(
            "account {} {what}: it needs no authorization and no refresh token; test it with `smtp-oauth-relay token refresh --account {}`",
            self.name, self.name
        ))
    }

    /// Which provider's wording the token manager's hints use.
    pub fn provider_hint(&self) -> crate::oauth::ProviderHint {
        match self.provider {
            Provider::Gmail => crate::oauth::ProviderHint::Gmail,
            Provider::Microsoft => crate::oauth::ProviderHint::Microsoft,
            Provider::Custom => crate::oauth::ProviderHint::Custom,
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is used in messages and to resolve
    /// relative file names.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        raw.validate(path)
    }

    /// The account `name`, or the only/first one when `name` is `None`.
    pub fn account(&self, name: Option<&str>) -> Result<&AccountConfig, ConfigError> {
        match name {
            None => self
                .accounts
                .iter()
                .find(|a| a.default)
                .or_else(|| self.accounts.first())
                .ok_or_else(|| self.invalid("account", "no [[account]] is configured")),
            Some(n) => self.accounts.iter().find(|a| a.name == n).ok_or_else(|| {
                let known: Vec<&str> = self.accounts.iter().map(|a| a.name.as_str()).collect();
                self.invalid(
                    "account",
                    format!("no account named {n:?}; configured: {}", known.join(", ")),
                )
            }),
        }
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_owned(),
            problem: problem.into(),
        }
    }
}

struct Check<'a> {
    path: &'a Path,
}

impl Check<'_> {
    fn err(&self, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// A secret file's path: `$CREDENTIALS_DIRECTORY/NAME` (systemd's `LoadCredential=`)
    /// expanded, then resolved like any other path.
    fn secret_path(&self, key: String, p: &Path) -> Result<PathBuf, ConfigError> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY");
        let p = expand_credentials(p, creds.as_deref()).map_err(|e| self.err(key, e))?;
        Ok(self.resolve(&p))
    }

    /// Relative paths in the config are relative to the config file's directory.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// Expands a leading `$CREDENTIALS_DIRECTORY` or `${CREDENTIALS_DIRECTORY}` in `p` to
/// `creds` (the directory systemd passes credentials in).
fn expand_credentials(p: &Path, creds: Option<&std::ffi::OsStr>) -> Result<PathBuf, String> {
    let text = p.to_string_lossy();
    let rest = ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"]
        .iter()
        .find_map(|v| text.strip_prefix(v));
    let Some(rest) = rest else {
        return Ok(p.to_owned());
    };
    let Some(dir) = creds.filter(|d| !d.is_empty()) else {
        return Err(format!(
            "{text:?} uses $CREDENTIALS_DIRECTORY, which is not set: run the relay under systemd with `LoadCredential=NAME:/path/to/file` (see systemd/smtp-oauth-relay.service), or give a plain path"
        ));
    };
    Ok(Path::new(dir).join(rest.trim_start_matches('/')))
}

/// Checks that a token URL is https, or http to a loopback host (a local test endpoint);
/// the reason names what is wrong.
pub fn check_token_url(url: &str) -> Result<(), String> {
    crate::oauth::refresh::validate_token_url(url).map_err(|e| match e {
        crate::oauth::OAuthError::TokenUrl { reason, .. } => reason,
        other => other.to_string(),
    })
}

impl RawConfig {
    fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        let c = Check { path };
        let s = self.server;

        let listen_raw = s
            .listen
            .unwrap_or_else(|| vec!["127.0.0.1:25".into(), "[::1]:25".into()]);
        if listen_raw.is_empty() {
            return Err(c.err(
                "server.listen",
                "is empty; give at least one address, e.g. [\"127.0.0.1:25\"]",
            ));
        }
        let mut listen = Vec::new();
        for (i, a) in listen_raw.iter().enumerate() {
            let addr: SocketAddr = a.parse().map_err(|_| {
                c.err(
                    format!("server.listen[{i}]"),
                    format!(
                        "{a:?} is not an IP:port address (e.g. \"127.0.0.1:25\" or \"[::1]:25\")"
                    ),
                )
            })?;
            if !addr.ip().is_loopback() && !s.allow_non_loopback.unwrap_or(false) {
                return Err(c.err(
                    format!("server.listen[{i}]"),
                    format!(
                        "{a} is not a loopback address; the relay does not authenticate clients, so listening there makes an open relay for anyone who can reach it. Use 127.0.0.1/::1, or set server.allow_non_loopback = true and firewall the port"
                    ),
                ));
            }
            listen.push(addr);
        }
        let hostname = match s.hostname {
            Some(h) if h.trim().is_empty() || h.contains(char::is_whitespace) => {
                return Err(c.err("server.hostname", format!("{h:?} is not a host name")))
            }
            Some(h) => h,
            None => gethostname::gethostname()
                .into_string()
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into()),
        };
        let max_message_size = s.max_message_size.unwrap_or(GMAIL_MAX_MESSAGE_SIZE);
        if max_message_size < 1024 {
            return Err(c.err("server.max_message_size", "must be at least 1024 bytes"));
        }
        let max_recipients = s.max_recipients.unwrap_or(100);
        if max_recipients == 0 {
            return Err(c.err("server.max_recipients", "must be at least 1"));
        }
        let max_connections = s.max_connections.unwrap_or(256);
        if max_connections == 0 {
            return Err(c.err("server.max_connections", "must be at least 1"));
        }
        let server = ServerConfig {
            listen,
            hostname,
            max_message_size,
            max_recipients,
            max_connections,
            command_timeout: Duration::from_secs(s.command_timeout_secs.unwrap_or(300).max(1)),
            data_timeout: Duration::from_secs(s.data_timeout_secs.unwrap_or(180).max(1)),
        };

        if self.account.is_empty() {
            return Err(c.err(
                "account",
                "no [[account]] table; add one (see config/config.example.toml)",
            ));
        }
        let mut accounts: Vec<AccountConfig> = Vec::new();
        for (i, a) in self.account.into_iter().enumerate() {
            accounts.push(validate_account(&c, i, a)?);
        }
        check_routes(&c, &accounts)?;
        let spool = match self.spool {
            None => None,
            Some(raw) => Some(validate_spool(&c, raw, accounts[0].pool_size)?),
        };
        Ok(Config {
            path: path.to_owned(),
            server,
            accounts,
            spool,
        })
    }
}

fn validate_spool(
    c: &Check<'_>,
    s: RawSpool,
    pool_size: usize,
) -> Result<SpoolConfig, ConfigError> {
    let dir = c.resolve(&s.dir.ok_or_else(|| {
        c.err(
            "spool.dir",
            "is required in [spool]: where queued mail is kept, e.g. \"/var/lib/smtp-oauth-relay/spool\" (remove [spool] for synchronous delivery)",
        )
    })?);
    let secs =
        |v: Option<f64>, key: &str, default: f64, min: f64| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if !v.is_finite() || v < min || v > 10.0 * 365.0 * 86400.0 {
                return Err(c.err(
                    format!("spool.{key}"),
                    format!("{v} is out of range: give seconds, at least {min}"),
                ));
            }
            Ok(Duration::from_secs_f64(v))
        };
    let max_queue_lifetime = secs(
        s.max_queue_lifetime_secs,
        "max_queue_lifetime_secs",
        5.0 * 86400.0,
        1.0,
    )?;
    let min_retry = secs(s.min_retry_secs, "min_retry_secs", 60.0, 0.01)?;
    let max_retry = secs(s.max_retry_secs, "max_retry_secs", 3600.0, 0.01)?;
    if max_retry < min_retry {
        return Err(c.err(
            "spool.max_retry_secs",
            "must not be less than spool.min_retry_secs",
        ));
    }
    let workers = s.workers.unwrap_or(pool_size.max(1));
    if workers == 0 || workers > 256 {
        return Err(c.err("spool.workers", "must be between 1 and 256"));
    }
    Ok(SpoolConfig {
        dir,
        max_queue_lifetime,
        min_retry,
        max_retry,
        workers,
        probe_max: secs(s.probe_max_secs, "probe_max_secs", 60.0, 0.01)?,
        quota_retry: secs(s.quota_retry_secs, "quota_retry_secs", 3600.0, 0.01)?,
    })
}

/// Several accounts: names unique, at most one default, no sender claimed twice.
fn check_routes(c: &Check<'_>, accounts: &[AccountConfig]) -> Result<(), ConfigError> {
    let mut claimed: std::collections::HashMap<String, &str> = Default::default();
    let mut default: Option<&str> = None;
    for (i, a) in accounts.iter().enumerate() {
        if accounts[..i].iter().any(|b| b.name == a.name) {
            return Err(c.err(
                format!("account[{i}].name"),
                format!("{:?} is used by two accounts; names must be unique", a.name),
            ));
        }
        if a.default {
            if let Some(other) = default {
                return Err(c.err(
                    format!("account[{i}].default"),
                    format!(
                        "accounts {other:?} and {:?} are both default; mark one",
                        a.name
                    ),
                ));
            }
            default = Some(&a.name);
        }
        let user = a.username.to_ascii_lowercase();
        let own = std::iter::once(user.clone()).chain(a.senders.iter().cloned());
        for p in own {
            if let Some(other) = claimed.insert(p.clone(), &a.name) {
                if other != a.name {
                    let key = if p == user { "username" } else { "senders" };
                    return Err(c.err(
                        format!("account[{i}].{key}"),
                        format!("{p:?} is claimed by accounts {other:?} and {:?}; a sender must route to one account", a.name),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn validate_account(c: &Check<'_>, i: usize, a: RawAccount) -> Result<AccountConfig, ConfigError> {
    let name = a.name.unwrap_or_else(|| "default".into());
    let key = |k: &str| format!("account[{i}].{k}");
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        return Err(c.err(
            key("name"),
            format!("{name:?}: use letters, digits, '-', '_' or '.'"),
        ));
    }
    let provider = match a.provider.as_deref() {
        None => Provider::Gmail,
        Some(p) => Provider::parse(p).ok_or_else(|| {
            c.err(
                key("provider"),
                format!("unknown provider {p:?}; expected \"gmail\", \"microsoft\" or \"custom\""),
            )
        })?,
    };
    let tenant = match (&a.tenant, provider) {
        (Some(t), Provider::Microsoft) => {
            if t.is_empty()
                || !t
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-.".contains(ch))
            {
                return Err(c.err(
                    key("tenant"),
                    format!("{t:?} is not a tenant: give the directory (tenant) ID from the app registration's Overview page, a verified domain such as \"example.com\", or \"organizations\""),
                ));
            }
            t.clone()
        }
        (Some(_), p) => {
            return Err(c.err(
                key("tenant"),
                format!(
                    "only applies to provider \"microsoft\" (this account's provider is {:?})",
                    p.name()
                ),
            ))
        }
        (None, _) => MICROSOFT_DEFAULT_TENANT.to_owned(),
    };
    let required = |v: Option<String>, k: &str, hint: &str| -> Result<String, ConfigError> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(c.err(key(k), format!("is required: {hint}"))),
        }
    };
    let username = required(
        a.username,
        "username",
        "the mailbox address the relay signs in as (XOAUTH2 user), e.g. \"me@example.com\"",
    )?;
    if !username.contains('@') {
        return Err(c.err(
            key("username"),
            format!("{username:?} is not an email address"),
        ));
    }
    use crate::oauth::CredentialKind;
    let kind = match a.credential.as_deref() {
        None if a.service_account_json.is_some() => CredentialKind::ServiceAccount,
        None | Some("refresh_token") => CredentialKind::RefreshToken,
        Some("service_account") => CredentialKind::ServiceAccount,
        Some("client_credentials") => CredentialKind::ClientCredentials,
        Some(other) => {
            return Err(c.err(
                key("credential"),
                format!("unknown credential {other:?}; expected \"refresh_token\" (authorize once, the default), \"service_account\" (Google Workspace, with service_account_json) or \"client_credentials\" (Microsoft 365 app-only)"),
            ))
        }
    };
    let service_account = match (kind, &a.service_account_json) {
        (CredentialKind::ServiceAccount, None) => {
            return Err(c.err(
                key("service_account_json"),
                "is required for credential = \"service_account\": the JSON key of the service account (IAM & Admin → Service accounts → Keys → Add key → JSON)",
            ))
        }
        (CredentialKind::ServiceAccount, Some(f)) => {
            if provider == Provider::Microsoft {
                return Err(c.err(
                    key("credential"),
                    "\"service_account\" is Google's; for Microsoft 365 without a user sign-in use credential = \"client_credentials\"",
                ));
            }
            for (k, given) in [
                ("client_id", a.client_id.is_some()),
                ("client_secret", a.client_secret.is_some()),
                ("client_secret_file", a.client_secret_file.is_some()),
                ("client_secret_json", a.client_secret_json.is_some()),
            ] {
                if given {
                    return Err(c.err(
                        key(k),
                        "is not used with a service account (its key file identifies it): remove it",
                    ));
                }
            }
            let f = c.secret_path(key("service_account_json"), f)?;
            let sa = ServiceAccountKey::load(&f)
                .map_err(|e| c.err(key("service_account_json"), e.to_string()))?;
            Some((f, sa))
        }
        (_, Some(_)) => {
            return Err(c.err(
                key("service_account_json"),
                format!("only applies to credential = \"service_account\" (this account's is {:?}); remove one of the two", kind.name()),
            ))
        }
        (_, None) => None,
    };
    if kind == CredentialKind::ClientCredentials && provider == Provider::Gmail {
        return Err(c.err(
            key("credential"),
            "Google does not give Gmail access for client credentials: use a Workspace service account (service_account_json = PATH) or the default refresh token (`smtp-oauth-relay authorize`)",
        ));
    }
    if kind == CredentialKind::ClientCredentials
        && provider == Provider::Microsoft
        && ["organizations", "common", "consumers"].contains(&tenant.to_ascii_lowercase().as_str())
    {
        return Err(c.err(
            key("tenant"),
            format!("{tenant:?} cannot be used with client credentials: Microsoft issues app-only tokens only from your own tenant; set tenant to the Directory (tenant) ID from the app registration's Overview page"),
        ));
    }
    let client_json = match &a.client_secret_json {
        None => None,
        Some(f) => {
            let f = c.secret_path(key("client_secret_json"), f)?;
            let json = ClientSecretJson::load(&f)
                .map_err(|e| c.err(key("client_secret_json"), e.to_string()))?;
            Some((f, json))
        }
    };
    let json = client_json.as_ref().map(|(_, j)| j);
    let client_id = match (a.client_id, &service_account) {
        (_, Some((_, key))) => key.client_id.clone(),
        (Some(id), None) if !id.trim().is_empty() => id,
        _ => match json {
            Some(j) => j.client_id.clone(),
            None if provider == Provider::Microsoft => required(
                None,
                "client_id",
                "the Application (client) ID of the app registration (Microsoft Entra admin center → App registrations → Overview)",
            )?,
            None => required(
                None,
                "client_id",
                "the OAuth client ID from the Google Cloud console (…apps.googleusercontent.com), or client_secret_json = PATH to the client file downloaded from the console",
            )?,
        },
    };
    let explicit_secret = match (a.client_secret, a.client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(c.err(
                key("client_secret_file"),
                "give client_secret or client_secret_file, not both",
            ))
        }
        (Some(s), None) => Some(s),
        (None, Some(f)) => {
            let f = c.secret_path(key("client_secret_file"), &f)?;
            let text = std::fs::read_to_string(&f).map_err(|e| {
                c.err(
                    key("client_secret_file"),
                    format!("cannot read {}: {e}", f.display()),
                )
            })?;
            let t = text.trim();
            if t.is_empty() {
                return Err(c.err(
                    key("client_secret_file"),
                    format!("{} is empty", f.display()),
                ));
            }
            Some(SecretString::from(t.to_owned()))
        }
        (None, None) => None,
    };
    let client_secret = explicit_secret.or_else(|| json.and_then(|j| j.client_secret.clone()));
    if client_secret.is_none() && kind == CredentialKind::ClientCredentials {
        return Err(c.err(
            key("client_secret"),
            "is required for credential = \"client_credentials\": the Value of a client secret of the app registration (Certificates & secrets), or client_secret_file = PATH",
        ));
    }
    if client_secret.is_none() && provider == Provider::Gmail && service_account.is_none() {
        let problem = if client_json.is_some() {
            "is required for Gmail and the client_secret_json file has none: copy it from the OAuth client in the Google Cloud console (or use client_secret_file = PATH)"
        } else {
            "is required for Gmail: copy it from the OAuth client in the Google Cloud console (or use client_secret_file = PATH, or client_secret_json = PATH to the downloaded client file)"
        };
        return Err(c.err(key("client_secret"), problem));
    }
    let token_file = c.resolve(&a.token_file.ok_or_else(|| {
        c.err(
            key("token_file"),
            if kind.uses_refresh_token() {
                "is required: where the refresh token is kept, e.g. \"/var/lib/smtp-oauth-relay/gmail.json\""
            } else {
                "is required: where the relay caches the access token and records refreshes (created on first start), e.g. \"/var/lib/smtp-oauth-relay/workspace.json\""
            },
        )
    })?);
    let (default_host, default_url) = match provider {
        Provider::Gmail => (
            Some("smtp.gmail.com".to_owned()),
            Some("https://oauth2.googleapis.com/token".to_owned()),
        ),
        Provider::Microsoft => (
            Some(MICROSOFT_SMTP_HOST.to_owned()),
            Some(microsoft_url(&tenant, "token")),
        ),
        Provider::Custom => (None, None),
    };
    let smtp_host = a
        .smtp_host
        .or(default_host)
        .ok_or_else(|| c.err(key("smtp_host"), "is required for provider \"custom\""))?;
    let smtp_port = a.smtp_port.unwrap_or(587);
    if smtp_port == 0 {
        return Err(c.err(key("smtp_port"), "must not be 0"));
    }
    // Explicit keys, then the client file, then the provider's defaults.
    let token_url_key = if a.token_url.is_some() {
        key("token_url")
    } else {
        key("client_secret_json")
    };
    let token_url = a
        .token_url
        .or_else(|| json.and_then(|j| j.token_uri.clone()))
        .or_else(|| {
            service_account
                .as_ref()
                .and_then(|(_, k)| k.token_uri.clone())
        })
        .or(default_url)
        .ok_or_else(|| c.err(key("token_url"), "is required for provider \"custom\""))?;
    check_token_url(&token_url).map_err(|p| c.err(token_url_key, p))?;
    let auth_url_key = if a.auth_url.is_some() {
        key("auth_url")
    } else {
        key("client_secret_json")
    };
    let auth_url = a
        .auth_url
        .or_else(|| json.and_then(|j| j.auth_uri.clone()))
        .or_else(|| match provider {
            Provider::Gmail => Some(GMAIL_AUTH_URL.to_owned()),
            Provider::Microsoft => Some(microsoft_url(&tenant, "authorize")),
            Provider::Custom => None,
        });
    if let Some(u) = &auth_url {
        check_token_url(u).map_err(|p| c.err(auth_url_key, p))?;
    }
    let device_auth_url = a.device_auth_url.or_else(|| {
        (provider == Provider::Microsoft).then(|| microsoft_url(&tenant, "devicecode"))
    });
    if let Some(u) = &device_auth_url {
        check_token_url(u).map_err(|p| c.err(key("device_auth_url"), p))?;
    }
    let scopes = match a.scopes {
        Some(list) => {
            if list.is_empty() {
                return Err(c.err(
                    key("scopes"),
                    format!("is empty; give at least one scope, e.g. [\"{GMAIL_SCOPE}\"]"),
                ));
            }
            for (j, s) in list.iter().enumerate() {
                if s.trim().is_empty() || s.contains(char::is_whitespace) {
                    return Err(c.err(
                        format!("account[{i}].scopes[{j}]"),
                        format!("{s:?} is not a scope: one scope per list item, no spaces"),
                    ));
                }
            }
            list
        }
        None if kind == CredentialKind::ClientCredentials && provider == Provider::Microsoft => {
            vec![MICROSOFT_APP_SCOPE.to_owned()]
        }
        None if provider == Provider::Gmail => vec![GMAIL_SCOPE.to_owned()],
        None if provider == Provider::Microsoft => {
            MICROSOFT_SCOPES.iter().map(|s| s.to_string()).collect()
        }
        None => Vec::new(),
    };
    if let Some(r) = &a.redirect_uri {
        check_redirect_uri(r).map_err(|p| c.err(key("redirect_uri"), p))?;
    }
    let redirect_uri = a.redirect_uri.or_else(|| match json {
        Some(j) if j.kind == ClientKind::Web => j.redirect_uris.first().cloned(),
        _ => None,
    });
    let client_file = client_json.map(|(path, j)| ClientFileInfo {
        path,
        kind: j.kind,
        redirect_uris: j.redirect_uris,
    });
    let ca_file = a.ca_file.map(|f| c.resolve(&f));
    if let Some(f) = &ca_file {
        if let Err(e) = std::fs::metadata(f) {
            return Err(c.err(key("ca_file"), format!("cannot read {}: {e}", f.display())));
        }
    }
    // Microsoft refuses access tokens close to expiry: a smaller margin is refused
    // rather than silently raised, so the file says what the relay does.
    let refresh_margin = match (a.refresh_margin_secs, provider) {
        (Some(m), Provider::Microsoft) if m < MICROSOFT_MIN_REFRESH_MARGIN.as_secs() => {
            return Err(c.err(
                key("refresh_margin_secs"),
                format!(
                    "{m} is too small for provider \"microsoft\": Microsoft 365 rejects access tokens close to expiry, so refresh at least {} seconds ahead (remove the key for that default)",
                    MICROSOFT_MIN_REFRESH_MARGIN.as_secs()
                ),
            ))
        }
        (Some(m), _) => Duration::from_secs(m),
        (None, Provider::Microsoft) => MICROSOFT_MIN_REFRESH_MARGIN,
        (None, _) => Duration::from_secs(300),
    };
    let pool_size = a.pool_size.unwrap_or(4);
    if pool_size > 64 {
        return Err(c.err(
            key("pool_size"),
            "at most 64; Gmail limits concurrent connections per account (0 = a new connection per message)",
        ));
    }
    let max_messages_per_connection = a.max_messages_per_connection.unwrap_or(100);
    if max_messages_per_connection == 0 {
        return Err(c.err(key("max_messages_per_connection"), "must be at least 1"));
    }
    let mut senders = Vec::new();
    for (j, p) in a.senders.unwrap_or_default().into_iter().enumerate() {
        let p = p.trim().to_ascii_lowercase();
        let valid = match p.split_once('@') {
            Some(("", domain)) => !domain.is_empty() && !domain.contains('@'),
            Some((local, domain)) => {
                !local.is_empty() && !domain.is_empty() && !domain.contains('@')
            }
            None => false,
        };
        if !valid {
            return Err(c.err(
                key(&format!("senders[{j}]")),
                format!("{p:?} is neither an address (\"app@example.com\") nor a domain (\"@example.com\")"),
            ));
        }
        senders.push(p);
    }
    Ok(AccountConfig {
        tls_server_name: a.tls_server_name.unwrap_or_else(|| smtp_host.clone()),
        default: a.default.unwrap_or(false),
        senders,
        name,
        provider,
        credential: match service_account {
            Some((key_file, k)) => Credential::ServiceAccount {
                key_file,
                client_email: k.client_email,
            },
            None if kind == CredentialKind::ClientCredentials => Credential::ClientCredentials,
            None => Credential::RefreshToken,
        },
        username,
        client_id,
        client_secret,
        token_file,
        refresh_margin,
        smtp_host,
        smtp_port,
        token_url,
        ca_file,
        pool_size,
        max_idle: Duration::from_secs(a.max_idle_secs.unwrap_or(240)),
        max_messages_per_connection,
        auth_url,
        device_auth_url,
        scopes,
        redirect_uri,
        client_file,
    })
}

/// Checks a redirect URI: an absolute http(s) URL without a fragment.
pub fn check_redirect_uri(uri: &str) -> Result<(), String> {
    let url = oauth2::url::Url::parse(uri).map_err(|e| format!("{uri:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{uri:?} is not an http(s) URL; give the redirect URI exactly as registered for the client in the console"
        ));
    }
    if url.fragment().is_some() {
        return Err(format!("{uri:?} must not contain a #fragment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = ["127.0.0.1:2525"]
hostname = "relay.example"

[[account]]
name = "gmail"
provider = "gmail"
username = "me@example.com"
client_id = "123.apps.googleusercontent.com"
client_secret = "GOCSPX-secret"
token_file = "/var/lib/smtp-oauth-relay/gmail.json"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/smtp-oauth-relay/config.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn several_accounts_are_checked_for_clashes() {
        let second = GOOD[GOOD.find("[[account]]").unwrap()..]
            .replace("name = \"gmail\"", "name = \"work\"")
            .replace("me@example.com", "ops@example.org");
        let two = format!("{GOOD}\n{second}");
        let c = parse(&two).unwrap();
        assert_eq!(c.accounts.len(), 2);
        assert_eq!(
            c.account(None).unwrap().name,
            "gmail",
            "no default: the first"
        );

        let e = err(&format!(
            "{GOOD}\n{}",
            second.replace("name = \"work\"", "name = \"gmail\"")
        ));
        assert!(e.contains("account[1].name") && e.contains("unique"), "{e}");

        let both = two.replace("token_file =", "default = true\ntoken_file =");
        let e = err(&both);
        assert!(e.contains("account[1].default"), "{e}");

        let claimed = two.replace(
            "username = \"ops@example.org\"",
            "username = \"ops@example.org\"\nsenders = [\"ME@example.com\"]",
        );
        let e = err(&claimed);
        assert!(
            e.contains("account[1].senders") && e.contains("me@example.com"),
            "{e}"
        );

        let bad = two.replace(
            "username = \"ops@example.org\"",
            "username = \"ops@example.org\"\nsenders = [\"example.org\"]",
        );
        let e = err(&bad);
        assert!(
            e.contains("account[1].senders[0]") && e.contains("@example.com"),
            "{e}"
        );

        let with_default = two.replacen("token_file =", "default = true\ntoken_file =", 2);
        let with_default = with_default.replacen("default = true\ntoken_file =", "token_file =", 1);
        let c = parse(&with_default).unwrap();
        assert_eq!(c.account(None).unwrap().name, "work", "the default account");
    }

    #[test]
    fn systemd_credentials_directory_is_expanded() {
        use std::ffi::OsStr;
        let dir = Some(OsStr::new("/run/credentials/smtp-oauth-relay.service"));
        for p in [
            "$CREDENTIALS_DIRECTORY/gmail-secret",
            "${CREDENTIALS_DIRECTORY}/gmail-secret",
        ] {
            assert_eq!(
                expand_credentials(Path::new(p), dir).unwrap(),
                Path::new("/run/credentials/smtp-oauth-relay.service/gmail-secret")
            );
        }
        assert_eq!(
            expand_credentials(Path::new("/etc/x/secret"), None).unwrap(),
            Path::new("/etc/x/secret")
        );
        let e = expand_credentials(Path::new("$CREDENTIALS_DIRECTORY/s"), None).unwrap_err();
        assert!(e.contains("LoadCredential="), "{e}");
    }

    #[test]
    fn shipped_example_uses_only_known_keys() {
        // Its file paths do not exist here, so only the schema is checked.
        let raw: Result<RawConfig, _> =
            toml::from_str(include_str!("../config/config.example.toml"));
        assert!(raw.is_ok(), "{}", raw.unwrap_err());
    }

    #[test]
    fn gmail_defaults() {
        let c = parse(GOOD).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.smtp_host, "smtp.gmail.com");
        assert_eq!(a.smtp_port, 587);
        assert_eq!(a.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(a.pool_size, 4);
        assert_eq!(c.server.max_message_size, GMAIL_MAX_MESSAGE_SIZE);
        assert_eq!(c.server.max_recipients, 100);
    }

    #[test]
    fn default_listen_is_loopback() {
        let c = parse(&GOOD.replace("listen = [\"127.0.0.1:2525\"]", "")).unwrap();
        assert!(c
            .server
            .listen
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 25));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("hostname =", "hostnme = \"x\"\nhostname ="));
        assert!(e.contains("hostnme"), "{e}");
        let e = err(&format!("{GOOD}smtp_hots = \"x\"\n"));
        assert!(e.contains("smtp_hots"), "{e}");
    }

    #[test]
    fn open_relay_is_refused() {
        let e = err(&GOOD.replace("127.0.0.1:2525", "0.0.0.0:25"));
        assert!(
            e.contains("server.listen[0]") && e.contains("open relay"),
            "{e}"
        );
        let ok = GOOD.replace("127.0.0.1:2525", "0.0.0.0:25").replace(
            "hostname = \"relay.example\"",
            "hostname = \"relay.example\"\nallow_non_loopback = true",
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn missing_keys_are_named() {
        let e = err(&GOOD.replace("username = \"me@example.com\"", ""));
        assert!(e.contains("account[0].username"), "{e}");
        let e = err(&GOOD.replace("client_secret = \"GOCSPX-secret\"", ""));
        assert!(e.contains("account[0].client_secret"), "{e}");
        let e = err(&GOOD.replace("provider = \"gmail\"", "provider = \"yahoo\""));
        assert!(
            e.contains("account[0].provider") && e.contains("yahoo"),
            "{e}"
        );
        let e = err("[server]\n");
        assert!(e.contains("`account`"), "{e}");
    }

    #[test]
    fn token_url_must_be_https_unless_loopback() {
        let e = err(&format!("{GOOD}token_url = \"http://example.com/token\"\n"));
        assert!(
            e.contains("account[0].token_url") && e.contains("https"),
            "{e}"
        );
        assert!(parse(&format!(
            "{GOOD}token_url = \"http://127.0.0.1:8080/token\"\n"
        ))
        .is_ok());
        assert!(parse(&format!("{GOOD}token_url = \"http://[::1]:8080/token\"\n")).is_ok());
        assert!(check_token_url("http://localhost/token").is_ok());
        assert!(check_token_url("ftp://x").is_err());
    }

    #[test]
    fn relative_paths_are_relative_to_the_config() {
        let c =
            parse(&GOOD.replace("/var/lib/smtp-oauth-relay/gmail.json", "tokens/g.json")).unwrap();
        assert_eq!(
            c.accounts[0].token_file,
            Path::new("/etc/smtp-oauth-relay/tokens/g.json")
        );
    }

    #[test]
    fn secret_not_in_debug() {
        let c = parse(GOOD).unwrap();
        assert!(!format!("{c:?}").contains("GOCSPX-secret"));
    }

    #[test]
    fn bad_listen_address() {
        let e = err(&GOOD.replace("127.0.0.1:2525", "localhost"));
        assert!(
            e.contains("server.listen[0]") && e.contains("IP:port"),
            "{e}"
        );
    }

    const JSON_SECRET: &str = "GOCSPX-from-json-SECRET";

    fn client_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn installed_json() -> String {
        format!(
            r#"{{"installed":{{"client_id":"json-id.apps.googleusercontent.com","project_id":"p","auth_uri":"https://accounts.google.com/o/oauth2/auth","token_uri":"https://oauth2.googleapis.com/token","client_secret":"{JSON_SECRET}","redirect_uris":["http://localhost"]}}}}"#
        )
    }

    fn with_json(path: &Path, extra: &str) -> String {
        format!(
            "[[account]]\nname = \"g\"\nusername = \"me@example.com\"\ntoken_file = \"t.json\"\nclient_secret_json = {:?}\n{extra}",
            path.display().to_string()
        )
    }

    #[test]
    fn client_secret_json_installed_supplies_client() {
        let d = tempfile::tempdir().unwrap();
        let f = client_file(d.path(), "client.json", &installed_json());
        let c = parse(&with_json(&f, "")).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.client_id, "json-id.apps.googleusercontent.com");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(a.client_secret.as_ref().unwrap()),
            JSON_SECRET
        );
        assert_eq!(a.auth_url.as_deref(), Some(GMAIL_AUTH_URL));
        assert_eq!(a.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(a.scopes, [GMAIL_SCOPE]);
        assert_eq!(a.redirect_uri, None, "installed: loopback listener");
        let info = a.client_file.as_ref().unwrap();
        assert_eq!(info.kind, ClientKind::Installed);
        assert_eq!(info.redirect_uris, ["http://localhost"]);
        assert!(!format!("{c:?}").contains(JSON_SECRET));
    }

    #[test]
    fn explicit_keys_override_client_secret_json() {
        let d = tempfile::tempdir().unwrap();
        let f = client_file(d.path(), "client.json", &installed_json());
        let c = parse(&with_json(
            &f,
            "client_id = \"own-id\"\nclient_secret = \"own-secret\"\ntoken_url = \"http://127.0.0.1:9/token\"\nauth_url = \"http://127.0.0.1:9/auth\"\nscopes = [\"a\", \"b\"]\nredirect_uri = \"https://example.org/cb\"\n",
        ))
        .unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.client_id, "own-id");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(a.client_secret.as_ref().unwrap()),
            "own-secret"
        );
        assert_eq!(a.token_url, "http://127.0.0.1:9/token");
        assert_eq!(a.auth_url.as_deref(), Some("http://127.0.0.1:9/auth"));
        assert_eq!(a.scopes, ["a", "b"]);
        assert_eq!(a.redirect_uri.as_deref(), Some("https://example.org/cb"));
    }

    #[test]
    fn client_secret_json_web_uses_registered_redirect() {
        let d = tempfile::tempdir().unwrap();
        let web = installed_json()
            .replace("\"installed\"", "\"web\"")
            .replace(
                "[\"http://localhost\"]",
                "[\"https://example.org/callback\"]",
            );
        let f = client_file(d.path(), "web.json", &web);
        let c = parse(&with_json(&f, "")).unwrap();
        assert_eq!(
            c.accounts[0].redirect_uri.as_deref(),
            Some("https://example.org/callback")
        );
        assert_eq!(
            c.accounts[0].client_file.as_ref().unwrap().kind,
            ClientKind::Web
        );
        // Relative path, resolved against the config's directory.
        let cfg = d.path().join("config.toml");
        let c = Config::from_toml(&with_json(Path::new("web.json"), ""), &cfg).unwrap();
        assert_eq!(
            c.accounts[0].client_id,
            "json-id.apps.googleusercontent.com"
        );
    }

    #[test]
    fn client_secret_json_errors_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        let f = client_file(
            d.path(),
            "bad.json",
            &format!(r#"{{"something":{{"client_secret":"{JSON_SECRET}"}}}}"#),
        );
        let e = err(&with_json(&f, ""));
        assert!(
            e.contains("account[0].client_secret_json")
                && e.contains("neither an \"installed\" nor a \"web\""),
            "{e}"
        );
        assert!(!e.contains(JSON_SECRET), "{e}");
        let e = err(&with_json(&d.path().join("missing.json"), ""));
        assert!(
            e.contains("account[0].client_secret_json") && e.contains("missing.json"),
            "{e}"
        );
        let f = client_file(
            d.path(),
            "http.json",
            &installed_json().replace(
                "https://oauth2.googleapis.com/token",
                "http://example.com/token",
            ),
        );
        let e = err(&with_json(&f, ""));
        assert!(
            e.contains("account[0].client_secret_json") && e.contains("https"),
            "{e}"
        );
    }

    #[test]
    fn client_id_message_mentions_client_secret_json() {
        let e = err(&GOOD.replace("client_id = \"123.apps.googleusercontent.com\"", ""));
        assert!(
            e.contains("account[0].client_id") && e.contains("client_secret_json"),
            "{e}"
        );
    }

    #[test]
    fn authorize_keys() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.accounts[0].auth_url.as_deref(), Some(GMAIL_AUTH_URL));
        assert_eq!(c.accounts[0].scopes, [GMAIL_SCOPE]);
        let e = err(&format!("{GOOD}scopes = []\n"));
        assert!(
            e.contains("account[0].scopes") && e.contains("empty"),
            "{e}"
        );
        let e = err(&format!("{GOOD}scopes = [\"a b\"]\n"));
        assert!(e.contains("account[0].scopes[0]"), "{e}");
        let e = err(&format!(
            "{GOOD}redirect_uri = \"urn:ietf:wg:oauth:2.0:oob\"\n"
        ));
        assert!(e.contains("account[0].redirect_uri"), "{e}");
        let e = err(&format!("{GOOD}auth_url = \"http://example.com/auth\"\n"));
        assert!(
            e.contains("account[0].auth_url") && e.contains("https"),
            "{e}"
        );
        let custom = GOOD.replace("provider = \"gmail\"", "provider = \"custom\"")
            + "smtp_host = \"smtp.example\"\ntoken_url = \"https://idp.example/token\"\n";
        let c = parse(&custom).unwrap();
        assert_eq!(c.accounts[0].auth_url, None);
        assert!(c.accounts[0].scopes.is_empty());
    }

    #[test]
    fn spool_is_optional_and_validated() {
        assert!(parse(GOOD).unwrap().spool.is_none());
        let c = parse(&format!("{GOOD}\n[spool]\ndir = \"spool\"\n")).unwrap();
        let s = c.spool.unwrap();
        assert_eq!(s.dir, Path::new("/etc/smtp-oauth-relay/spool"));
        assert_eq!(s.max_queue_lifetime, Duration::from_secs(5 * 86400));
        assert_eq!(s.min_retry, Duration::from_secs(60));
        assert_eq!(s.max_retry, Duration::from_secs(3600));
        assert_eq!(s.workers, 4);
        let e = err(&format!("{GOOD}\n[spool]\nmin_retry_secs = 1\n"));
        assert!(e.contains("spool.dir"), "{e}");
        let e = err(&format!("{GOOD}\n[spool]\ndir = \"/x\"\nretry = 1\n"));
        assert!(e.contains("retry"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[spool]\ndir = \"/x\"\nmin_retry_secs = 10\nmax_retry_secs = 1\n"
        ));
        assert!(e.contains("spool.max_retry_secs"), "{e}");
        let e = err(&format!("{GOOD}\n[spool]\ndir = \"/x\"\nworkers = 0\n"));
        assert!(e.contains("spool.workers"), "{e}");
        let c = parse(&format!(
            "{GOOD}\n[spool]\ndir = \"/x\"\nmin_retry_secs = 0.5\n"
        ))
        .unwrap();
        assert_eq!(c.spool.unwrap().min_retry, Duration::from_millis(500));
    }

    const MICROSOFT: &str = r#"
[[account]]
name = "m365"
provider = "microsoft"
username = "me@contoso.com"
client_id = "11111111-2222-3333-4444-555555555555"
token_file = "/var/lib/smtp-oauth-relay/m365.json"
"#;

    #[test]
    fn microsoft_defaults() {
        let c = parse(MICROSOFT).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.provider, Provider::Microsoft);
        assert_eq!(
            (a.smtp_host.as_str(), a.smtp_port),
            ("smtp.office365.com", 587)
        );
        assert_eq!(a.tls_server_name, "smtp.office365.com");
        assert_eq!(
            a.token_url,
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
        );
        assert_eq!(
            a.auth_url.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize")
        );
        assert_eq!(
            a.device_auth_url.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode")
        );
        assert_eq!(
            a.scopes,
            ["https://outlook.office.com/SMTP.Send", "offline_access"]
        );
        assert_eq!(a.refresh_margin, Duration::from_secs(600));
        assert!(a.client_secret.is_none(), "public client: no secret needed");
        assert_eq!(a.provider_hint(), crate::oauth::ProviderHint::Microsoft);

        let c = parse(&format!(
            "{MICROSOFT}tenant = \"aaaabbbb-0000-cccc-1111-dddd2222eeee\"\nclient_secret = \"s\"\nrefresh_margin_secs = 900\n"
        ))
        .unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            a.token_url,
            "https://login.microsoftonline.com/aaaabbbb-0000-cccc-1111-dddd2222eeee/oauth2/v2.0/token"
        );
        assert!(a
            .device_auth_url
            .as_deref()
            .unwrap()
            .contains("aaaabbbb-0000"));
        assert_eq!(a.refresh_margin, Duration::from_secs(900));
        let c = parse(&format!(
            "{MICROSOFT}device_auth_url = \"http://127.0.0.1:9/devicecode\"\ntoken_url = \"http://127.0.0.1:9/token\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.accounts[0].device_auth_url.as_deref(),
            Some("http://127.0.0.1:9/devicecode")
        );
        // Gmail has no device endpoint (Google's device flow refuses the Gmail scope).
        assert_eq!(parse(GOOD).unwrap().accounts[0].device_auth_url, None);
    }

    #[test]
    fn microsoft_validation() {
        let e = err(&format!("{MICROSOFT}refresh_margin_secs = 300\n"));
        assert!(
            e.contains("account[0].refresh_margin_secs") && e.contains("600"),
            "{e}"
        );
        let e = err(&format!("{MICROSOFT}tenant = \"con toso\"\n"));
        assert!(e.contains("account[0].tenant"), "{e}");
        let e = err(&format!("{GOOD}tenant = \"contoso.com\"\n"));
        assert!(
            e.contains("account[0].tenant") && e.contains("microsoft"),
            "{e}"
        );
        let e = err(&MICROSOFT.replace("client_id = \"11111111-2222-3333-4444-555555555555\"", ""));
        assert!(
            e.contains("account[0].client_id") && e.contains("App registrations"),
            "{e}"
        );
        let e = err(&format!(
            "{MICROSOFT}device_auth_url = \"http://example.com/dc\"\n"
        ));
        assert!(e.contains("account[0].device_auth_url"), "{e}");
        let e = err(&MICROSOFT.replace("\"microsoft\"", "\"yahoo\""));
        assert!(e.contains("\"microsoft\""), "{e}");
    }

    fn service_account_file(dir: &Path) -> PathBuf {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let json = serde_json::json!({
            "type": "service_account",
            "private_key_id": "k1",
            "private_key": kp.serialize_pem(),
            "client_email": "relay@p.iam.gserviceaccount.com",
            "client_id": "109876543210",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        client_file(dir, "sa.json", &json.to_string())
    }

    #[test]
    fn service_account_needs_no_client_and_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let f = service_account_file(d.path());
        let sa = format!(
            "[[account]]\nname = \"w\"\nusername = \"me@example.com\"\ntoken_file = \"t.json\"\nservice_account_json = {:?}\n",
            f.display().to_string()
        );
        let c = parse(&sa).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            a.credential,
            Credential::ServiceAccount {
                key_file: f.clone(),
                client_email: "relay@p.iam.gserviceaccount.com".into()
            }
        );
        assert_eq!(a.client_id, "109876543210");
        assert!(a.client_secret.is_none());
        assert_eq!(a.scopes, [GMAIL_SCOPE]);
        assert_eq!(a.token_url, "https://oauth2.googleapis.com/token");
        assert!(!a.token_store().needs_refresh_token());
        assert!(parse(&format!("{sa}credential = \"service_account\"\n")).is_ok());
        // Keys that belong to other credentials are named.
        let e = err(&format!("{sa}client_secret = \"x\"\n"));
        assert!(
            e.contains("account[0].client_secret") && e.contains("not used with a service account"),
            "{e}"
        );
        let e = err(&format!("{sa}credential = \"client_credentials\"\n"));
        assert!(e.contains("account[0].service_account_json"), "{e}");
        let e = err(&format!("{sa}provider = \"microsoft\"\n"));
        assert!(e.contains("client_credentials"), "{e}");
        let e = err(&GOOD.replace("provider = \"gmail\"", "credential = \"service_account\""));
        assert!(
            e.contains("account[0].service_account_json") && e.contains("is required"),
            "{e}"
        );
        let e = err(&GOOD.replace("provider = \"gmail\"", "credential = \"password\""));
        assert!(
            e.contains("account[0].credential") && e.contains("\"password\""),
            "{e}"
        );
        // An OAuth client file given as a service account key, and the reverse.
        let client = client_file(d.path(), "client.json", &installed_json());
        let e = err(&sa.replace(&f.display().to_string(), &client.display().to_string()));
        assert!(e.contains("client_secret_json ="), "{e}");
        let e = err(&with_json(&f, ""));
        assert!(e.contains("service_account_json ="), "{e}");
    }

    #[test]
    fn client_credentials_need_a_secret_and_a_real_tenant() {
        let cc = format!("{MICROSOFT}credential = \"client_credentials\"\n");
        let e = err(&cc);
        assert!(
            e.contains("account[0].tenant") && e.contains("Directory (tenant) ID"),
            "{e}"
        );
        let c = parse(&format!(
            "{cc}tenant = \"contoso.example\"\nclient_secret = \"v\"\n"
        ))
        .unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.credential, Credential::ClientCredentials);
        assert_eq!(a.scopes, [MICROSOFT_APP_SCOPE]);
        assert!(
            a.token_url.contains("/contoso.example/oauth2/v2.0/token"),
            "{}",
            a.token_url
        );
        assert!(a.authorize_refusal().is_some());
        let e = err(&format!("{cc}tenant = \"contoso.example\"\n"));
        assert!(
            e.contains("account[0].client_secret") && e.contains("Certificates & secrets"),
            "{e}"
        );
        let e = err(&format!("{GOOD}credential = \"client_credentials\"\n"));
        assert!(
            e.contains("account[0].credential") && e.contains("service account"),
            "{e}"
        );
    }

    #[test]
    fn account_lookup() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.account(Some("gmail")).unwrap().name, "gmail");
        let e = c.account(Some("work")).unwrap_err().to_string();
        assert!(e.contains("work") && e.contains("gmail"), "{e}");
    }
}
