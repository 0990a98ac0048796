//! `smtp-oauth-relay authorize`: gets the first refresh token onto a machine, with or
//! without a browser on it. Runs the OAuth 2.0 authorization-code flow with PKCE (S256):
//! prints the provider's sign-in URL, then takes the authorization code from a loopback
//! listener (`http://127.0.0.1:PORT/`, where the browser is redirected) or from a line
//! pasted on stdin (the full redirected URL, or just the code), whichever comes first;
//! checks `state`, exchanges the code, and writes the token file through [`TokenStore`]
//! (atomic, 0600). A registered `redirect_uri` ("Web application" client) means no
//! listener: the redirected URL is pasted.
//!
//! The pieces are public so that tests can drive them: [`Flow::start`] gives the URL and
//! an optional [`RedirectListener`], [`Flow::read_pasted`] reads pasted input, and
//! [`Flow::exchange`] trades the code for tokens. [`run_with`] is the whole command over
//! any input/output; [`run`] is it on stdin/stdout. Nothing here prints or logs a
//! secret: the client secret, codes and tokens never leave their `SecretString`s except
//! into the request that needs them and the token file.

use std::{
    fmt,
    io::{BufRead, Write},
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use oauth2::{
    basic::{BasicClient, BasicErrorResponseType},
    url::{form_urlencoded, Url},
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    HttpClientError, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    client_json::ClientKind,
    refresh::{one_line, DEFAULT_EXPIRES_IN},
    store::{StoreError, TokenFile, TokenStore},
};
use crate::config::{AccountConfig, Config, ConfigError, Provider};

/// How long `authorize` waits for the redirect or a pasted URL.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Scopes a provider may grant without listing them in the token response's `scope`.
pub(crate) const NOT_ECHOED_SCOPES: [&str; 4] = ["offline_access", "openid", "profile", "email"];

/// How long one request to the token endpoint may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of pasted junk tolerated before giving up.
const MAX_PASTE_ATTEMPTS: u32 = 5;

/// Why `authorize` failed. `Display` names the fix and never shows a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("account {account:?}: `{key}` {problem}")]
    NotConfigured {
        account: String,
        key: &'static str,
        problem: String,
    },
    #[error("cannot listen on {addr} for the browser's redirect: {source}; choose another port with --port N (0 = any free port)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no authorization arrived within {}; run `authorize` again (when the browser is on another machine, paste the URL it was redirected to)", minutes(*.after))]
    Timeout { after: Duration },
    #[error("the input ended before an authorization code was pasted; run `authorize` in a terminal and paste the URL the browser was redirected to (or use the browser on this machine)")]
    NoInput,
    #[error("giving up after {0} pasted lines without an authorization code; run `authorize` again and paste the full URL from the browser's address bar after clicking Allow")]
    TooManyAttempts(u32),
    #[error("the redirect does not belong to this authorization request ({0}): it comes from an earlier attempt, another tab, or was forged; nothing was saved. Run `authorize` again and use only the URL it prints")]
    StateMismatch(&'static str),
    #[error("the redirect carried neither a code nor an error; paste the full URL from the browser's address bar after clicking Allow")]
    NoCode,
    /// The provider answered the sign-in with `error=…` (e.g. `access_denied`).
    #[error("{0}")]
    Denied(String),
    /// The token endpoint refused the code or could not be reached.
    #[error("{0}")]
    Exchange(String),
    #[error("{0}")]
    NoRefreshToken(String),
    #[error("access was granted without the scope {missing}: on the consent screen, tick the box for every permission asked (Gmail's SMTP needs \"Read, compose, send and permanently delete all your email from Gmail\"); nothing was saved, run `authorize` again")]
    ScopeNotGranted { missing: String },
    #[error("cannot write the token file in {dir}: {source}; run `authorize` as the user the relay runs as (e.g. `sudo -u smtp-oauth-relay smtp-oauth-relay authorize …`), or fix the directory's owner and permissions")]
    TokenDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot set up the HTTP client: {0}")]
    HttpClient(String),
    #[error("terminal input/output failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The HTTP client for the token (and device authorization) endpoint.
pub(crate) fn http_client() -> Result<reqwest::Client, AuthorizeError> {
    reqwest::Client::builder()
        // oauth2 5: following redirects would expose the credentials to SSRF.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(EXCHANGE_TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| AuthorizeError::HttpClient(one_line(&e.to_string(), 200)))
}

/// "10 minutes", "1 minute", "30 seconds", "300 ms".
pub(crate) fn minutes(d: Duration) -> String {
    match d.as_secs() {
        0 => format!("{} ms", d.as_millis()),
        s if s < 60 => format!("{s} seconds"),
        s if s.div_ceil(60) == 1 => "1 minute".to_owned(),
        s => format!("{} minutes", s.div_ceil(60)),
    }
}

/// How `run`/`run_with` shows the sign-in URL to the user besides printing it.
#[derive(Clone, Default)]
pub enum Browser {
    /// `open` on macOS; `xdg-open` where `DISPLAY` or `WAYLAND_DISPLAY` is set.
    #[default]
    System,
    /// Only print the URL.
    Never,
    /// Calls the function with the URL (tests play the browser this way).
    Custom(Arc<dyn Fn(&str) + Send + Sync>),
}

impl fmt::Debug for Browser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Browser::System => "System",
            Browser::Never => "Never",
            Browser::Custom(_) => "Custom",
        })
    }
}

impl Browser {
    /// Tries to show `url`; never fails, says whether a browser was started.
    fn open(&self, url: &str) -> bool {
        match self {
            Browser::Never => false,
            Browser::Custom(f) => {
                f(url);
                true
            }
            Browser::System => open_system_browser(url),
        }
    }
}

fn open_system_browser(url: &str) -> bool {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else {
        let has_display = ["DISPLAY", "WAYLAND_DISPLAY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if !has_display {
            return false;
        }
        "xdg-open"
    };
    match std::process::Command::new(program)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            // Reap it without blocking the flow.
            std::thread::spawn(move || child.wait().is_ok_and(|s| s.success()));
            true
        }
        Err(_) => false,
    }
}

/// Options of `smtp-oauth-relay authorize`.
#[derive(Debug, Clone)]
pub struct AuthorizeOptions {
    /// Do not try to open a browser; the user opens the URL anywhere and pastes back.
    pub no_browser: bool,
    /// Loopback port for the redirect; 0 = any free port.
    pub port: u16,
    /// How long to wait for the redirect or a pasted URL.
    pub timeout: Duration,
    pub browser: Browser,
}

impl Default for AuthorizeOptions {
    fn default() -> Self {
        AuthorizeOptions {
            no_browser: false,
            port: 0,
            timeout: DEFAULT_TIMEOUT,
            browser: Browser::System,
        }
    }
}

impl AuthorizeOptions {
    /// The options as the CLI gives them (`--no-browser`, `--port N`).
    pub fn new(no_browser: bool, port: Option<u16>) -> Self {
        AuthorizeOptions {
            no_browser,
            port: port.unwrap_or(0),
            ..AuthorizeOptions::default()
        }
    }
}

