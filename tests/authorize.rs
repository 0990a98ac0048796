//! `smtp-oauth-relay authorize` end to end over loopback, against the sandbox identity
//! provider: reqwest plays the browser (GET the printed sign-in URL, follow the 302 to
//! the loopback listener, or copy the redirected URL and paste it), and we check what a
//! user sees: the token file on disk (0600, a refresh token the token endpoint accepts),
//! the messages, the browser page, and that no secret is ever printed. The same against
//! the sandbox playing Microsoft's v2.0 endpoints (provider "microsoft"), through to a
//! message the relay delivers with the new token.

mod support;

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use smtp_oauth_relay::{
    config::Config,
    oauth::{
        authorize::{run_with, AuthorizeError, AuthorizeOptions, Authorized, Browser},
        OAuth2Refresher, Refresher, TokenStore,
    },
    sandbox::{Sandbox, SandboxOptions},
};
use tokio::{
    io::{AsyncWriteExt, BufReader, DuplexStream},
    sync::mpsc,
};

async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default()).await.unwrap()
}

/// A config for the sandbox; `extra` lines go into the account table.
fn config(dir: &Path, sb: &Sandbox, extra: &str) -> Config {
    let text = format!(
        "[[account]]\nname = \"sandbox\"\nusername = {:?}\nclient_id = {:?}\nclient_secret = {:?}\n\
         token_url = {:?}\nauth_url = {:?}\ntoken_file = \"tokens/sandbox.json\"\n{extra}",
        sb.username, sb.client_id, sb.client_secret, sb.token_url, sb.auth_url
    );
    Config::from_toml(&text, &dir.join("config.toml")).unwrap()
}

fn token_path(dir: &Path) -> PathBuf {
    dir.join("tokens/sandbox.json")
}

/// Collects what `authorize` prints and hands it, line by line, to the test.
#[derive(Clone)]
struct Screen {
    all: Arc<Mutex<Vec<u8>>>,
    lines: mpsc::UnboundedSender<String>,
    partial: Arc<Mutex<Vec<u8>>>,
}

