//! Several accounts: each message leaves through the account its envelope sender routes
//! to (two sandbox "providers" here), and a sender no account takes is refused at MAIL.

mod support;

use std::time::Duration;

use smtp_oauth_relay::{config::Config, daemon::Daemon};
use support::{init_logging, message, Client, Sandbox, SandboxOptions};

/// An `[[account]]` table for `sb`, its token and CA files written into `dir`.
fn account(sb: &Sandbox, dir: &std::path::Path, name: &str, extra: &str) -> String {
    let token = dir.join(format!("{name}.json"));
    std::fs::write(
        &token,
        format!("{{\"refresh_token\":\"{}\"}}", sb.refresh_token),
    )
    .unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, &sb.ca_pem).unwrap();
    format!(
        "[[account]]\nname = \"{name}\"\nprovider = \"custom\"\nusername = \"{user}\"\nclient_id = \"{id}\"\n\
         client_secret = \"{secret}\"\ntoken_file = \"{token}\"\nsmtp_host = \"{ip}\"\nsmtp_port = {port}\n\
         tls_server_name = \"{tls}\"\ntoken_url = \"{url}\"\nca_file = \"{ca}\"\npool_size = 1\n{extra}\n",
        user = sb.username,
        id = sb.client_id,
        secret = sb.client_secret,
        token = token.display(),
        ip = sb.smtp_addr.ip(),
        port = sb.smtp_addr.port(),
        tls = sb.tls_server_name,
        url = sb.token_url,
        ca = ca.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sender_leaves_through_its_own_account() {
    init_logging();
    let start = |user: &str| {
        Sandbox::start(SandboxOptions {
            username: Some(user.to_owned()),
            ..SandboxOptions::default()
        })
    };
    let sales = start("sales@corp.example").await.unwrap();
    let ops = start("ops@corp.example").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"relay.test\"\n\n{}{}",
        account(
            &sales,
            dir.path(),
            "sales",
            "senders = [\"erp@corp.example\"]"
        ),
        account(
            &ops,
            dir.path(),
            "ops",
            "senders = [\"@monitoring.example\"]"
        ),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let daemon = Daemon::start(Config::load(&path).unwrap()).await.unwrap();
    let addr = daemon.local_addrs[0];

    let mut c = Client::ehlo(addr).await;
    let r = c
        .send_mail(
            "erp@corp.example",
            &["a@example.org"],
            &message("erp", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "{r}");
    let r = c
        .send_mail(
            "nagios@monitoring.example",
            &["b@example.org"],
            &message("mon", "x\r\n"),
        )
        .await;
    assert_eq!(r.code, 250, "{r}");
    // Nobody takes this sender, and there is no default: refused at MAIL, with the fix.
    let r = c.cmd("MAIL FROM:<stranger@elsewhere.example>").await;
    assert_eq!(r.code, 550, "{r}");
    assert!(
        r.text().starts_with("5.7.1") && r.text().contains("default = true"),
        "{r}"
    );
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let s = sales
        .control
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    let o = ops
        .control
        .wait_for_messages(1, Duration::from_secs(10))
        .await;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].mail_from, "erp@corp.example");
    assert_eq!(s[0].auth_user, sales.username);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].mail_from, "nagios@monitoring.example");
    daemon.shutdown().await;
}
