//! `smtp-oauth-relay authorize --device`: the OAuth 2.0 device authorization grant
//! (RFC 8628), the natural choice for Microsoft 365 on a headless server. It asks the
//! provider's device endpoint for a user code, prints the verification URI and the code
//! (the user signs in on any device), polls the token endpoint as the provider allows
//! (`authorization_pending`, `slow_down` handled by the `oauth2` crate) and writes the
//! token file exactly as the code flow does ([`save_tokens`]: atomic, 0600).
//!
//! It works for any account with a device authorization URL: provider "microsoft" has
//! one by default, "custom" takes `device_auth_url`. Google's device flow does not allow
//! the `https://mail.google.com/` scope, so Gmail is refused with that explanation. The
//! device code and the tokens are never printed or logged; the user code is shown, as it
//! must be (it is short-lived and useless without the device code).

use std::{io::Write, time::Duration};

use oauth2::{
    basic::{BasicClient, BasicErrorResponseType},
    ClientId, ClientSecret, DeviceAuthorizationUrl, DeviceCodeErrorResponseType, HttpClientError,
    RequestTokenError, Scope, StandardDeviceAuthorizationResponse, StandardErrorResponse,
    TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};

use super::{
    authorize::{
        error_chain, http_client, minutes, prepare_token_dir, report_saved, save_tokens,
        AuthorizeError, Authorized, NewTokens, NOT_ECHOED_SCOPES,
    },
    refresh::{one_line, DEFAULT_EXPIRES_IN},
    store::TokenStore,
};
use crate::config::{AccountConfig, Config, Provider};

/// Options of `authorize --device`.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Stop waiting after this long even if the device code is still valid (`None`: as
    /// long as the provider's `expires_in`).
    pub timeout: Option<Duration>,
    /// Multiplies every wait between polls. 1.0 in real use; tests shorten the waits
    /// (the provider's `interval` is whole seconds, and `slow_down` adds 5).
    pub poll_scale: f64,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            timeout: None,
            poll_scale: 1.0,
        }
    }
}

type RequestError<T> = RequestTokenError<HttpClientError<reqwest::Error>, StandardErrorResponse<T>>;

/// The device endpoint of `acct`, or why there is none.
fn device_url(acct: &AccountConfig) -> Result<String, AuthorizeError> {
    let not_configured = |problem: String| AuthorizeError::NotConfigured {
        account: acct.name.clone(),
        key: "device_auth_url",
        problem,
    };
    match (&acct.device_auth_url, acct.provider) {
        (Some(u), _) => Ok(u.clone()),
        (None, Provider::Gmail) => Err(not_configured(
            "is not available for Gmail: Google's device flow (\"TV and limited input\" clients) does not allow the https://mail.google.com/ scope that SMTP needs. Use `authorize --no-browser` instead: open the URL on any machine and paste back the address it ends on".to_owned(),
        )),
        (None, _) => Err(not_configured(
            "is required for `authorize --device` with provider \"custom\": set it to the provider's device authorization endpoint (RFC 8628), or use `authorize` without --device".to_owned(),
        )),
    }
}

/// What an AADSTS code in a Microsoft error description means for this command.
fn aad_hint(description: &str) -> &'static str {
    let hints: [(&str, &str); 7] = [
        ("AADSTS7000218", "; the app registration does not allow public clients: in the Microsoft Entra admin center → App registrations → the app → Authentication, set \"Allow public client flows\" to Yes (or give the account a client_secret)"),
        ("AADSTS50194", "; the app registration is single-tenant: set the account's `tenant` to its Directory (tenant) ID (App registrations → the app → Overview)"),
        ("AADSTS700016", "; no application with this client_id exists in the tenant: check client_id (the Application (client) ID) and `tenant`"),
        ("AADSTS65001", "; nobody has consented to the app's permissions: grant admin consent for SMTP.Send and offline_access (App registrations → API permissions), or let the user consent"),
        ("AADSTS70011", "; the scopes are not valid for Microsoft: they should be https://outlook.office.com/SMTP.Send and offline_access"),
        ("AADSTS50076", "; the tenant requires multi-factor authentication: complete it during sign-in"),
        ("AADSTS53003", "; a Conditional Access policy blocked the sign-in: ask the tenant's admin"),
    ];
    hints
        .iter()
        .find(|(code, _)| description.contains(code))
        .map_or("", |(_, hint)| hint)
}