impl Screen {
    fn new() -> (Screen, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Screen {
                all: Arc::default(),
                lines: tx,
                partial: Arc::default(),
            },
            rx,
        )
    }

    fn text(&self) -> String {
        String::from_utf8(self.all.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.all.lock().unwrap().extend_from_slice(buf);
        let mut partial = self.partial.lock().unwrap();
        partial.extend_from_slice(buf);
        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            let _ = self
                .lines
                .send(String::from_utf8_lossy(&line).trim().to_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sign-in URL `authorize` printed.
async fn printed_url(lines: &mut mpsc::UnboundedReceiver<String>, auth_url: &str) -> String {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .expect("authorize printed no URL")
            .expect("authorize ended before printing a URL");
        if line.starts_with(auth_url) {
            return line;
        }
    }
}

/// Where the provider sends the browser (the `Location` of `/auth`'s 302).
async fn redirected_to(url: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    r.headers()["location"].to_str().unwrap().to_owned()
}

fn no_secrets(text: &str, sb: &Sandbox, dir: &Path) {
    assert!(!text.contains(&sb.client_secret), "{text}");
    if let Ok(f) = TokenStore::new(token_path(dir)).load() {
        assert!(
            !text.contains(f.refresh_token.as_ref().unwrap().expose_secret()),
            "{text}"
        );
        let at = f.access_token.unwrap();
        assert!(!text.contains(at.expose_secret()), "{text}");
    }
    assert!(!text.contains("code=4/"), "{text}");
    assert!(!text.contains("4/0sandbox-"), "{text}");
}

/// The new refresh token is one the token endpoint accepts.
async fn refresh_token_works(sb: &Sandbox, dir: &Path) {
    let file = TokenStore::new(token_path(dir)).load().unwrap();
    let refresher = OAuth2Refresher::new(
        sb.client_id.clone(),
        Some(SecretString::from(sb.client_secret.clone())),
        sb.token_url.clone(),
    )
    .unwrap();
    refresher
        .refresh(file.refresh_token.as_ref())
        .await
        .unwrap();
}

fn paste_pipe() -> (DuplexStream, BufReader<DuplexStream>) {
    let (w, r) = tokio::io::duplex(4096);
    (w, BufReader::new(r))
}

#[tokio::test]
async fn loopback_flow_with_a_browser() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let page = Arc::new(tokio::sync::Mutex::new(None::<(u16, String)>));
    let page2 = page.clone();
    let opts = AuthorizeOptions {
        browser: Browser::Custom(Arc::new(move |url: &str| {
            let url = url.to_owned();
            let page = page2.clone();
            // The browser: GET the sign-in URL, follow the 302 to the loopback listener.
            let task = tokio::spawn(async move {
                let r = reqwest::get(url).await.unwrap();
                let status = r.status().as_u16();
                *page.lock().await = Some((status, r.text().await.unwrap()));
            });
            drop(task);
        })),
        ..AuthorizeOptions::default()
    };
    let (screen, _lines) = Screen::new();
    let mut out = screen.clone();
    // Stdin stays open and silent: the browser must win.
    let (_stdin, mut input) = paste_pipe();
    let done: Authorized = run_with(&cfg, Some("sandbox"), opts, &mut input, &mut out)
        .await
        .unwrap();

    assert_eq!(done.token_file, token_path(dir.path()));
    assert!(done.created_dir);
    let meta = std::fs::metadata(&done.token_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let file = TokenStore::new(done.token_file.clone()).load().unwrap();
    assert_eq!(
        file.refresh_token.as_ref().unwrap().expose_secret(),
        sb.control.current_refresh_token()
    );
    assert!(file.access_token.is_some());
    assert_eq!(file.expires_at, Some(done.expires_at));
    assert!(file.refresh_token_issued_at.is_some() && file.last_refresh_at.is_some());
    refresh_token_works(&sb, dir.path()).await;

    // What Google needs to return a refresh token was asked for.
    let asked = sb.control.last_authorization_request().unwrap();
    assert_eq!(asked["access_type"], "offline");
    assert_eq!(asked["prompt"], "consent");
    assert_eq!(asked["code_challenge_method"], "S256");
    assert_eq!(asked["scope"], "https://mail.google.com/");
    assert_eq!(asked["login_hint"], sb.username);

    // The browser tab was told the outcome.
    let mut shown = None;
    for _ in 0..100 {
        if let Some(p) = page.lock().await.clone() {
            shown = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, html) = shown.expect("the browser got no page");
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("close this tab"), "{html}");

    let text = screen.text();
    assert!(text.contains("A browser was started"), "{text}");
    assert!(text.contains("Saved a new refresh token"), "{text}");
    assert!(text.contains("token status --account sandbox"), "{text}");
    assert!(text.contains("no restart is needed"), "{text}");
    no_secrets(&text, &sb, dir.path());
}

#[tokio::test]
async fn no_browser_paste_flow() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let (screen, mut lines) = Screen::new();
    let mut out = screen.clone();
    let (mut stdin, mut input) = paste_pipe();
    let opts = AuthorizeOptions {
        no_browser: true,
        browser: Browser::Custom(Arc::new(|_: &str| panic!("--no-browser opened a browser"))),
        ..AuthorizeOptions::default()
    };
    let auth_url = sb.auth_url.clone();
    let user = tokio::spawn(async move {
        let url = printed_url(&mut lines, &auth_url).await;
        // The browser on another machine: the redirect to 127.0.0.1 fails to load there,
        // so the user copies the address bar. Some junk first, as users do.
        let back = redirected_to(&url).await;
        stdin.write_all(b"\nwhat?\n").await.unwrap();
        stdin
            .write_all(format!("  {back}  \n").as_bytes())
            .await
            .unwrap();
        stdin
    });
    let done = run_with(&cfg, None, opts, &mut input, &mut out)
        .await
        .unwrap();
    let _stdin = user.await.unwrap();
    assert_eq!(done.account, "sandbox");
    refresh_token_works(&sb, dir.path()).await;
    let text = screen.text();
    assert!(text.contains("on any machine"), "{text}");
    assert!(text.contains("That is not a URL"), "{text}");
    assert!(!text.contains("A browser was started"), "{text}");
    no_secrets(&text, &sb, dir.path());
}

#[tokio::test]
async fn pasting_just_the_code_works() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let (screen, mut lines) = Screen::new();
    let (mut stdin, mut input) = paste_pipe();
    let auth_url = sb.auth_url.clone();
    tokio::spawn(async move {
        let back = redirected_to(&printed_url(&mut lines, &auth_url).await).await;
        let code = reqwest::Url::parse(&back)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .unwrap()
            .1
            .into_owned();
        stdin
            .write_all(format!("{code}\n").as_bytes())
            .await
            .unwrap();
        stdin
    });
    let opts = AuthorizeOptions {
        no_browser: true,
        ..AuthorizeOptions::default()
    };
    run_with(&cfg, None, opts, &mut input, &mut screen.clone())
        .await
        .unwrap();
    refresh_token_works(&sb, dir.path()).await;
}

