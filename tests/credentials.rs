//! Accounts that need no browser and no refresh token, end to end over loopback: a
//! Google Workspace service account (JWT bearer grant, signature verified by the sandbox,
//! `sub` = the mailbox) and Microsoft 365 client credentials (app-only). Also what the
//! operator sees when the admin side is not done: 454 to senders, one log line with the
//! fix, and recovery without a restart once it is.

mod support;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use smtp_oauth_relay::{
    config::{Config, Credential},
    daemon::Daemon,
    demo::{write_relay_config, RelayConfigOptions},
    oauth::{status_with, TokenStore},
};
use support::{init_logging, logs, message, Client, Sandbox, SandboxOptions};

fn private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// The sandbox relay config with the client/refresh-token lines replaced by `credential`
/// lines; the token file starts absent.
fn config_with(sb: &Sandbox, dir: &Path, provider: &str, credential: &str) -> std::path::PathBuf {
    let path = write_relay_config(
        sb,
        dir,
        &RelayConfigOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            hostname: "relay.test",
            provider,
            pool_size: 1,
            server_extra: "",
            account_extra: credential,
        },
    )
    .unwrap();
    std::fs::remove_file(dir.join("sandbox-token.json")).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    if credential.contains("service_account_json") {
        text = text
            .lines()
            .filter(|l| !l.starts_with("client_id") && !l.starts_with("client_secret"))
            .collect::<Vec<_>>()
            .join("\n");
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// A service-account config for `sb`: the key written to `<dir>/sa.json` (returned
/// first), `extra` lines added to the account.
fn service_account_config(sb: &Sandbox, dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let key = dir.join("sa.json");
    private(&key, &sb.control.service_account_json().unwrap());
    let path = config_with(
        sb,
        dir,
        "gmail",
        &format!("service_account_json = \"{}\"\n{extra}", key.display()),
    );
    (key, path)
}

/// Waits until senders are told the token is refused, for a reason containing `why`.
async fn refusal_published(daemon: &Daemon, why: &str) {
    wait_until(
        "the refusal published to senders",
        Duration::from_secs(10),
        || {
            daemon
                .tokens
                .current()
                .is_err_and(|e| e.reason.contains(why))
        },
    )
    .await;
}

/// A Microsoft 365 app-only account (client credentials) against the sandbox.
fn microsoft_app_config(sb: &Sandbox, dir: &Path) -> std::path::PathBuf {
    config_with(
        sb,
        dir,
        "microsoft",
        "credential = \"client_credentials\"\ntenant = \"contoso.example\"",
    )
}

async fn sandbox(lifetime: Duration) -> Sandbox {
    init_logging();
    Sandbox::start(SandboxOptions {
        token_lifetime: lifetime,
        ..SandboxOptions::default()
    })
    .await
    .unwrap()
}

async fn send(addr: std::net::SocketAddr, sb: &Sandbox, id: &str) -> support::Reply {
    let mut c = Client::ehlo(addr).await;
    c.send_mail(&sb.username, &["to@example.org"], &message(id, "hello\r\n"))
        .await
}

/// Polls `done` until it holds; fails with `what` and the logs after `within`.
async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {within:?}; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a valid token, tolerating published failures while the manager retries.
async fn token_ready(daemon: &Daemon, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while daemon.tokens.ready(Duration::from_secs(1)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token within {within:?}; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_sends_as_the_mailbox_with_no_refresh_token() {
    let sb = sandbox(Duration::from_secs(3599)).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = service_account_config(&sb, dir.path(), "");
    let config = Config::load(&path).unwrap();
    assert!(matches!(
        &config.accounts[0].credential,
        Credential::ServiceAccount { client_email, .. } if client_email.ends_with(".iam.gserviceaccount.com")
    ));
    let account = config.accounts[0].clone();
    let daemon = Daemon::start(config).await.unwrap();
    token_ready(&daemon, Duration::from_secs(20)).await;

    let r = send(daemon.local_addrs[0], &sb, "sa-1").await;
    assert_eq!(r.code, 250, "{r}");
    let got = sb
        .control
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].auth_user, sb.username, "XOAUTH2 user is the mailbox");

    // The token file was created, private, with the access token and no refresh token.
    let store = TokenStore::without_refresh_token(account.token_file.clone());
    // Saved just after the token is published.
    wait_until("the token file written", Duration::from_secs(10), || {
        store.mode().is_some()
    })
    .await;
    assert_eq!(store.mode(), Some(0o600));
    let file = store.load().unwrap();
    assert!(file.refresh_token.is_none() && file.access_token.is_some());
    let st = status_with(
        &store,
        file.last_refresh_at.unwrap(),
        account.provider_hint(),
        account.credential.kind(),
    )
    .unwrap();
    assert_eq!(st.credential, "service_account");
    assert!(st.warnings.is_empty(), "{:?}", st.warnings);
    assert!(st.to_string().contains("service account"), "{st}");
    let text = std::fs::read_to_string(&account.token_file).unwrap();
    assert!(!text.contains("PRIVATE KEY"));
    assert!(account
        .authorize_refusal()
        .unwrap()
        .contains("no authorization"));
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_delegation_gets_454_and_one_fix_then_recovers_without_restart() {
    let sb = sandbox(Duration::from_secs(3599)).await;
    sb.control.set_domain_wide_delegation(false);
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = service_account_config(&sb, dir.path(), "");
    let daemon = Daemon::start(Config::load(&path).unwrap()).await.unwrap();
    // The first attempt fails with 401 unauthorized_client.
    refusal_published(&daemon, "unauthorized_client").await;
    let r = send(daemon.local_addrs[0], &sb, "sa-2").await;
    assert_eq!(r.code, 454, "{r}");
    assert!(r.text().contains("domain-wide delegation"), "{r}");
    let log = logs();
    assert!(
        log.contains("Manage Domain Wide Delegation") && log.contains("https://mail.google.com/"),
        "{log}"
    );
    assert!(
        !log.contains("smtp-oauth-relay authorize"),
        "no authorize hint for a service account: {log}"
    );

    // The admin adds the delegation: the manager's retry picks it up.
    sb.control.set_domain_wide_delegation(true);
    token_ready(&daemon, Duration::from_secs(30)).await;
    let r = send(daemon.local_addrs[0], &sb, "sa-3").await;
    assert_eq!(r.code, 250, "{r}");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_is_reported_and_a_replaced_key_file_is_read_without_restart() {
    // Tokens live 4 s, so the manager refreshes about every 2 s.
    let sb = sandbox(Duration::from_secs(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, path) = service_account_config(&sb, dir.path(), "refresh_margin_secs = 2");
    let daemon = Daemon::start(Config::load(&path).unwrap()).await.unwrap();
    token_ready(&daemon, Duration::from_secs(20)).await;

    sb.control.delete_service_account_key();
    wait_until(
        "Invalid JWT Signature in the log",
        Duration::from_secs(15),
        || logs().contains("Invalid JWT Signature"),
    )
    .await;
    assert!(logs().contains("create a new key"), "{}", logs());

    // A new key, written over the old file: the next attempt reads it.
    private(&key, &sb.control.service_account_json().unwrap());
    let issued = sb.control.token_stats().tokens_issued;
    wait_until("a token for the new key", Duration::from_secs(30), || {
        sb.control.token_stats().tokens_issued > issued
    })
    .await;
    token_ready(&daemon, Duration::from_secs(10)).await;
    let r = send(daemon.local_addrs[0], &sb, "sa-4").await;
    assert_eq!(r.code, 250, "{r}");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_client_credentials_send_app_only() {
    let sb = sandbox(Duration::from_secs(3599)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = microsoft_app_config(&sb, dir.path());
    let config = Config::load(&path).unwrap();
    assert_eq!(config.accounts[0].credential, Credential::ClientCredentials);
    assert_eq!(
        config.accounts[0].scopes,
        vec!["https://outlook.office365.com/.default".to_owned()]
    );
    let daemon = Daemon::start(config).await.unwrap();
    token_ready(&daemon, Duration::from_secs(20)).await;
    let r = send(daemon.local_addrs[0], &sb, "app-1").await;
    assert_eq!(r.code, 250, "{r}");
    assert_eq!(
        sb.control
            .wait_for_messages(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_client_credentials_with_a_wrong_secret_name_the_aadsts_fix() {
    let sb = sandbox(Duration::from_secs(3599)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = microsoft_app_config(&sb, dir.path());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&sb.client_secret, "the-secret-id-not-its-value");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::start(Config::load(&path).unwrap()).await.unwrap();
    refusal_published(&daemon, "client credentials").await;
    let r = send(daemon.local_addrs[0], &sb, "app-2").await;
    assert_eq!(r.code, 454, "{r}");
    let log = logs();
    assert!(
        log.contains("the client secret is wrong (give its Value, not its Secret ID)"),
        "{log}"
    );
    assert!(
        !log.contains(&sb.client_secret) && !log.contains("the-secret-id-not-its-value"),
        "{log}"
    );
    daemon.shutdown().await;
}