/// Everything the flow needs from an account. `Debug` never shows the secret.
#[derive(Clone)]
pub struct AuthRequest {
    pub account: String,
    pub username: Option<String>,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub auth_url: String,
    pub token_url: String,
    pub scopes: Vec<String>,
    /// A registered redirect URI; `None`: a loopback listener on `http://127.0.0.1:PORT/`.
    pub redirect_uri: Option<String>,
    /// Whose sign-in this is: Gmail gets `access_type=offline` + `prompt=consent` (so that
    /// a refresh token always comes back), Gmail and Microsoft get `login_hint`; the
    /// error messages speak of the provider's console.
    pub provider: Provider,
}

impl fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("account", &self.account)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("scopes", &self.scopes)
            .field("redirect_uri", &self.redirect_uri)
            .field("provider", &self.provider)
            .finish()
    }
}

impl AuthRequest {
    pub fn from_account(a: &AccountConfig) -> Result<Self, AuthorizeError> {
        let not_configured = |key, problem: &str| AuthorizeError::NotConfigured {
            account: a.name.clone(),
            key,
            problem: problem.to_owned(),
        };
        let auth_url = a.auth_url.clone().ok_or_else(|| {
            not_configured(
                "auth_url",
                "is required to authorize with provider \"custom\": set it to the provider's authorization endpoint",
            )
        })?;
        if let Some(file) = &a.client_file {
            if file.kind == ClientKind::Web && a.redirect_uri.is_none() {
                return Err(not_configured(
                    "redirect_uri",
                    &format!(
                        "is needed: {} holds a \"web\" client with no registered redirect URI. Add one under \"Authorized redirect URIs\" in the console and download the file again (or set redirect_uri), or use a \"Desktop app\" client, which needs none",
                        file.path.display()
                    ),
                ));
            }
        }
        Ok(AuthRequest {
            account: a.name.clone(),
            username: Some(a.username.clone()),
            client_id: a.client_id.clone(),
            client_secret: a.client_secret.clone(),
            auth_url,
            token_url: a.token_url.clone(),
            scopes: a.scopes.clone(),
            redirect_uri: a.redirect_uri.clone(),
            provider: a.provider,
        })
    }

    /// Google's `access_type=offline` + `prompt=consent`, so that a refresh token always
    /// comes back. Microsoft gives one for the `offline_access` scope instead, and
    /// `access_type` is not one of its parameters.
    fn google_offline(&self) -> bool {
        self.provider == Provider::Gmail
    }
}

/// An authorization code. `Debug` never shows it.
pub struct AuthCode(SecretString);

impl AuthCode {
    pub fn new(code: String) -> Self {
        AuthCode(SecretString::from(code))
    }
}

impl fmt::Debug for AuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthCode([redacted])")
    }
}

/// What the token endpoint gave for a code. `Debug` never shows a token.
pub struct NewTokens {
    pub refresh_token: SecretString,
    pub access_token: SecretString,
    pub expires_in: Duration,
    pub scopes: Option<Vec<String>>,
}

impl fmt::Debug for NewTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewTokens")
            .field("refresh_token", &"[redacted]")
            .field("access_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("scopes", &self.scopes)
            .finish()
    }
}

type CodeClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// One authorization attempt: its URL, `state` and PKCE verifier.
pub struct Flow {
    req: AuthRequest,
    client: CodeClient,
    http: reqwest::Client,
    auth_url: String,
    redirect_uri: String,
    state: String,
    verifier: PkceCodeVerifier,
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("req", &self.req)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

impl Flow {
    /// Builds the sign-in URL. Without a registered redirect URI, binds the loopback
    /// listener on `127.0.0.1:port` (0 = any) and returns it.
    pub async fn start(
        req: &AuthRequest,
        port: u16,
    ) -> Result<(Flow, Option<RedirectListener>), AuthorizeError> {
        let (redirect_uri, listener) = match &req.redirect_uri {
            Some(uri) => (uri.clone(), None),
            None => {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| AuthorizeError::Listen { addr, source })?;
                let port = listener
                    .local_addr()
                    .map_err(|source| AuthorizeError::Listen { addr, source })?
                    .port();
                (
                    format!("http://127.0.0.1:{port}/"),
                    Some(RedirectListener { listener }),
                )
            }
        };
        let bad_url = |key: &'static str, e: String| AuthorizeError::NotConfigured {
            account: req.account.clone(),
            key,
            problem: format!("is not a valid URL ({e})"),
        };
        let mut client = BasicClient::new(ClientId::new(req.client_id.clone()))
            .set_auth_uri(
                AuthUrl::new(req.auth_url.clone())
                    .map_err(|e| bad_url("auth_url", e.to_string()))?,
            )
            .set_token_uri(
                TokenUrl::new(req.token_url.clone())
                    .map_err(|e| bad_url("token_url", e.to_string()))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(redirect_uri.clone())
                    .map_err(|e| bad_url("redirect_uri", e.to_string()))?,
            );
        if let Some(secret) = &req.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        let http = http_client()?;

        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(CsrfToken::new_random)
            .set_pkce_challenge(challenge);
        for scope in &req.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        if req.google_offline() {
            request = request
                .add_extra_param("access_type", "offline")
                .add_extra_param("prompt", "consent");
        }
        // Both providers take `login_hint` to preselect the account to sign in as.
        if matches!(req.provider, Provider::Gmail | Provider::Microsoft) {
            if let Some(user) = &req.username {
                request = request.add_extra_param("login_hint", user.clone());
            }
        }
        let (url, state) = request.url();
        Ok((
            Flow {
                req: req.clone(),
                client,
                http,
                auth_url: url.to_string(),
                redirect_uri,
                state: state.secret().clone(),
                verifier,
            },
            listener,
        ))
    }

    /// The URL the user opens to sign in (no secret in it).
    pub fn auth_url(&self) -> &str {
        &self.auth_url
    }

    /// Where the provider sends the browser after sign-in.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Checks a redirect's query parameters: `error`, then `state`, then `code`.
    pub fn check_redirect(&self, params: &[(String, String)]) -> Result<AuthCode, AuthorizeError> {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(error) = get("error") {
            return Err(self.denied(error, get("error_description")));
        }
        match get("state") {
            None => return Err(AuthorizeError::StateMismatch("it has no state parameter")),
            Some(s) if !constant_time_eq(s.as_bytes(), self.state.as_bytes()) => {
                return Err(AuthorizeError::StateMismatch("its state parameter differs"))
            }
            Some(_) => {}
        }
        match get("code") {
            Some(code) if !code.is_empty() => Ok(AuthCode::new(code.to_owned())),
            _ => Err(AuthorizeError::NoCode),
        }
    }

    fn denied(&self, error: &str, description: Option<&str>) -> AuthorizeError {
        let error = one_line(error, 60);
        let said = match description.map(provider_description) {
            Some(d) if !d.is_empty() => format!("{error}: {d}"),
            _ => error.clone(),
        };
        let user = self.req.username.as_deref().unwrap_or("the account");
        let fix = match error.as_str() {
            "access_denied" if !self.req.google_offline() => "access was not granted. Run `authorize` again and accept the permissions asked for; if the sign-in page said an administrator must approve the app, ask them to grant consent for it (for Microsoft 365: Entra admin center → App registrations → the app → API permissions → Grant admin consent)".to_owned(),
            "access_denied" => format!(
                "access was not granted. Run `authorize` again and click Allow (with every box ticked). If the sign-in page said the app is blocked or unverified: an External app in Testing admits only its test users (Google Cloud console → OAuth consent screen → Test users → add {user}); a Google Workspace admin may have to trust the client (Admin console → Security → API controls → Manage third-party app access → client ID {})",
                self.req.client_id
            ),
            "admin_policy_enforced" => format!(
                "the Google Workspace admin's policy blocks this app: an admin must trust client ID {} (Admin console → Security → API controls → Manage third-party app access)",
                self.req.client_id
            ),
            "invalid_scope" => format!(
                "the provider does not accept the scopes {:?}: fix `scopes` for account {:?} ({})",
                self.req.scopes,
                self.req.account,
                match self.req.provider {
                    Provider::Microsoft => "Microsoft 365's SMTP needs \"https://outlook.office.com/SMTP.Send\" and \"offline_access\"; remove `scopes` to use them",
                    _ => "Gmail needs \"https://mail.google.com/\"",
                }
            ),
            "unauthorized_client" => "this client may not use the authorization-code flow: use an OAuth client of type \"Desktop app\" (or \"Web application\" with redirect_uri)".to_owned(),
            "redirect_uri_mismatch" => redirect_mismatch_fix(&self.req, &self.redirect_uri),
            _ => "run `authorize` again; if it keeps failing, check the account's client settings".to_owned(),
        };
        AuthorizeError::Denied(format!(
            "the provider refused the authorization ({said}): {fix}; nothing was saved"
        ))
    }

    /// Reads pasted lines until one holds a redirected URL (checked like a redirect) or a
    /// bare code; hints at what is wrong with anything else.
    pub async fn read_pasted<R, W>(
        &self,
        input: &mut R,
        out: &mut W,
    ) -> Result<AuthCode, AuthorizeError>
    where
        R: AsyncBufRead + Unpin,
        W: Write,
    {
        let mut attempts = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut *input)
                .take(64 * 1024)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Err(AuthorizeError::NoInput);
            }
            match parse_pasted(&String::from_utf8_lossy(&line)) {
                Pasted::Empty => continue,
                Pasted::Params(params) => return self.check_redirect(&params),
                Pasted::Code(code) => return Ok(code),
                Pasted::Junk(hint) => {
                    attempts += 1;
                    if attempts >= MAX_PASTE_ATTEMPTS {
                        return Err(AuthorizeError::TooManyAttempts(attempts));
                    }
                    writeln!(
                        out,
                        "{hint}\nPaste the full URL (or just the code) and press Enter:"
                    )?;
                    out.flush()?;
                }
            }
        }
    }

    /// Trades the code for tokens (with the PKCE verifier). Insists on a refresh token
    /// and on every requested scope being granted (when the reply lists them).
    pub async fn exchange(self, code: AuthCode) -> Result<NewTokens, AuthorizeError> {
        let Flow {
            req,
            client,
            http,
            redirect_uri,
            verifier,
            ..
        } = self;
        let result = client
            .exchange_code(AuthorizationCode::new(code.0.expose_secret().to_owned()))
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await;
        let reply = result.map_err(|e| exchange_error(e, &req, &redirect_uri))?;
        let scopes = reply
            .scopes()
            .map(|s| s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        if let Some(granted) = &scopes {
            let missing: Vec<&str> = req
                .scopes
                .iter()
                // Microsoft does not list `offline_access` among the granted scopes; a
                // refresh token coming back is what shows it was granted.
                .filter(|s| !granted.contains(s) && !NOT_ECHOED_SCOPES.contains(&s.as_str()))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(AuthorizeError::ScopeNotGranted {
                    missing: missing.join(" "),
                });
            }
        }
        let Some(refresh_token) = reply.refresh_token() else {
            return Err(AuthorizeError::NoRefreshToken(no_refresh_token_message(
                &req,
            )));
        };
        Ok(NewTokens {
            refresh_token: SecretString::from(refresh_token.secret().to_owned()),
            access_token: SecretString::from(reply.access_token().secret().to_owned()),
            expires_in: reply.expires_in().unwrap_or(DEFAULT_EXPIRES_IN),
            scopes,
        })
    }
}