#[tokio::test]
async fn web_client_json_with_registered_redirect_uri() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    // The console's "web" download, pointing at the sandbox.
    let web = sb
        .client_secret_json()
        .replace("\"installed\"", "\"web\"")
        .replace(
            "\"http://localhost\"",
            "\"https://relay.example/oauth/callback\"",
        );
    std::fs::write(dir.path().join("client_secret_web.json"), web).unwrap();
    sb.control
        .register_redirect_uri("https://relay.example/oauth/callback");
    let text = format!(
        "[[account]]\nname = \"web\"\nusername = {:?}\nclient_secret_json = \"client_secret_web.json\"\ntoken_file = \"tokens/sandbox.json\"\n",
        sb.username
    );
    let cfg = Config::from_toml(&text, &dir.path().join("config.toml")).unwrap();
    let (screen, mut lines) = Screen::new();
    let (mut stdin, mut input) = paste_pipe();
    let auth_url = sb.auth_url.clone();
    tokio::spawn(async move {
        let url = printed_url(&mut lines, &auth_url).await;
        let back = redirected_to(&url).await;
        assert!(
            back.starts_with("https://relay.example/oauth/callback?"),
            "{back}"
        );
        stdin
            .write_all(format!("{back}\n").as_bytes())
            .await
            .unwrap();
        stdin
    });
    // --port is ignored (no listener); the browser is still opened with the URL.
    let opened = Arc::new(Mutex::new(None::<String>));
    let opened2 = opened.clone();
    let opts = AuthorizeOptions {
        port: 1,
        browser: Browser::Custom(Arc::new(move |url: &str| {
            *opened2.lock().unwrap() = Some(url.to_owned());
        })),
        ..AuthorizeOptions::default()
    };
    run_with(&cfg, None, opts, &mut input, &mut screen.clone())
        .await
        .unwrap();
    assert!(opened
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .starts_with(&sb.auth_url));
    refresh_token_works(&sb, dir.path()).await;
    let shown = screen.text();
    assert!(shown.contains("--port is not used"), "{shown}");
    no_secrets(&shown, &sb, dir.path());
}

#[tokio::test]
async fn installed_client_json_alone_is_enough() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    // The console's "installed" download: client id, secret, auth and token URIs.
    std::fs::write(dir.path().join("client.json"), sb.client_secret_json()).unwrap();
    let text = format!(
        "[[account]]\nusername = {:?}\nclient_secret_json = \"client.json\"\ntoken_file = \"tokens/sandbox.json\"\n",
        sb.username
    );
    let cfg = Config::from_toml(&text, &dir.path().join("config.toml")).unwrap();
    let opts = AuthorizeOptions {
        browser: Browser::Custom(Arc::new(|url: &str| {
            let url = url.to_owned();
            drop(tokio::spawn(async move { reqwest::get(url).await.ok() }));
        })),
        ..AuthorizeOptions::default()
    };
    let (_stdin, mut input) = paste_pipe();
    let (screen, _lines) = Screen::new();
    let done = run_with(&cfg, None, opts, &mut input, &mut screen.clone())
        .await
        .unwrap();
    assert_eq!(done.account, "default");
    refresh_token_works(&sb, dir.path()).await;
    no_secrets(&screen.text(), &sb, dir.path());
}

/// Runs `authorize` in paste mode; `tamper` turns the redirected URL into what is pasted.
async fn paste_run(
    sb: &Sandbox,
    dir: &Path,
    extra: &str,
    tamper: fn(String) -> String,
) -> (Result<Authorized, AuthorizeError>, String) {
    paste_run_with(config(dir, sb, extra), sb.auth_url.clone(), tamper).await
}

/// `paste_run` for any config whose sign-in URL starts with `auth_url`.
async fn paste_run_with(
    cfg: Config,
    auth_url: String,
    tamper: fn(String) -> String,
) -> (Result<Authorized, AuthorizeError>, String) {
    let (screen, mut lines) = Screen::new();
    let (mut stdin, mut input) = paste_pipe();
    tokio::spawn(async move {
        let back = redirected_to(&printed_url(&mut lines, &auth_url).await).await;
        stdin
            .write_all(format!("{}\n", tamper(back)).as_bytes())
            .await
            .unwrap();
        stdin
    });
    let opts = AuthorizeOptions {
        no_browser: true,
        ..AuthorizeOptions::default()
    };
    let r = run_with(&cfg, None, opts, &mut input, &mut screen.clone()).await;
    (r, screen.text())
}

