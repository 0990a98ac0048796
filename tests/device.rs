//! `smtp-oauth-relay authorize --device` (RFC 8628) end to end over loopback, against the
//! sandbox's device authorization endpoint configured like Microsoft 365 (provider
//! "microsoft", a public client without a secret): the printed verification URI and user
//! code, polling through `authorization_pending` and `slow_down` until the test approves
//! the code, the token file written 0600 with a refresh token the token endpoint accepts;
//! and the failures: declined, expired, no `offline_access`, Gmail.

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use secrecy::ExposeSecret;
use smtp_oauth_relay::{
    config::Config,
    oauth::{
        authorize::AuthorizeError,
        device::{run_device_with, DeviceOptions},
        OAuth2Refresher, Refresher, TokenStore,
    },
    sandbox::{Sandbox, SandboxOptions},
};

/// Waits between polls are a tenth of what the provider asks (1 s interval, +5 s per
/// `slow_down`), so a test takes about a second.
const SCALE: f64 = 0.1;

async fn sandbox() -> Sandbox {
    let sb = Sandbox::start(SandboxOptions::default()).await.unwrap();
    sb.control.allow_public_client(true);
    sb.control.set_device_polling(1, Duration::from_millis(300));
    sb
}

/// A Microsoft account pointed at the sandbox, without a client secret.
fn config(dir: &Path, sb: &Sandbox, extra: &str) -> Config {
    let text = format!(
        "[[account]]\nname = \"m365\"\nprovider = \"microsoft\"\nusername = {:?}\nclient_id = {:?}\n\
         token_url = {:?}\ndevice_auth_url = {:?}\ntoken_file = \"tokens/m365.json\"\n{extra}",
        sb.username, sb.client_id, sb.token_url, sb.device_auth_url
    );
    Config::from_toml(&text, &dir.join("config.toml")).unwrap()
}

#[derive(Clone, Default)]
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn opts() -> DeviceOptions {
    DeviceOptions {
        timeout: Some(Duration::from_secs(20)),
        poll_scale: SCALE,
    }
}