fn redirect_mismatch_fix(req: &AuthRequest, redirect_uri: &str) -> String {
    if req.provider == Provider::Microsoft {
        let platform = if req.redirect_uri.is_none() {
            " under the platform \"Mobile and desktop applications\" (for http://127.0.0.1 any port matches)"
        } else {
            ""
        };
        return format!(
            "the app registration does not allow the redirect URI {redirect_uri}. Add it in the Microsoft Entra admin center → App registrations → the app (client ID {}) → Authentication{platform}, or set the account's redirect_uri to one that is registered",
            req.client_id
        );
    }
    format!(
        "the client does not allow the redirect URI {redirect_uri}. Use an OAuth client of type \"Desktop app\" (any loopback port is allowed), or add this exact URI to the client's \"Authorized redirect URIs\" in the console, or set the account's redirect_uri to one that is registered"
    )
}

/// A provider's `error_description` on one line, without Microsoft's trailer (`Trace ID:
/// …`, `Correlation ID: …`, `Timestamp: …` after the AADSTS text).
fn provider_description(d: &str) -> String {
    let first = d.split("Trace ID:").next().unwrap_or(d);
    one_line(first, 240)
}

fn no_refresh_token_message(req: &AuthRequest) -> String {
    let why = if req.provider == Provider::Microsoft {
        let asked = req.scopes.join(" ");
        format!(
            "Microsoft returns a refresh token only when the scope \"offline_access\" is requested, and this run asked for {asked:?}: add \"offline_access\" to `scopes` of account {:?} (or remove `scopes` to use the default, \"https://outlook.office.com/SMTP.Send offline_access\") and run `authorize` again",
            req.account
        )
    } else if req.google_offline() {
        format!(
            "this run asked for access_type=offline and prompt=consent, so the client is probably of the wrong type: use an OAuth client ID of type \"Desktop app\" (or \"Web application\"), not a \"TV and limited input\" client or a service account (client_id {}). If the consent screen was skipped, remove the app's access at https://myaccount.google.com/permissions and run `authorize` again",
            req.client_id
        )
    } else {
        "the consent was not asked with offline access: outside Google, a refresh token comes only for the provider's offline scope, so make sure `scopes` includes it (Microsoft and most others: \"offline_access\") and run `authorize` again".to_owned()
    };
    format!(
        "the provider granted access but returned no refresh token, so the relay could not renew it and nothing was saved: {why}"
    )
}