#[tokio::test]
async fn wrong_state_is_rejected_and_nothing_saved() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = paste_run(&sb, dir.path(), "", |url| {
        let u = reqwest::Url::parse(&url).unwrap();
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "state" {
                    "forged".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        let mut u = u.clone();
        u.query_pairs_mut().clear().extend_pairs(pairs);
        u.to_string()
    })
    .await;
    let e = r.unwrap_err();
    assert!(matches!(e, AuthorizeError::StateMismatch(_)), "{e}");
    assert!(e.to_string().contains("nothing was saved"), "{e}");
    assert!(!token_path(dir.path()).exists());
}

#[tokio::test]
async fn no_refresh_token_is_a_clear_error() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    // Provider "custom" sends no access_type=offline / prompt=consent: like Google, the
    // sandbox then returns no refresh token.
    let (r, _) = paste_run(
        &sb,
        dir.path(),
        "provider = \"custom\"\nsmtp_host = \"127.0.0.1\"\nscopes = [\"https://mail.google.com/\"]\n",
        |u| u,
    )
    .await;
    let e = r.unwrap_err();
    assert!(matches!(e, AuthorizeError::NoRefreshToken(_)), "{e}");
    let m = e.to_string();
    assert!(
        m.contains("no refresh token") && m.contains("offline"),
        "{m}"
    );
    assert!(!token_path(dir.path()).exists());
}

#[tokio::test]
async fn access_denied_in_the_browser() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    sb.control.deny_next_authorizations(1);
    let cfg = config(dir.path(), &sb, "");
    let page = Arc::new(tokio::sync::Mutex::new(None::<String>));
    let page2 = page.clone();
    let opts = AuthorizeOptions {
        browser: Browser::Custom(Arc::new(move |url: &str| {
            let (url, page) = (url.to_owned(), page2.clone());
            drop(tokio::spawn(async move {
                let text = reqwest::get(url).await.unwrap().text().await.unwrap();
                *page.lock().await = Some(text);
            }));
        })),
        ..AuthorizeOptions::default()
    };
    let (_stdin, mut input) = paste_pipe();
    let (screen, _lines) = Screen::new();
    let e = run_with(&cfg, None, opts, &mut input, &mut screen.clone())
        .await
        .unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, AuthorizeError::Denied(_)), "{m}");
    assert!(
        m.contains("access_denied") && m.contains("Test users"),
        "{m}"
    );
    assert!(!token_path(dir.path()).exists());
    for _ in 0..100 {
        if let Some(p) = page.lock().await.clone() {
            assert!(p.contains("Authorization failed"), "{p}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the browser got no page");
}

#[tokio::test]
async fn stdin_closed_does_not_stop_the_listener_but_times_out() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let opts = AuthorizeOptions {
        browser: Browser::Never,
        timeout: Duration::from_millis(300),
        ..AuthorizeOptions::default()
    };
    let mut input: &[u8] = b"";
    let mut out = Vec::new();
    let e = run_with(&cfg, None, opts, &mut input, &mut out)
        .await
        .unwrap_err();
    assert!(matches!(e, AuthorizeError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("within 300 ms"), "{e}");
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("waiting for the browser's redirect only"),
        "{text}"
    );
}

// ---- The sandbox identity provider itself -------------------------------------------

/// A valid `/auth` URL for the sandbox (PKCE S256), its verifier and its redirect URI.
fn auth_request(sb: &Sandbox, redirect: &str) -> (String, String) {
    let verifier = "v".repeat(50);
    let challenge = oauth2::PkceCodeChallenge::from_code_verifier_sha256(
        &oauth2::PkceCodeVerifier::new(verifier.clone()),
    );
    let mut url = reqwest::Url::parse(&sb.auth_url).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &sb.client_id)
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", "https://mail.google.com/")
        .append_pair("state", "s1")
        .append_pair("code_challenge", challenge.as_str())
        .append_pair("code_challenge_method", "S256")
        .append_pair("access_type", "offline")
        .append_pair("prompt", "consent");
    (url.to_string(), verifier)
}

