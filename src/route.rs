//! Routing by envelope sender when several `[[account]]`s are configured: each message
//! goes through the account whose `username` or `senders` list names the sender exactly,
//! else the one listing the sender's `@domain`, else the account marked `default = true`.
//! With a single account, everything goes through it, as before there were several.

use std::sync::Arc;

use crate::{
    config::AccountConfig,
    envelope::Envelope,
    reply::Reply,
    spool::{RouteKey, Transport},
    upstream::{SendReport, UpstreamError, UpstreamPool},
};

/// One account's way out.
pub struct Route {
    pub account: String,
    /// The upstream host (logs, DSN Remote-MTA).
    pub host: String,
    pub pool: UpstreamPool,
    exact: Vec<String>,
    domains: Vec<String>,
}

/// Every account's pool, and the rule that picks one per message. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    routes: Arc<Vec<Route>>,
    /// Takes senders nobody claims: the `default = true` account, or the only one.
    default: Option<usize>,
}

impl Upstreams {
    /// `accounts` and `pools` in the same order.
    pub fn new(accounts: &[AccountConfig], pools: Vec<UpstreamPool>) -> Self {
        let routes: Vec<Route> = accounts
            .iter()
            .zip(pools)
            .map(|(a, pool)| {
                let mut exact = vec![a.username.to_ascii_lowercase()];
                let mut domains = Vec::new();
                for p in &a.senders {
                    match p.strip_prefix('@') {
                        Some(d) => domains.push(d.to_owned()),
                        None => exact.push(p.clone()),
                    }
                }
                Route {
                    account: a.name.clone(),
                    host: a.smtp_host.clone(),
                    pool,
                    exact,
                    domains,
                }
            })
            .collect();
        let default = accounts
            .iter()
            .position(|a| a.default)
            .or((routes.len() == 1).then_some(0));
        Upstreams {
            routes: Arc::new(routes),
            default,
        }
    }

    /// The route for `sender` (the null sender `<>` goes the default way, else the first
    /// account's).
    pub fn route(&self, sender: &str) -> Option<&Route> {
        let sender = sender.to_ascii_lowercase();
        if sender.is_empty() {
            return self.routes.get(self.default.unwrap_or(0));
        }
        let domain = sender.rsplit_once('@').map(|(_, d)| d);
        self.routes
            .iter()
            .find(|r| r.exact.contains(&sender))
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| domain.is_some_and(|d| r.domains.iter().any(|x| x == d)))
            })
            .or_else(|| self.default.and_then(|i| self.routes.get(i)))
    }

    /// The reply for a MAIL FROM no account takes, if so.
    pub fn refuse_sender(&self, sender: &str) -> Option<Reply> {
        self.route(sender).is_none().then(|| {
            UpstreamError::NoRoute {
                sender: sender.to_owned(),
            }
            .reply()
        })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// QUITs every pool's idle connections.
    pub async fn close(&self) {
        for r in self.routes.iter() {
            r.pool.close().await;
        }
    }
}

impl Transport for Upstreams {
    async fn send(&self, envelope: &Envelope, data: &[u8]) -> Result<SendReport, UpstreamError> {
        match self.route(&envelope.sender) {
            Some(r) => r.pool.send(envelope, data).await,
            None => Err(UpstreamError::NoRoute {
                sender: envelope.sender.clone(),
            }),
        }
    }

    /// The account's name: the spool holds each account apart.
    fn route_key(&self, sender: &str) -> Option<RouteKey> {
        self.route(sender)
            .map(|r| RouteKey::from(r.account.as_str()))
    }

    /// The account's SMTP host: a DSN names the server that refused.
    fn upstream_host(&self, sender: &str) -> Option<String> {
        self.route(sender).map(|r| r.host.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::{config::Config, oauth::TokenHandle, upstream::UpstreamSettings};

    fn upstreams(accounts_toml: &str) -> Upstreams {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:2525\"]\nhostname = \"r.test\"\n{accounts_toml}"
        );
        let config = Config::from_toml(&text, Path::new("/etc/x.toml")).unwrap();
        let tls = crate::tls::client_config(None).unwrap();
        let pools = config
            .accounts
            .iter()
            .map(|a| {
                let s = UpstreamSettings::new(
                    a.smtp_host.clone(),
                    587,
                    "r.test",
                    a.username.clone(),
                    tls.clone(),
                );
                UpstreamPool::new(s, TokenHandle::fixed("t", Duration::from_secs(60)))
            })
            .collect();
        Upstreams::new(&config.accounts, pools)
    }

    fn account(name: &str, user: &str, extra: &str) -> String {
        format!(
            "[[account]]\nname = \"{name}\"\nprovider = \"custom\"\nusername = \"{user}\"\nclient_id = \"c\"\n\
             token_file = \"/t/{name}.json\"\nsmtp_host = \"{name}.example\"\ntoken_url = \"https://t.example/token\"\n{extra}\n"
        )
    }

    fn via(u: &Upstreams, sender: &str) -> Option<String> {
        u.route(sender).map(|r| r.account.clone())
    }

    #[test]
    fn exact_then_domain_then_default() {
        let u = upstreams(&format!(
            "{}{}{}",
            account(
                "sales",
                "sales@corp.example",
                "senders = [\"erp@corp.example\"]"
            ),
            account(
                "it",
                "it@corp.example",
                "senders = [\"@corp.example\", \"@printers.example\"]"
            ),
            account("fallback", "relay@other.example", "default = true"),
        ));
        assert_eq!(
            via(&u, "Sales@Corp.Example").as_deref(),
            Some("sales"),
            "username, any case"
        );
        assert_eq!(
            via(&u, "erp@corp.example").as_deref(),
            Some("sales"),
            "listed address"
        );
        assert_eq!(
            via(&u, "cron@corp.example").as_deref(),
            Some("it"),
            "exact beats domain, domain next"
        );
        assert_eq!(via(&u, "scanner@printers.example").as_deref(), Some("it"));
        assert_eq!(
            via(&u, "someone@elsewhere.example").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            via(&u, "").as_deref(),
            Some("fallback"),
            "null sender: the default"
        );
        assert!(u.refuse_sender("someone@elsewhere.example").is_none());
    }

    #[test]
    fn without_default_an_unknown_sender_is_refused_550_5_7_1() {
        let u = upstreams(&format!(
            "{}{}",
            account("a", "a@one.example", ""),
            account("b", "b@two.example", "senders = [\"@two.example\"]"),
        ));
        assert_eq!(via(&u, "x@two.example").as_deref(), Some("b"));
        assert!(via(&u, "x@three.example").is_none());
        let r = u.refuse_sender("x@three.example").unwrap();
        assert_eq!((r.code, r.esc), (550, Some([5, 7, 1])));
        assert!(
            r.text.contains("x@three.example") && r.text.contains("default = true"),
            "{r}"
        );
        assert_eq!(
            via(&u, "").as_deref(),
            Some("a"),
            "null sender: the first account"
        );
        // The spool holds each account apart, by the same rule.
        assert_eq!(u.route_key("x@two.example").as_deref(), Some("b"));
        assert_eq!(u.route_key("").as_deref(), Some("a"));
        assert!(u.route_key("x@three.example").is_none());
    }

    #[test]
    fn a_single_account_takes_every_sender() {
        let u = upstreams(&account("only", "me@one.example", ""));
        assert_eq!(via(&u, "anyone@anywhere.example").as_deref(), Some("only"));
        assert!(u.refuse_sender("anyone@anywhere.example").is_none());
    }
}