fn exchange_error(
    e: RequestTokenError<HttpClientError<reqwest::Error>, oauth2::basic::BasicErrorResponse>,
    req: &AuthRequest,
    redirect_uri: &str,
) -> AuthorizeError {
    let msg = match e {
        RequestTokenError::ServerResponse(reply) => {
            let description = reply
                .error_description()
                .map(|d| provider_description(d))
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "(no description)".into());
            match reply.error() {
                BasicErrorResponseType::InvalidGrant => format!(
                    "the token endpoint refused the authorization code (invalid_grant: {description}). Codes are single-use, expire after a few minutes and only work with the redirect URI and PKCE verifier of the same attempt: run `authorize` again and paste the new URL promptly, not one from an earlier run"
                ),
                BasicErrorResponseType::InvalidClient if req.provider == Provider::Microsoft => format!(
                    "the token endpoint does not accept the client credentials (invalid_client: {description}): check client_id (the Application (client) ID) and client_secret of account {:?}; client_secret must be a secret's Value, not its Secret ID, and secrets expire (Microsoft Entra admin center → App registrations → the app → Certificates & secrets)",
                    req.account
                ),
                BasicErrorResponseType::InvalidClient => format!(
                    "the token endpoint does not accept the client credentials (invalid_client: {description}): check client_id and client_secret (or client_secret_json) of account {:?}; the secret may have been reset in the console, download the client file again",
                    req.account
                ),
                BasicErrorResponseType::UnauthorizedClient => format!(
                    "this client may not use the authorization-code flow (unauthorized_client: {description}): use an OAuth client of type \"Desktop app\""
                ),
                BasicErrorResponseType::Extension(ext) if ext == "redirect_uri_mismatch" => format!(
                    "the token endpoint refused the code (redirect_uri_mismatch: {description}): {}",
                    redirect_mismatch_fix(req, redirect_uri)
                ),
                other => format!(
                    "the token endpoint refused the authorization code ({}: {description}); run `authorize` again",
                    one_line(other.as_ref(), 60)
                ),
            }
        }
        RequestTokenError::Request(e) => {
            let detail = match &e {
                HttpClientError::Reqwest(re) => error_chain(&**re),
                other => one_line(&other.to_string(), 200),
            };
            format!(
                "cannot reach the token endpoint {}: {detail}; check the network (and token_url), then run `authorize` again",
                req.token_url
            )
        }
        // Never show the body: it may hold a token.
        RequestTokenError::Parse(_, _) => format!(
            "the token endpoint {} did not answer with a token response; check token_url",
            req.token_url
        ),
        RequestTokenError::Other(s) => format!(
            "unexpected reply from the token endpoint {}: {}",
            req.token_url,
            one_line(&s, 200)
        ),
    };
    AuthorizeError::Exchange(msg)
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    one_line(&s, 300)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a pasted line turned out to be.
enum Pasted {
    Empty,
    /// Query parameters of a redirected URL (holding `code` or `error`).
    Params(Vec<(String, String)>),
    /// A bare code.
    Code(AuthCode),
    /// Nothing usable; the hint says why.
    Junk(&'static str),
}

const HINT_NO_CODE: &str = "That URL has no code= parameter. After you click Allow, the browser goes to an address starting with the redirect URI (the page may fail to load; that is expected): copy that whole address.";
const HINT_SIGN_IN_URL: &str = "That is the sign-in URL itself: open it in a browser, sign in, click Allow, then copy the address the browser ends up on.";
const HINT_NOT_URL: &str = "That is not a URL or an authorization code.";

fn parse_pasted(text: &str) -> Pasted {
    let t = text
        .trim()
        .trim_matches(|c| matches!(c, '"' | '\'' | '<' | '>'))
        .trim();
    if t.is_empty() {
        return Pasted::Empty;
    }
    let has = |params: &[(String, String)], k: &str| params.iter().any(|(n, _)| n == k);
    let params: Vec<(String, String)> = if t.contains("://") {
        match Url::parse(t) {
            Ok(url) => url.query_pairs().into_owned().collect(),
            Err(_) => return Pasted::Junk(HINT_NOT_URL),
        }
    } else if t.contains("code=") || t.contains("error=") {
        let query = t.split_once('?').map_or(t, |(_, q)| q);
        let query = query.split('#').next().unwrap_or(query);
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    } else if t.len() >= 10
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/%+*".contains(&b))
    {
        return match percent_decode(t) {
            Some(code) => Pasted::Code(AuthCode::new(code)),
            None => Pasted::Junk(HINT_NOT_URL),
        };
    } else {
        return Pasted::Junk(HINT_NOT_URL);
    };
    if has(&params, "code") || has(&params, "error") {
        Pasted::Params(params)
    } else if has(&params, "client_id") && has(&params, "response_type") {
        Pasted::Junk(HINT_SIGN_IN_URL)
    } else {
        Pasted::Junk(HINT_NO_CODE)
    }
}

/// `%XX` decoding (not `+` → space: codes are not form-encoded); `None` if not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The loopback listener the browser is redirected to.
pub struct RedirectListener {
    listener: TcpListener,
}

impl fmt::Debug for RedirectListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedirectListener")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

/// The browser's connection, kept open to show it the outcome.
pub struct BrowserTab(TcpStream);

impl fmt::Debug for BrowserTab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrowserTab")
    }
}

impl RedirectListener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits for the redirect (a `GET /?code=…&state=…` or `?error=…`); other requests
    /// (favicon, probes) get a 404 and waiting goes on. A redirect failing the checks is
    /// answered with an error page and ends the wait with that error.
    pub async fn receive(&mut self, flow: &Flow) -> Result<(AuthCode, BrowserTab), AuthorizeError> {
        let (tx, mut rx) = mpsc::channel::<(Vec<(String, String)>, TcpStream)>(4);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(read_redirect(stream, tx.clone()));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "authorize: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some((params, stream)) = rx.recv() => {
                    let tab = BrowserTab(stream);
                    return match flow.check_redirect(&params) {
                        Ok(code) => Ok((code, tab)),
                        Err(e) => {
                            tab.answer(Err(&e.to_string())).await;
                            Err(e)
                        }
                    };
                }
            }
        }
    }
}

/// Reads one HTTP request head; hands a redirect on, answers anything else itself.
async fn read_redirect(
    mut stream: TcpStream,
    tx: mpsc::Sender<(Vec<(String, String)>, TcpStream)>,
) {
    let head = match tokio::time::timeout(Duration::from_secs(30), read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return,
    };
    let mut parts = head.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let is_redirect =
        method == "GET" && path == "/" && params.iter().any(|(k, _)| k == "code" || k == "error");
    if !is_redirect {
        write_page(
            &mut stream,
            "404 Not Found",
            "Not found",
            "This is smtp-oauth-relay's authorization listener: it only waits for the sign-in redirect.",
        )
        .await;
        return;
    }
    if let Err(mpsc::error::SendError((_, mut stream))) = tx.send((params, stream)).await {
        write_page(
            &mut stream,
            "409 Conflict",
            "Already handled",
            "This authorization attempt is already over; see the terminal.",
        )
        .await;
    }
}

/// The request line of an HTTP request, once its head has fully arrived.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 16 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let first = buf.split(|b| *b == b'\n').next()?;
    Some(String::from_utf8_lossy(first).trim_end().to_owned())
}

impl BrowserTab {
    /// Shows the outcome in the browser tab and closes the connection.
    pub async fn answer(mut self, outcome: Result<&str, &str>) {
        match outcome {
            Ok(msg) => {
                write_page(
                    &mut self.0,
                    "200 OK",
                    "smtp-oauth-relay is authorized",
                    &format!("{msg} You can close this tab."),
                )
                .await
            }
            Err(msg) => {
                write_page(
                    &mut self.0,
                    "400 Bad Request",
                    "Authorization failed",
                    &format!("{msg} (See the terminal too.) You can close this tab."),
                )
                .await
            }
        }
    }
}