/// The user code the sandbox issued, once there is one.
async fn user_code(sb: &Sandbox) -> String {
    for _ in 0..200 {
        if let Some(c) = sb.control.pending_user_codes().pop() {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no device code was requested");
}

/// Waits until the polls seen so far satisfy `done`.
async fn polls_until(sb: &Sandbox, done: impl Fn(&[&str]) -> bool) -> Vec<&'static str> {
    for _ in 0..1000 {
        let seen = sb.control.device_poll_outcomes();
        if done(&seen) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("polls: {:?}", sb.control.device_poll_outcomes());
}

#[tokio::test]
async fn device_flow_pending_slow_down_then_approved() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let screen = Screen::default();
    let mut out = screen.clone();
    let run = tokio::spawn(async move { run_device_with(&cfg, None, opts(), &mut out).await });

    let code = user_code(&sb).await;
    // Polled every 100 ms against a 300 ms minimum gap: the second poll gets slow_down,
    // after which the client waits longer and gets authorization_pending again.
    let seen = polls_until(&sb, |p| {
        p.iter()
            .position(|o| *o == "slow_down")
            .is_some_and(|i| p[i..].contains(&"authorization_pending"))
    })
    .await;
    assert_eq!(seen[0], "authorization_pending", "{seen:?}");
    let text = screen.text();
    assert!(
        text.contains(&code)
            && text.contains(&format!(
                "{}/device",
                sb.token_url.trim_end_matches("/token")
            )),
        "{text}"
    );
    assert!(sb.control.approve_device(&code));

    let done = run.await.unwrap().unwrap();
    assert_eq!(sb.control.device_poll_outcomes().last(), Some(&"ok"));
    assert_eq!(done.account, "m365");
    assert_eq!(done.token_file, dir.path().join("tokens/m365.json"));
    let meta = std::fs::metadata(&done.token_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let file = TokenStore::new(done.token_file.clone()).load().unwrap();
    assert_eq!(
        file.refresh_token.as_ref().unwrap().expose_secret(),
        sb.control.current_refresh_token()
    );
    assert_eq!(file.expires_at, Some(done.expires_at));
    // The public client refreshes with it, no secret.
    let refresher = OAuth2Refresher::new(sb.client_id.clone(), None, sb.token_url.clone()).unwrap();
    refresher
        .refresh(file.refresh_token.as_ref())
        .await
        .unwrap();

    let text = screen.text();
    assert!(text.contains("Saved a new refresh token"), "{text}");
    assert!(text.contains("Authenticated SMTP"), "{text}");
    assert!(
        !text.contains(file.refresh_token.as_ref().unwrap().expose_secret()),
        "{text}"
    );
    assert!(
        !text.contains(file.access_token.unwrap().expose_secret()),
        "{text}"
    );
    assert!(
        !text.contains("DAQABAAEAAAD-sandbox-"),
        "device code printed: {text}"
    );
}

#[tokio::test]
async fn forced_slow_down_is_obeyed() {
    let sb = sandbox().await;
    sb.control.slow_down_next_device_polls(2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let run =
        tokio::spawn(
            async move { run_device_with(&cfg, None, opts(), &mut Screen::default()).await },
        );
    let code = user_code(&sb).await;
    polls_until(&sb, |p| p.len() >= 3).await;
    assert!(sb.control.approve_device(&code));
    run.await.unwrap().unwrap();
    let seen = sb.control.device_poll_outcomes();
    assert_eq!(&seen[..2], ["slow_down", "slow_down"], "{seen:?}");
    // After two slow_downs the client waits (1 + 5 + 5) s × SCALE between polls: never
    // too fast for the 300 ms gap again.
    assert!(!seen[2..].contains(&"slow_down"), "{seen:?}");
    assert_eq!(seen.last(), Some(&"ok"));
}

#[tokio::test]
async fn declined_sign_in_saves_nothing() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    let run =
        tokio::spawn(
            async move { run_device_with(&cfg, None, opts(), &mut Screen::default()).await },
        );
    let code = user_code(&sb).await;
    assert!(sb.control.deny_device(&code));
    let e = run.await.unwrap().unwrap_err();
    assert!(matches!(e, AuthorizeError::Denied(_)), "{e}");
    assert!(e.to_string().contains("declined"), "{e}");
    assert!(!dir.path().join("tokens/m365.json").exists());
}

#[tokio::test]
async fn expired_code_is_a_clear_error() {
    let sb = sandbox().await;
    sb.control
        .set_device_code_lifetime(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &sb, "");
    // Waits at full length would outlive the code; polls at 1 s find it expired.
    let opts = DeviceOptions {
        timeout: Some(Duration::from_secs(20)),
        poll_scale: 1.0,
    };
    let e = run_device_with(&cfg, None, opts, &mut Screen::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expired") && e.contains("authorize --device"),
        "{e}"
    );
    assert!(!dir.path().join("tokens/m365.json").exists());
}

#[tokio::test]
async fn no_offline_access_means_no_refresh_token() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &sb,
        "scopes = [\"https://outlook.office.com/SMTP.Send\"]\n",
    );
    let run =
        tokio::spawn(
            async move { run_device_with(&cfg, None, opts(), &mut Screen::default()).await },
        );
    let code = user_code(&sb).await;
    assert!(sb.control.approve_device(&code));
    let e = run.await.unwrap().unwrap_err().to_string();
    assert!(
        e.contains("offline_access") && e.contains("no refresh token"),
        "{e}"
    );
    assert!(!dir.path().join("tokens/m365.json").exists());
}

#[tokio::test]
async fn gmail_has_no_device_flow_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::from_toml(
        "[[account]]\nname = \"g\"\nusername = \"me@example.com\"\nclient_id = \"x.apps.googleusercontent.com\"\nclient_secret = \"s\"\ntoken_file = \"t.json\"\n",
        &dir.path().join("config.toml"),
    )
    .unwrap();
    let e = run_device_with(&cfg, None, opts(), &mut Screen::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("https://mail.google.com/") && e.contains("--no-browser"),
        "{e}"
    );
}

#[tokio::test]
async fn sandbox_device_endpoint_checks_the_client() {
    let sb = sandbox().await;
    let http = reqwest::Client::new();
    let r = http
        .post(&sb.device_auth_url)
        .form(&[("client_id", "someone-else"), ("scope", "offline_access")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(&sb.device_auth_url)
        .form(&[("client_id", sb.client_id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "scope is required");
    // An unknown device code.
    let r = http
        .post(&sb.token_url)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("client_id", sb.client_id.as_str()),
            ("device_code", "nonsense"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid_grant"));
    // A wrong secret is refused even though public clients are allowed.
    let r = http
        .post(&sb.token_url)
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("client_id", sb.client_id.as_str()),
            ("client_secret", "wrong"),
            ("device_code", "nonsense"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