async fn exchange(
    sb: &Sandbox,
    code: &str,
    redirect: &str,
    verifier: &str,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(&sb.token_url)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
            ("client_id", &sb.client_id),
            ("client_secret", &sb.client_secret),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn code_of(location: &str) -> String {
    reqwest::Url::parse(location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned()
}

#[tokio::test]
async fn sandbox_auth_endpoint_refuses_bad_requests() {
    let sb = sandbox().await;
    let redirect = "http://127.0.0.1:4567/";
    let (good, _) = auth_request(&sb, redirect);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let status = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let edit = |from: &str, to: &str| good.replace(from, to);
    for (url, wanted) in [
        (
            edit(
                &format!("client_id={}", sb.client_id),
                "client_id=someone-else",
            ),
            "invalid_client",
        ),
        (
            edit("code_challenge_method=S256", "code_challenge_method=plain"),
            "S256",
        ),
        (edit("&code_challenge_method=S256", ""), "S256"),
        (
            edit("&code_challenge=", "&x=").replace("&code_challenge_method=S256", ""),
            "code_challenge",
        ),
        (
            edit("127.0.0.1%3A4567", "evil.example"),
            "redirect_uri_mismatch",
        ),
        (
            edit("response_type=code", "response_type=token"),
            "unsupported_response_type",
        ),
    ] {
        let (code, body) = status(url.clone()).await;
        assert_eq!(code, 400, "{url}: {body}");
        assert!(body.contains(wanted), "{url}: {body}");
    }
    let location = redirected_to(&good).await;
    assert!(location.starts_with(redirect) && location.contains("state=s1"));
}

#[tokio::test]
async fn sandbox_codes_are_single_use_and_bound_to_redirect_and_verifier() {
    let sb = sandbox().await;
    let redirect = "http://localhost:4567/cb";
    let (url, verifier) = auth_request(&sb, redirect);

    // Wrong verifier: refused (and the code is spent, like Google).
    let code = code_of(&redirected_to(&url).await);
    let (s, body) = exchange(&sb, &code, redirect, &"w".repeat(50)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    let (s, body) = exchange(&sb, &code, redirect, "short").await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // Redirect URI must be the one of /auth.
    let code = code_of(&redirected_to(&url).await);
    let (s, body) = exchange(&sb, &code, "http://localhost:4567/other", &verifier).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("redirect_uri_mismatch")),
        "{body}"
    );

    // The good exchange, then a replay.
    let code = code_of(&redirected_to(&url).await);
    let (s, body) = exchange(&sb, &code, redirect, &verifier).await;
    assert_eq!(s, 200, "{body}");
    assert!(body["refresh_token"].as_str().unwrap().starts_with("1//"));
    assert_eq!(body["scope"], "https://mail.google.com/");
    let (s, body) = exchange(&sb, &code, redirect, &verifier).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    let (s, body) = exchange(&sb, "4/garbage", redirect, &verifier).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // Without prompt=consent: no refresh token.
    let (url, verifier) = auth_request(&sb, redirect);
    let url = url.replace("&prompt=consent", "");
    let code = code_of(&redirected_to(&url).await);
    let (s, body) = exchange(&sb, &code, redirect, &verifier).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");
}

// ---- Microsoft 365: the sandbox playing Microsoft's v2.0 endpoints ------------------

/// The tenant in the sandbox's Microsoft URLs (any is accepted).
const TENANT: &str = "contoso.onmicrosoft.com";
const SMTP_SEND: &str = "https://outlook.office.com/SMTP.Send";

/// A provider "microsoft" account whose endpoints are the sandbox's Microsoft ones.
fn microsoft_config(dir: &Path, sb: &Sandbox, extra: &str) -> Config {
    let text = format!(
        "[[account]]\nname = \"m365\"\nprovider = \"microsoft\"\ntenant = {TENANT:?}\nusername = {:?}\n\
         client_id = {:?}\nclient_secret = {:?}\nauth_url = {:?}\ntoken_url = {:?}\n\
         token_file = \"tokens/sandbox.json\"\n{extra}",
        sb.username,
        sb.client_id,
        sb.client_secret,
        sb.microsoft_url(TENANT, "authorize"),
        sb.microsoft_url(TENANT, "token"),
    );
    Config::from_toml(&text, &dir.join("config.toml")).unwrap()
}

/// A browser for `Browser::Custom`: GETs the sign-in URL and follows the redirect to the
/// loopback listener.
fn follow_redirects() -> Browser {
    Browser::Custom(Arc::new(|url: &str| {
        let url = url.to_owned();
        drop(tokio::spawn(async move { reqwest::get(url).await.ok() }));
    }))
}

fn file_refresh_token(path: &Path) -> String {
    let file = TokenStore::new(path.to_owned()).load().unwrap();
    file.refresh_token
        .as_ref()
        .unwrap()
        .expose_secret()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_code_flow_then_the_relay_delivers_and_keeps_the_rotated_token() {
    use support::{message, strip_received, Client, Harness, Setup};
    // Access tokens live less than the 600 s Microsoft margin: the relay refreshes at once.
    let mut h = Harness::start(Setup {
        provider: "microsoft",
        refresh_margin_secs: 600,
        token_lifetime: Duration::from_secs(599),
        ..Setup::default()
    })
    .await;
    h.daemon.take().unwrap().shutdown().await;
    // The relay's account, now with the sandbox's Microsoft endpoints and a tenant.
    let sb = &h.sandbox;
    let (ms_auth, ms_token) = (
        sb.microsoft_url(TENANT, "authorize"),
        sb.microsoft_url(TENANT, "token"),
    );
    let text = h.config_text.replace(
        &format!("token_url = \"{}\"\n", sb.token_url),
        &format!("token_url = \"{ms_token}\"\nauth_url = \"{ms_auth}\"\ntenant = \"{TENANT}\"\n"),
    );
    assert_ne!(text, h.config_text);
    std::fs::write(h.config_path(), &text).unwrap();
    let cfg = Config::load(&h.config_path()).unwrap();

    let opts = AuthorizeOptions {
        browser: follow_redirects(),
        ..AuthorizeOptions::default()
    };
    let (_stdin, mut input) = paste_pipe();
    let (screen, _lines) = Screen::new();
    let done = run_with(&cfg, Some("sandbox"), opts, &mut input, &mut screen.clone())
        .await
        .unwrap();
    assert_eq!(done.token_file, h.token_file);
    let mode = std::fs::metadata(&h.token_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let authorized = file_refresh_token(&h.token_file);
    assert_eq!(authorized, sb.control.current_refresh_token());
    assert_ne!(
        authorized, sb.refresh_token,
        "a new refresh token was saved"
    );
    let asked = sb.control.last_authorization_request().unwrap();
    assert_eq!(asked["scope"], format!("{SMTP_SEND} offline_access"));
    assert_eq!(asked["login_hint"], sb.username);
    assert_eq!(asked["code_challenge_method"], "S256");
    assert!(!asked.contains_key("access_type"), "{asked:?}");
    let shown = screen.text();
    assert!(shown.contains("Saved a new refresh token"), "{shown}");
    assert!(shown.contains("AADSTS50011"), "{shown}");
    assert!(!shown.contains("7 days"), "Google's note: {shown}");

    // The relay refreshes at Microsoft's token endpoint, which returns a new refresh
    // token: it is saved before the access token is used.
    h.restart().await;
    h.token_ready().await;
    let rotated = file_refresh_token(&h.token_file);
    assert_ne!(rotated, authorized, "the refresh token was rotated");
    assert_eq!(rotated, h.control().current_refresh_token());
    let mode = std::fs::metadata(&h.token_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut c = Client::ehlo(h.addr).await;
    let data = message("m365-code-flow", "sent with the authorized account\r\n");
    let r = c
        .send_mail("app@example.com", &["you@example.com"], &data)
        .await;
    assert_eq!(r.code, 250, "{r}");
    let msgs = h
        .control()
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].auth_user, h.sandbox.username);
    assert_eq!(strip_received(&msgs[0].data), &data[..]);

    let printed = format!("{shown}\n{}", support::logs());
    for secret in [&authorized, &rotated, &h.sandbox.client_secret] {
        assert!(!printed.contains(secret.as_str()), "a secret was printed");
    }
    h.stop().await;
}

#[tokio::test]
async fn microsoft_without_offline_access_gets_no_refresh_token() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = microsoft_config(dir.path(), &sb, &format!("scopes = [{SMTP_SEND:?}]\n"));
    let (r, _) = paste_run_with(cfg, sb.microsoft_url(TENANT, "authorize"), |u| u).await;
    let e = r.unwrap_err();
    assert!(matches!(e, AuthorizeError::NoRefreshToken(_)), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "the provider granted access but returned no refresh token, so the relay could not renew it and nothing was saved: \
             Microsoft returns a refresh token only when the scope \"offline_access\" is requested, and this run asked for \"{SMTP_SEND}\": \
             add \"offline_access\" to `scopes` of account \"m365\" (or remove `scopes` to use the default, \
             \"{SMTP_SEND} offline_access\") and run `authorize` again"
        )
    );
    assert!(!dir.path().join("tokens/sandbox.json").exists());
}