async fn write_page(stream: &mut TcpStream, status: &str, title: &str, text: &str) {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\
         <h1>{t}</h1><p>{x}</p></body></html>\n",
        t = html_escape(title),
        x = html_escape(text)
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Waits for the code from the listener (if any) and from pasted input, whichever comes
/// first; input that ends does not stop the listener.
async fn wait_for_code<R, W>(
    flow: &Flow,
    listener: Option<&mut RedirectListener>,
    input: &mut R,
    out: &mut W,
) -> Result<(AuthCode, Option<BrowserTab>), AuthorizeError>
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    let Some(listener) = listener else {
        return flow.read_pasted(input, out).await.map(|c| (c, None));
    };
    let first = {
        let received = listener.receive(flow);
        let pasted = flow.read_pasted(input, out);
        tokio::pin!(received, pasted);
        tokio::select! {
            r = &mut received => return r.map(|(c, tab)| (c, Some(tab))),
            r = &mut pasted => r,
        }
    };
    match first {
        Err(AuthorizeError::NoInput) => {
            writeln!(
                out,
                "(The input is closed: waiting for the browser's redirect only.)"
            )?;
            out.flush()?;
            listener.receive(flow).await.map(|(c, tab)| (c, Some(tab)))
        }
        other => other.map(|c| (c, None)),
    }
}

/// What `authorize` did.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub account: String,
    pub token_file: PathBuf,
    /// When the new access token expires, unix seconds.
    pub expires_at: u64,
    /// The token file's directory did not exist and was created (mode 0700).
    pub created_dir: bool,
}

/// The token file's directory, created (0700) if missing, and checked to be writable
/// before anyone signs in.
pub(crate) fn prepare_token_dir(token_file: &Path) -> Result<(PathBuf, bool), AuthorizeError> {
    let dir = match token_file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir_err = |source| AuthorizeError::TokenDir {
        dir: dir.clone(),
        source,
    };
    let created = !dir.exists();
    if created {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(dir_err)?;
    }
    tempfile::Builder::new()
        .prefix(".authorize-check")
        .tempfile_in(&dir)
        .map_err(dir_err)?;
    Ok((dir, created))
}

/// Writes `tokens` as the account's token file (keeping keys of an existing file this
/// version does not know) and returns the access token's expiry.
pub fn save_tokens(store: &TokenStore, tokens: &NewTokens) -> Result<u64, StoreError> {
    let now = super::manager::unix_now();
    let mut file = TokenFile::new(tokens.refresh_token.clone());
    if let Ok(old) = store.load() {
        file.extra = old.extra;
    }
    let expires_at = now + tokens.expires_in.as_secs();
    file.access_token = Some(tokens.access_token.clone());
    file.expires_at = Some(expires_at);
    file.refresh_token_issued_at = Some(now);
    file.last_refresh_at = Some(now);
    file.last_error = None;
    store.save(&file)?;
    Ok(expires_at)
}

/// `smtp-oauth-relay authorize` on stdin/stdout.
pub async fn run(
    config: &Config,
    account: Option<&str>,
    opts: AuthorizeOptions,
) -> Result<(), AuthorizeError> {
    let mut input = tokio::io::BufReader::new(stdin_pipe());
    let mut out = std::io::stdout();
    run_with(config, account, opts, &mut input, &mut out)
        .await
        .map(|_| ())
}

/// Stdin as an async reader. A plain thread reads it: tokio's own stdin would keep the
/// runtime from shutting down until Enter is pressed, once the browser won the race.
fn stdin_pipe() -> tokio::io::DuplexStream {
    let (reader, mut writer) = tokio::io::duplex(64 * 1024);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if writer.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    reader
}

/// The whole command over any input (pasted lines) and output (instructions).
pub async fn run_with<R, W>(
    config: &Config,
    account: Option<&str>,
    opts: AuthorizeOptions,
    input: &mut R,
    out: &mut W,
) -> Result<Authorized, AuthorizeError>
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    let acct = config.account(account)?;
    let req = AuthRequest::from_account(acct)?;
    let store = TokenStore::new(acct.token_file.clone());
    let (dir, created_dir) = prepare_token_dir(store.path())?;

    let (flow, mut listener) = Flow::start(&req, opts.port).await?;
    writeln!(
        out,
        "Authorizing account {:?} ({}) with OAuth client {}.\n",
        acct.name, acct.username, req.client_id
    )?;
    if req.redirect_uri.is_some() && opts.port != 0 {
        writeln!(
            out,
            "(--port is not used: the account has a registered redirect URI.)\n"
        )?;
    }
    let where_ = if opts.no_browser {
        "in a browser on any machine"
    } else {
        "in a browser"
    };
    writeln!(
        out,
        "Open this URL {where_} and sign in as {}:\n\n  {}\n",
        acct.username,
        flow.auth_url()
    )?;
    if !opts.no_browser && opts.browser.open(flow.auth_url()) {
        writeln!(out, "(A browser was started with it.)")?;
    }
    if listener.is_some() {
        writeln!(
            out,
            "Waiting up to {} for the browser to come back to {}.\n\
             If the browser runs on another machine, the last page (an address starting with\n\
             {}) will fail to load; that is expected. Copy that full address from the\n\
             browser's address bar, paste it here and press Enter.",
            minutes(opts.timeout),
            flow.redirect_uri(),
            flow.redirect_uri()
        )?;
    } else {
        writeln!(
            out,
            "After you click Allow, the browser goes to {}?code=… (whatever that page shows).\n\
             Copy that full address from the address bar, paste it here and press Enter:",
            flow.redirect_uri()
        )?;
    }
    let mismatch_error = match req.provider {
        Provider::Microsoft => "AADSTS50011",
        _ => "Error 400: redirect_uri_mismatch",
    };
    writeln!(
        out,
        "(If the sign-in page says \"{mismatch_error}\": {}.)",
        redirect_mismatch_fix(&req, flow.redirect_uri())
    )?;
    out.flush()?;

    let (code, tab) = tokio::time::timeout(
        opts.timeout,
        wait_for_code(&flow, listener.as_mut(), input, out),
    )
    .await
    .map_err(|_| AuthorizeError::Timeout {
        after: opts.timeout,
    })??;
    drop(listener);

    let result = match flow.exchange(code).await {
        Ok(tokens) => save_tokens(&store, &tokens).map_err(AuthorizeError::from),
        Err(e) => Err(e),
    };
    if let Some(tab) = tab {
        let page = match &result {
            Ok(_) => Ok(format!(
                "The refresh token for {} was saved on the relay's machine.",
                acct.username
            )),
            Err(e) => Err(e.to_string()),
        };
        tab.answer(page.as_ref().map(String::as_str).map_err(String::as_str))
            .await;
    }
    let expires_at = result?;

    report_saved(out, config, acct, &store, &dir, created_dir, expires_at)?;
    if req.google_offline() {
        writeln!(
            out,
            "Note: if the OAuth consent screen is \"External\" and in \"Testing\", Google expires this\n\
             refresh token after 7 days; publish the app (or make it \"Internal\") to avoid that."
        )?;
    }
    out.flush()?;
    Ok(Authorized {
        account: acct.name.clone(),
        token_file: store.path().to_owned(),
        expires_at,
        created_dir,
    })
}