fn request_failed<T: oauth2::ErrorResponseType + AsRef<str> + std::fmt::Display + 'static>(
    e: RequestError<T>,
    what: &str,
    url: &str,
) -> String {
    match e {
        RequestTokenError::ServerResponse(reply) => {
            let description = reply
                .error_description()
                .map(|d| one_line(d, 300))
                .unwrap_or_else(|| "(no description)".into());
            format!(
                "the {what} refused the request ({}: {description}){}",
                one_line(reply.error().as_ref(), 60),
                aad_hint(&description)
            )
        }
        RequestTokenError::Request(e) => {
            let detail = match &e {
                HttpClientError::Reqwest(re) => error_chain(&**re),
                other => one_line(&other.to_string(), 200),
            };
            format!("cannot reach the {what} {url}: {detail}; check the network, then run `authorize --device` again")
        }
        // Never show the body: it may hold a token or the device code.
        RequestTokenError::Parse(_, _) => {
            format!("the {what} {url} did not answer with a valid response; check its URL")
        }
        RequestTokenError::Other(s) => {
            format!(
                "unexpected reply from the {what} {url}: {}",
                one_line(&s, 200)
            )
        }
    }
}

/// `smtp-oauth-relay authorize --device`, printing to `out`.
pub async fn run_device_with<W: Write>(
    config: &Config,
    account: Option<&str>,
    opts: DeviceOptions,
    out: &mut W,
) -> Result<Authorized, AuthorizeError> {
    let acct = config.account(account)?;
    let device_auth_url = device_url(acct)?;
    let store = TokenStore::new(acct.token_file.clone());
    let (dir, created_dir) = prepare_token_dir(store.path())?;
    let bad_url = |key: &'static str, e: String| AuthorizeError::NotConfigured {
        account: acct.name.clone(),
        key,
        problem: format!("is not a valid URL ({e})"),
    };
    let mut client = BasicClient::new(ClientId::new(acct.client_id.clone()))
        .set_token_uri(
            TokenUrl::new(acct.token_url.clone())
                .map_err(|e| bad_url("token_url", e.to_string()))?,
        )
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(device_auth_url.clone())
                .map_err(|e| bad_url("device_auth_url", e.to_string()))?,
        );
    if let Some(secret) = &acct.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    let http = http_client()?;

    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(acct.scopes.iter().cloned().map(Scope::new))
        .request_async(&http)
        .await
        .map_err(|e| {
            AuthorizeError::Exchange(request_failed::<BasicErrorResponseType>(
                e,
                "device authorization endpoint",
                &device_auth_url,
            ))
        })?;

    let lifetime = details.expires_in();
    writeln!(
        out,
        "Authorizing account {:?} ({}) with OAuth client {} (device code flow).\n",
        acct.name, acct.username, acct.client_id
    )?;
    writeln!(
        out,
        "On any device with a browser, open\n\n  {}\n\nand enter the code\n\n  {}\n\nthen sign in as {} and accept the permissions asked for.",
        details.verification_uri().as_str(),
        details.user_code().secret(),
        acct.username
    )?;
    if let Some(complete) = details.verification_uri_complete() {
        writeln!(
            out,
            "(Or open {} , which carries the code.)",
            complete.secret()
        )?;
    }
    writeln!(
        out,
        "Waiting up to {} for the sign-in…",
        minutes(opts.timeout.map_or(lifetime, |t| t.min(lifetime)))
    )?;
    out.flush()?;

    let scale = opts.poll_scale;
    let reply = client
        .exchange_device_access_token(&details)
        .request_async(
            &http,
            move |d: Duration| tokio::time::sleep(d.mul_f64(scale)),
            opts.timeout,
        )
        .await
        .map_err(|e| poll_error(e, &acct.token_url))?;

    let granted = reply
        .scopes()
        .map(|s| s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    if let Some(granted) = &granted {
        let missing: Vec<&str> = acct
            .scopes
            .iter()
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
        return Err(AuthorizeError::NoRefreshToken(
            "the provider granted access but returned no refresh token, so the relay could not renew it and nothing was saved: add \"offline_access\" to the account's `scopes` (Microsoft returns a refresh token only for it) and run `authorize --device` again".to_owned(),
        ));
    };
    let tokens = NewTokens {
        refresh_token: SecretString::from(refresh_token.secret().to_owned()),
        access_token: SecretString::from(reply.access_token().secret().to_owned()),
        expires_in: reply.expires_in().unwrap_or(DEFAULT_EXPIRES_IN),
        scopes: granted,
    };
    let expires_at = save_tokens(&store, &tokens)?;

    report_saved(out, config, acct, &store, &dir, created_dir, expires_at)?;
    if acct.provider == Provider::Microsoft {
        writeln!(
            out,
            "Note: SMTP AUTH must be enabled for the mailbox (Microsoft 365 admin center → Users → Active users →\n\
             {} → Mail → Manage email apps → \"Authenticated SMTP\"); otherwise sending fails with 535 5.7.3.",
            acct.username
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

fn poll_error(e: RequestError<DeviceCodeErrorResponseType>, token_url: &str) -> AuthorizeError {
    if let RequestTokenError::ServerResponse(reply) = &e {
        match reply.error() {
            DeviceCodeErrorResponseType::ExpiredToken => {
                return AuthorizeError::Exchange(
                    "the code expired before the sign-in was completed; nothing was saved. Run `authorize --device` again and enter the new code promptly".to_owned(),
                )
            }
            DeviceCodeErrorResponseType::AccessDenied => {
                return AuthorizeError::Denied(
                    "the sign-in was declined (access_denied); nothing was saved. Run `authorize --device` again and accept the permissions; if an administrator must approve the app, ask them to grant admin consent (App registrations → API permissions)".to_owned(),
                )
            }
            _ => {}
        }
    }
    AuthorizeError::Exchange(format!(
        "{}; nothing was saved",
        request_failed(e, "token endpoint", token_url)
    ))
}

/// `smtp-oauth-relay authorize --device` on stdout.
pub async fn run_device(
    config: &Config,
    account: Option<&str>,
    opts: DeviceOptions,
) -> Result<(), AuthorizeError> {
    run_device_with(config, account, opts, &mut std::io::stdout())
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn account(extra: &str) -> AccountConfig {
        let cfg = Config::from_toml(
            &format!("[[account]]\nname = \"c\"\nusername = \"a@b.c\"\nclient_id = \"x\"\ntoken_file = \"/tmp/t.json\"\n{extra}"),
            Path::new("/etc/r.toml"),
        )
        .unwrap();
        cfg.accounts[0].clone()
    }

    #[test]
    fn device_url_per_provider() {
        let custom = account(
            "provider = \"custom\"\nsmtp_host = \"smtp.example\"\ntoken_url = \"https://idp.example/token\"\n",
        );
        let e = device_url(&custom).unwrap_err().to_string();
        assert!(
            e.contains("`device_auth_url`") && e.contains("custom"),
            "{e}"
        );
        let ms = account("provider = \"microsoft\"\ntenant = \"contoso.com\"\n");
        assert_eq!(
            device_url(&ms).unwrap(),
            "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/devicecode"
        );
        let gmail = account("client_secret = \"s\"\n");
        let e = device_url(&gmail).unwrap_err().to_string();
        assert!(
            e.contains("mail.google.com") && e.contains("--no-browser"),
            "{e}"
        );
    }

    #[test]
    fn aadsts_codes_get_their_fix() {
        assert!(aad_hint("AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
            .contains("Allow public client flows"));
        assert!(aad_hint(
            "AADSTS50194: Application is not configured as a multi-tenant application."
        )
        .contains("Directory (tenant) ID"));
        assert_eq!(aad_hint("something else"), "");
    }
}