#[tokio::test]
async fn microsoft_refuses_a_gmail_scope_with_aadsts70011() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = microsoft_config(
        dir.path(),
        &sb,
        "scopes = [\"https://mail.google.com/\", \"offline_access\"]\n",
    );
    let (r, _) = paste_run_with(cfg, sb.microsoft_url(TENANT, "authorize"), |u| u).await;
    let e = r.unwrap_err();
    assert!(matches!(e, AuthorizeError::Denied(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "the provider refused the authorization (invalid_scope: AADSTS70011: The provided value for the input parameter 'scope' is not valid. \
         The scope 'https://mail.google.com/' is not valid.): the provider does not accept the scopes \
         [\"https://mail.google.com/\", \"offline_access\"]: fix `scopes` for account \"m365\" \
         (Microsoft 365's SMTP needs \"https://outlook.office.com/SMTP.Send\" and \"offline_access\"; remove `scopes` to use them); \
         nothing was saved"
    );
    assert!(!dir.path().join("tokens/sandbox.json").exists());
}

#[tokio::test]
async fn microsoft_unknown_code_reads_cleanly() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = microsoft_config(dir.path(), &sb, "");
    let (r, _) = paste_run_with(cfg, sb.microsoft_url(TENANT, "authorize"), |u| {
        let u = reqwest::Url::parse(&u).unwrap();
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| match k.as_ref() {
                "code" => (k.into_owned(), "1.AQsandbox-not-issued".to_owned()),
                _ => (k.into_owned(), v.into_owned()),
            })
            .collect();
        let mut u = u.clone();
        u.query_pairs_mut().clear().extend_pairs(pairs);
        u.to_string()
    })
    .await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with(
            "the token endpoint refused the authorization code (invalid_grant: AADSTS70000: \
             The provided value for the 'code' parameter is not valid.). Codes are single-use"
        ),
        "{e}"
    );
    assert!(!e.contains("Trace ID"), "{e}");
}