/// A warning when the token file's owner differs from its directory's owner (e.g. run
/// as root for a relay running as its own user).
/// Tells the user what was saved where, and what to run next (code and device flows).
pub(crate) fn report_saved(
    out: &mut impl Write,
    config: &Config,
    acct: &AccountConfig,
    store: &TokenStore,
    dir: &Path,
    created_dir: bool,
    expires_at: u64,
) -> std::io::Result<()> {
    let expiry = chrono::DateTime::from_timestamp(expires_at as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    if created_dir {
        writeln!(out, "\nCreated directory {} (mode 0700).", dir.display())?;
    }
    writeln!(
        out,
        "\nSaved a new refresh token for account {:?} in {} (mode 0600); the access token is valid until {expiry}.",
        acct.name,
        store.path().display()
    )?;
    if let Some(hint) = owner_hint(store.path(), dir) {
        writeln!(out, "{hint}")?;
    }
    let config_arg = config.path.display();
    writeln!(
        out,
        "\nNext:\n  smtp-oauth-relay --config {config_arg} token status --account {name}\n  \
         smtp-oauth-relay --config {config_arg} run\n\
         A relay that is already running picks up the new token file by itself; no restart is needed.",
        name = acct.name
    )?;
    Ok(())
}

pub(crate) fn owner_hint(file: &Path, dir: &Path) -> Option<String> {
    let f = std::fs::metadata(file).ok()?;
    let d = std::fs::metadata(dir).ok()?;
    (f.uid() != d.uid()).then(|| {
        format!(
            "Note: {} is owned by uid {} but its directory by uid {}; if the relay runs as the directory's owner, run `chown {} {}`.",
            file.display(),
            f.uid(),
            d.uid(),
            d.uid(),
            file.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{extract::State, response::IntoResponse, routing::post, Form, Router};
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    const SECRET: &str = "GOCSPX-client-SECRET";
    const CODE: &str = "4/0AeanS0-code-SECRET";
    const RT: &str = "1//0refresh-SECRET";
    const AT: &str = "ya29.access-SECRET";

    fn request(token_url: String) -> AuthRequest {
        AuthRequest {
            account: "gmail".into(),
            username: Some("me@example.com".into()),
            client_id: "123-abc.apps.googleusercontent.com".into(),
            client_secret: Some(SecretString::from(SECRET.to_owned())),
            auth_url: "https://accounts.google.com/o/oauth2/auth".into(),
            token_url,
            scopes: vec!["https://mail.google.com/".into()],
            redirect_uri: None,
            provider: Provider::Gmail,
        }
    }

    fn params(url: &str) -> HashMap<String, String> {
        Url::parse(url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect()
    }

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<HashMap<String, String>>>>);

    /// A token endpoint answering every request with `status` and `body`.
    async fn token_endpoint(status: u16, body: &'static str) -> (String, Seen) {
        let seen = Seen::default();
        let app =
            Router::new()
                .route(
                    "/token",
                    post(
                        move |State(seen): State<Seen>,
                              Form(form): Form<HashMap<String, String>>| async move {
                            seen.0.lock().unwrap().push(form);
                            (
                                axum::http::StatusCode::from_u16(status).unwrap(),
                                [("content-type", "application/json")],
                                body,
                            )
                                .into_response()
                        },
                    ),
                )
                .with_state(seen.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        (format!("http://{addr}/token"), seen)
    }

    #[tokio::test]
    async fn auth_url_has_pkce_state_and_google_params() {
        let (flow, listener) = Flow::start(&request("http://127.0.0.1:9/token".into()), 0)
            .await
            .unwrap();
        let port = listener.unwrap().local_addr().unwrap().port();
        assert_eq!(flow.redirect_uri(), format!("http://127.0.0.1:{port}/"));
        let p = params(flow.auth_url());
        assert_eq!(p["response_type"], "code");
        assert_eq!(p["client_id"], "123-abc.apps.googleusercontent.com");
        assert_eq!(p["redirect_uri"], flow.redirect_uri());
        assert_eq!(p["scope"], "https://mail.google.com/");
        assert_eq!(p["code_challenge_method"], "S256");
        assert_eq!(p["code_challenge"].len(), 43);
        assert_eq!(p["access_type"], "offline");
        assert_eq!(p["prompt"], "consent");
        assert_eq!(p["login_hint"], "me@example.com");
        assert!(p["state"].len() >= 16);
        assert!(!flow.auth_url().contains(SECRET));
        assert!(!format!("{flow:?}").contains(SECRET));
    }

    fn microsoft_request(token_url: String) -> AuthRequest {
        AuthRequest {
            account: "m365".into(),
            username: Some("me@contoso.example".into()),
            client_id: "11111111-2222-3333-4444-555555555555".into(),
            client_secret: Some(SecretString::from(SECRET.to_owned())),
            auth_url: crate::config::microsoft_url("contoso.example", "authorize"),
            token_url,
            scopes: crate::config::MICROSOFT_SCOPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            redirect_uri: None,
            provider: Provider::Microsoft,
        }
    }

    #[tokio::test]
    async fn microsoft_auth_url_has_no_google_params() {
        let (flow, _) = Flow::start(&microsoft_request("http://127.0.0.1:9/token".into()), 0)
            .await
            .unwrap();
        let p = params(flow.auth_url());
        assert!(flow.auth_url().starts_with(
            "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/authorize?"
        ));
        assert_eq!(
            p["scope"],
            "https://outlook.office.com/SMTP.Send offline_access"
        );
        assert_eq!(p["code_challenge_method"], "S256");
        assert_eq!(p["login_hint"], "me@contoso.example");
        // Google-only: Microsoft's refresh token comes with the offline_access scope.
        assert!(!p.contains_key("access_type"), "{p:?}");
        assert!(!p.contains_key("prompt"), "{p:?}");
    }

    #[tokio::test]
    async fn microsoft_errors_name_microsoft_fixes_without_the_trace_trailer() {
        let mut req = microsoft_request("http://127.0.0.1:9/token".into());
        req.redirect_uri = Some("https://example.org/cb".into());
        let (flow, _) = Flow::start(&req, 0).await.unwrap();
        let state = params(flow.auth_url())["state"].clone();
        let e = flow
            .check_redirect(&[
                ("state".to_owned(), state),
                ("error".to_owned(), "invalid_scope".to_owned()),
                (
                    "error_description".to_owned(),
                    "AADSTS70011: The provided value for the input parameter 'scope' is not valid.\r\nTrace ID: 0000aaaa-11bb\r\nCorrelation ID: aaaa0000-bb11\r\nTimestamp: 2016-01-09 02:02:12Z".to_owned(),
                ),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("(invalid_scope: AADSTS70011: The provided value for the input parameter 'scope' is not valid.)")
                && e.contains("SMTP.Send")
                && !e.contains("Trace ID")
                && !e.contains("mail.google.com"),
            "{e}"
        );
        req.scopes = vec!["https://outlook.office.com/SMTP.Send".into()];
        let m = no_refresh_token_message(&req);
        assert!(
            m.contains("only when the scope \"offline_access\" is requested")
                && m.contains("account \"m365\"")
                && !m.contains("Google"),
            "{m}"
        );
        let m = redirect_mismatch_fix(&microsoft_request(String::new()), "http://127.0.0.1:1/");
        assert!(
            m.contains("Mobile and desktop applications") && !m.contains("Desktop app"),
            "{m}"
        );
    }

    #[tokio::test]
    async fn microsoft_exchange_errors() {
        let cases: [(u16, &'static str, &[&str]); 2] = [
            (
                400,
                r#"{"error":"invalid_grant","error_description":"AADSTS501481: The Code_Verifier does not match the code_challenge supplied in the authorization request.\r\nTrace ID: 0000aaaa\r\nCorrelation ID: aaaa0000\r\nTimestamp: 2024-01-09 02:02:12Z","error_codes":[501481],"timestamp":"2024-01-09 02:02:12Z","trace_id":"0000aaaa","correlation_id":"aaaa0000"}"#,
                &[
                    "(invalid_grant: AADSTS501481: The Code_Verifier does not match the code_challenge supplied in the authorization request.). Codes are single-use",
                ],
            ),
            (
                401,
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 0000aaaa","error_codes":[7000215]}"#,
                &["(invalid_client: AADSTS7000215: Invalid client secret provided.)", "not its Secret ID"],
            ),
        ];
        for (status, body, wanted) in cases {
            let (url, _) = token_endpoint(status, body).await;
            let (flow, _) = Flow::start(&microsoft_request(url), 0).await.unwrap();
            let e = flow
                .exchange(AuthCode::new(CODE.into()))
                .await
                .unwrap_err()
                .to_string();
            for w in wanted {
                assert!(e.contains(w), "{e:?} lacks {w:?}");
            }
            assert!(!e.contains("Trace ID") && !e.contains(SECRET), "{e}");
        }
    }

    #[tokio::test]
    async fn check_redirect_state_and_errors() {
        let mut req = request("http://127.0.0.1:9/token".into());
        req.redirect_uri = Some("https://example.org/cb".into());
        let (flow, listener) = Flow::start(&req, 0).await.unwrap();
        assert!(listener.is_none(), "registered redirect: no listener");
        let state = params(flow.auth_url())["state"].clone();
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let code = flow
            .check_redirect(&pairs(&[("state", &state), ("code", CODE)]))
            .unwrap();
        assert_eq!(code.0.expose_secret(), CODE);
        assert!(!format!("{code:?}").contains(CODE));
        let e = flow
            .check_redirect(&pairs(&[("state", "other"), ("code", CODE)]))
            .unwrap_err();
        assert!(matches!(e, AuthorizeError::StateMismatch(_)), "{e}");
        assert!(!e.to_string().contains(CODE));
        let e = flow.check_redirect(&pairs(&[("code", CODE)])).unwrap_err();
        assert!(e.to_string().contains("no state"), "{e}");
        let e = flow
            .check_redirect(&pairs(&[("state", &state), ("error", "access_denied")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("access_denied") && e.contains("Test users") && e.contains("Allow"),
            "{e}"
        );
        let e = flow
            .check_redirect(&pairs(&[("error", "admin_policy_enforced")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Admin console"), "{e}");
    }

    #[tokio::test]
    async fn access_denied_outside_google_does_not_talk_about_google() {
        let mut req = request("http://127.0.0.1:9/token".into());
        req.provider = Provider::Custom;
        req.redirect_uri = Some("https://example.org/cb".into());
        let (flow, _) = Flow::start(&req, 0).await.unwrap();
        let state = params(flow.auth_url())["state"].clone();
        let e = flow
            .check_redirect(&[
                ("state".to_owned(), state),
                ("error".to_owned(), "access_denied".to_owned()),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin consent") && !e.contains("Test users"),
            "{e}"
        );
    }

    #[test]
    fn pasted_input_forms() {
        let code = |t: &str| match parse_pasted(t) {
            Pasted::Code(c) => c.0.expose_secret().to_owned(),
            other => panic!("{t:?}: {}", kind(&other)),
        };
        fn kind(p: &Pasted) -> String {
            match p {
                Pasted::Empty => "empty".into(),
                Pasted::Params(v) => format!("params {v:?}"),
                Pasted::Code(_) => "code".into(),
                Pasted::Junk(h) => format!("junk {h}"),
            }
        }
        assert!(matches!(parse_pasted("  \r\n"), Pasted::Empty));
        assert_eq!(code("4/0AeanS0-code_x.y\n"), "4/0AeanS0-code_x.y");
        assert_eq!(code("4%2F0AeanS0-code"), "4/0AeanS0-code");
        match parse_pasted(
            "  \"http://127.0.0.1:8080/?state=abc&code=4%2F0Ae&scope=https://mail.google.com/\" ",
        ) {
            Pasted::Params(p) => {
                assert!(p.contains(&("code".into(), "4/0Ae".into())));
                assert!(p.contains(&("state".into(), "abc".into())));
            }
            other => panic!("{}", kind(&other)),
        }
        assert!(matches!(parse_pasted("?state=a&code=b"), Pasted::Params(_)));
        assert!(matches!(
            parse_pasted("/?error=access_denied&state=a"),
            Pasted::Params(_)
        ));
        for (junk, hint) in [
            ("yes", HINT_NOT_URL),
            ("http://127.0.0.1:8080/", HINT_NO_CODE),
            (
                "https://accounts.google.com/o/oauth2/auth?response_type=code&client_id=x",
                HINT_SIGN_IN_URL,
            ),
            ("http://[bad", HINT_NOT_URL),
            ("some words pasted by mistake", HINT_NOT_URL),
            ("4%FF%FE-not-utf8-code", HINT_NOT_URL),
        ] {
            match parse_pasted(junk) {
                Pasted::Junk(h) => assert_eq!(h, hint, "{junk}"),
                other => panic!("{junk:?}: {}", kind(&other)),
            }
        }
    }

    #[tokio::test]
    async fn read_pasted_hints_then_accepts_and_checks_state() {
        let mut req = request("http://127.0.0.1:9/token".into());
        req.redirect_uri = Some("https://example.org/cb".into());
        let (flow, _) = Flow::start(&req, 0).await.unwrap();
        let state = params(flow.auth_url())["state"].clone();
        let input = format!("\nnonsense\nhttps://example.org/cb?state={state}&code={CODE}\n");
        let mut out = Vec::new();
        let code = flow
            .read_pasted(&mut input.as_bytes(), &mut out)
            .await
            .unwrap();
        assert_eq!(code.0.expose_secret(), CODE);
        let shown = String::from_utf8(out).unwrap();
        assert!(
            shown.contains(HINT_NOT_URL) && shown.contains("Paste the full URL"),
            "{shown}"
        );

        let input = format!("https://example.org/cb?state=forged&code={CODE}\n");
        let e = flow
            .read_pasted(&mut input.as_bytes(), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(e, AuthorizeError::StateMismatch(_)), "{e}");

        let e = flow
            .read_pasted(&mut "junk\n".as_bytes(), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(e, AuthorizeError::NoInput), "{e}");

        let e = flow
            .read_pasted(&mut "a\nb\nc\nd\ne\nf\n".as_bytes(), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(e, AuthorizeError::TooManyAttempts(5)), "{e}");
    }

    #[tokio::test]
    async fn listener_ignores_other_requests_and_rejects_wrong_state() {
        let (flow, listener) = Flow::start(&request("http://127.0.0.1:9/token".into()), 0)
            .await
            .unwrap();
        let mut listener = listener.unwrap();
        let base = flow.redirect_uri().to_owned();
        let browser = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let fav = http.get(format!("{base}favicon.ico")).send().await.unwrap();
            assert_eq!(fav.status(), 404);
            // A silent connection (browser preconnect) must not block anything.
            let _idle =
                TcpStream::connect(base.trim_start_matches("http://").trim_end_matches('/'))
                    .await
                    .unwrap();
            let r = http
                .get(format!("{base}?state=forged&code=x"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        });
        let e = listener.receive(&flow).await.unwrap_err();
        assert!(matches!(e, AuthorizeError::StateMismatch(_)), "{e}");
        let (status, page) = browser.await.unwrap();
        assert_eq!(status, 400);
        assert!(
            page.contains("Authorization failed") && page.contains("nothing was saved"),
            "{page}"
        );
    }

    #[tokio::test]
    async fn listener_takes_the_code_and_answers_the_tab() {
        let (flow, listener) = Flow::start(&request("http://127.0.0.1:9/token".into()), 0)
            .await
            .unwrap();
        let mut listener = listener.unwrap();
        let state = params(flow.auth_url())["state"].clone();
        let url = format!("{}?state={state}&code=4%2F0Ae&scope=x", flow.redirect_uri());
        let browser =
            tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
        let (code, tab) = listener.receive(&flow).await.unwrap();
        assert_eq!(code.0.expose_secret(), "4/0Ae");
        tab.answer(Ok("Saved <ok>.")).await;
        let page = browser.await.unwrap();
        assert!(
            page.contains("close this tab") && page.contains("Saved &lt;ok&gt;."),
            "{page}"
        );
    }

    async fn exchange_with(
        status: u16,
        body: &'static str,
    ) -> (Result<NewTokens, AuthorizeError>, Seen) {
        let (url, seen) = token_endpoint(status, body).await;
        let (flow, _) = Flow::start(&request(url), 0).await.unwrap();
        (flow.exchange(AuthCode::new(CODE.into())).await, seen)
    }

    #[tokio::test]
    async fn exchange_sends_verifier_and_redirect_and_reads_tokens() {
        let (r, seen) = exchange_with(
            200,
            r#"{"access_token":"ya29.access-SECRET","expires_in":3599,"refresh_token":"1//0refresh-SECRET","scope":"https://mail.google.com/","token_type":"Bearer"}"#,
        )
        .await;
        let t = r.unwrap();
        assert_eq!(t.refresh_token.expose_secret(), RT);
        assert_eq!(t.access_token.expose_secret(), AT);
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        let d = format!("{t:?}");
        assert!(!d.contains(RT) && !d.contains(AT), "{d}");
        let form = seen.0.lock().unwrap()[0].clone();
        assert_eq!(form["grant_type"], "authorization_code");
        assert_eq!(form["code"], CODE);
        assert!(form["redirect_uri"].starts_with("http://127.0.0.1:"));
        assert_eq!(form["code_verifier"].len(), 43);
    }

    #[tokio::test]
    async fn exchange_errors_are_precise_and_secret_free() {
        let cases: [(u16, &'static str, &[&str]); 6] = [
            (
                400,
                r#"{"error":"invalid_grant","error_description":"Bad Request"}"#,
                &["invalid_grant", "single-use", "run `authorize` again"],
            ),
            (
                400,
                r#"{"error":"redirect_uri_mismatch","error_description":"Bad Request"}"#,
                &[
                    "redirect_uri_mismatch",
                    "Desktop app",
                    "Authorized redirect URIs",
                ],
            ),
            (
                401,
                r#"{"error":"invalid_client","error_description":"Unauthorized"}"#,
                &["invalid_client", "client_secret_json"],
            ),
            (
                200,
                r#"{"access_token":"ya29.access-SECRET","expires_in":3599,"scope":"https://mail.google.com/","token_type":"Bearer"}"#,
                &[
                    "no refresh token",
                    "Desktop app",
                    "myaccount.google.com/permissions",
                ],
            ),
            (
                200,
                r#"{"access_token":"ya29.access-SECRET","expires_in":3599,"refresh_token":"1//0refresh-SECRET","scope":"openid email","token_type":"Bearer"}"#,
                &["without the scope https://mail.google.com/", "tick"],
            ),
            (
                200,
                r#"{"oops":"ya29.access-SECRET"}"#,
                &["did not answer with a token response"],
            ),
        ];
        for (status, body, wanted) in cases {
            let (r, _) = exchange_with(status, body).await;
            let e = r.unwrap_err().to_string();
            for w in wanted {
                assert!(e.contains(w), "{body}: {e:?} lacks {w:?}");
            }
            for s in [SECRET, CODE, RT, AT] {
                assert!(!e.contains(s), "{e}");
            }
        }
        // Unreachable endpoint.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/token", l.local_addr().unwrap());
        drop(l);
        let (flow, _) = Flow::start(&request(url), 0).await.unwrap();
        let e = flow
            .exchange(AuthCode::new(CODE.into()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot reach the token endpoint"), "{e}");
    }

    #[test]
    fn save_writes_all_fields_and_keeps_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let store = TokenStore::new(d.path().join("g.json"));
        std::fs::write(
            store.path(),
            r#"{"refresh_token":"old","custom":1,"last_error":"invalid_grant: x"}"#,
        )
        .unwrap();
        let tokens = NewTokens {
            refresh_token: SecretString::from(RT.to_owned()),
            access_token: SecretString::from(AT.to_owned()),
            expires_in: Duration::from_secs(3599),
            scopes: None,
        };
        let expires_at = save_tokens(&store, &tokens).unwrap();
        let f = store.load().unwrap();
        assert_eq!(f.refresh_token.as_ref().unwrap().expose_secret(), RT);
        assert_eq!(f.access_token.unwrap().expose_secret(), AT);
        assert_eq!(f.expires_at, Some(expires_at));
        assert_eq!(f.refresh_token_issued_at, f.last_refresh_at);
        assert!(f.last_refresh_at.unwrap() + 3599 >= expires_at);
        assert_eq!(f.last_error, None);
        assert_eq!(f.extra["custom"], 1);
        assert_eq!(store.mode(), Some(0o600));
    }

    #[test]
    fn token_dir_is_created_0700_or_refused_with_a_hint() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (dir, created) = prepare_token_dir(&d.path().join("a/b/t.json")).unwrap();
        assert!(created);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (_, created) = prepare_token_dir(&dir.join("t.json")).unwrap();
        assert!(!created);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "check file removed"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        if tempfile::tempfile_in(&dir).is_err() {
            let e = prepare_token_dir(&dir.join("t.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("sudo -u"), "{e}");
        }
    }

    #[test]
    fn custom_provider_without_auth_url_is_named() {
        let cfg = crate::config::Config::from_toml(
            "[[account]]\nname = \"c\"\nprovider = \"custom\"\nusername = \"a@b.c\"\nclient_id = \"x\"\ntoken_file = \"/tmp/t.json\"\nsmtp_host = \"smtp.example\"\ntoken_url = \"https://idp.example/token\"\n",
            Path::new("/etc/r.toml"),
        )
        .unwrap();
        let e = AuthRequest::from_account(&cfg.accounts[0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`auth_url`") && e.contains("custom"), "{e}");
    }
}