/// A `/authorize` URL for the sandbox's Microsoft endpoint, and its verifier.
fn microsoft_auth_request(sb: &Sandbox, redirect: &str, scope: &str) -> (String, String) {
    let verifier = "m".repeat(50);
    let challenge = oauth2::PkceCodeChallenge::from_code_verifier_sha256(
        &oauth2::PkceCodeVerifier::new(verifier.clone()),
    );
    let mut url = reqwest::Url::parse(&sb.microsoft_url(TENANT, "authorize")).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &sb.client_id)
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", scope)
        .append_pair("state", "s1")
        .append_pair("code_challenge", challenge.as_str())
        .append_pair("code_challenge_method", "S256")
        // Google-only: ignored.
        .append_pair("access_type", "offline");
    (url.to_string(), verifier)
}

async fn microsoft_exchange(
    sb: &Sandbox,
    code: &str,
    redirect: &str,
    verifier: &str,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(sb.microsoft_url(TENANT, "token"))
        .basic_auth(&sb.client_id, Some(&sb.client_secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
            ("scope", &format!("{SMTP_SEND} offline_access")),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Microsoft's error shape: `error`, an AADSTS description with its trailer lines,
/// `error_codes`, `timestamp`, `trace_id`, `correlation_id`.
fn assert_microsoft_error(body: &serde_json::Value, error: &str, code: u64) {
    assert_eq!(body["error"], error, "{body}");
    let d = body["error_description"].as_str().unwrap();
    assert!(d.starts_with(&format!("AADSTS{code}: ")), "{body}");
    assert!(
        d.contains("\r\nTrace ID: ")
            && d.contains("\r\nCorrelation ID: ")
            && d.contains("\r\nTimestamp: "),
        "{body}"
    );
    assert_eq!(body["error_codes"], serde_json::json!([code]), "{body}");
    for key in ["timestamp", "trace_id", "correlation_id"] {
        assert!(
            body[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}: {body}"
        );
    }
    assert!(d.contains(body["trace_id"].as_str().unwrap()), "{body}");
}

#[tokio::test]
async fn sandbox_plays_microsofts_v2_endpoints() {
    let sb = sandbox().await;
    let redirect = "http://127.0.0.1:4567/";
    let scopes = format!("{SMTP_SEND} offline_access");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let query = |location: &str| -> std::collections::HashMap<String, String> {
        reqwest::Url::parse(location)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect()
    };

    // A redirect URI the app does not allow: Microsoft's page, no redirect.
    let (url, _) = microsoft_auth_request(&sb, "https://evil.example/cb", &scopes);
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("AADSTS50011: The redirect URI 'https://evil.example/cb' specified in the request does not match"),
        "{page}"
    );
    // Google's scope: sent back to the redirect URI as invalid_scope / AADSTS70011.
    let (url, _) = microsoft_auth_request(&sb, redirect, "https://mail.google.com/ offline_access");
    let back = query(&redirected_to(&url).await);
    assert_eq!(back["error"], "invalid_scope");
    assert_eq!(back["state"], "s1");
    assert!(
        back["error_description"].starts_with(
            "AADSTS70011: The provided value for the input parameter 'scope' is not valid."
        ) && back["error_description"].contains("\r\nTrace ID: "),
        "{back:?}"
    );
    // The user declines consent.
    sb.control.deny_next_authorizations(1);
    let (url, _) = microsoft_auth_request(&sb, redirect, &scopes);
    let back = query(&redirected_to(&url).await);
    assert_eq!(back["error"], "access_denied");
    assert!(
        back["error_description"].starts_with("AADSTS65004: "),
        "{back:?}"
    );

    // Wrong code_verifier: AADSTS501481, and the code is spent (AADSTS54005).
    let (url, verifier) = microsoft_auth_request(&sb, redirect, &scopes);
    let back = query(&redirected_to(&url).await);
    assert!(
        back.contains_key("session_state") && !back.contains_key("scope"),
        "{back:?}"
    );
    let code = back["code"].clone();
    let (s, body) = microsoft_exchange(&sb, &code, redirect, &"w".repeat(50)).await;
    assert_eq!(s, 400);
    assert_microsoft_error(&body, "invalid_grant", 501481);
    let (s, body) = microsoft_exchange(&sb, &code, redirect, &verifier).await;
    assert_eq!(s, 400);
    assert_microsoft_error(&body, "invalid_grant", 54005);
    // Another redirect URI than the authorization request's.
    let code = code_of(&redirected_to(&url).await);
    let (s, body) = microsoft_exchange(&sb, &code, "http://127.0.0.1:4568/", &verifier).await;
    assert_eq!(s, 400);
    assert_microsoft_error(&body, "invalid_grant", 500112);

    // The good exchange: Microsoft's reply, with a refresh token for offline_access
    // (access_type=offline was ignored).
    let code = code_of(&redirected_to(&url).await);
    let (s, body) = microsoft_exchange(&sb, &code, redirect, &verifier).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["scope"], SMTP_SEND);
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["ext_expires_in"].as_u64().is_some(), "{body}");
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();

    // Without offline_access: no refresh token, even with prompt=consent.
    let (url, verifier) = microsoft_auth_request(&sb, redirect, SMTP_SEND);
    let code = code_of(&redirected_to(&format!("{url}&prompt=consent")).await);
    let (s, body) = microsoft_exchange(&sb, &code, redirect, &verifier).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");

    // A refresh returns a new refresh token; a revoked one gets AADSTS50173.
    let refresher = OAuth2Refresher::new(
        sb.client_id.clone(),
        Some(SecretString::from(sb.client_secret.clone())),
        sb.microsoft_url(TENANT, "token"),
    )
    .unwrap();
    let grant = refresher
        .refresh(Some(&SecretString::from(refresh.clone())))
        .await
        .unwrap();
    let new = grant
        .refresh_token
        .expect("Microsoft rotates refresh tokens");
    assert_ne!(new.expose_secret(), refresh);
    sb.control.revoke_refresh_tokens();
    let r = reqwest::Client::new()
        .post(sb.microsoft_url(TENANT, "token"))
        .basic_auth(&sb.client_id, Some(&sb.client_secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_microsoft_error(&r.json().await.unwrap(), "invalid_grant", 50173);
    // A wrong client secret: AADSTS7000215.
    let r = reqwest::Client::new()
        .post(sb.microsoft_url(TENANT, "token"))
        .basic_auth(&sb.client_id, Some("wrong"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_microsoft_error(&r.json().await.unwrap(), "invalid_client", 7000215);
}
