//! `token status`: what the token file says, as text for a person — when the access
//! token expires, when it was last refreshed, how old the refresh token is, the last
//! error — plus warnings about trouble ahead. Never shows a token.

use std::{fmt, path::PathBuf};

use super::{
    manager::{CredentialKind, ProviderHint},
    store::TokenStore,
    OAuthError,
};

/// Google refresh tokens of an External app in Testing die after 7 days: warn a day early.
const GOOGLE_TESTING_WARN_AFTER: u64 = 6 * 86_400;
const GOOGLE_TESTING_LIFETIME: u64 = 7 * 86_400;

/// The state of one token file, for `token status`. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenStatus {
    pub path: PathBuf,
    /// How the account gets tokens: "refresh_token", "service_account", "client_credentials".
    pub credential: &'static str,
    /// The time the report was made for, unix seconds.
    pub now_unix: u64,
    pub has_access_token: bool,
    pub expires_at: Option<u64>,
    pub last_refresh_at: Option<u64>,
    pub refresh_token_issued_at: Option<u64>,
    /// Whether the provider rotated the refresh token at the last refresh.
    pub refresh_token_rotates: Option<bool>,
    pub last_error: Option<String>,
    /// Permission bits of the file.
    pub file_mode: Option<u32>,
    /// Trouble ahead, one sentence each.
    pub warnings: Vec<String>,
}

impl TokenStatus {
    /// Seconds until the stored access token expires (negative: ago); `None` without one.
    pub fn expires_in(&self) -> Option<i64> {
        match (self.has_access_token, self.expires_at) {
            (true, Some(at)) => Some(at as i64 - self.now_unix as i64),
            _ => None,
        }
    }

    pub fn access_token_valid(&self) -> bool {
        self.expires_in().is_some_and(|s| s > 0)
    }

    /// Age of the refresh token in seconds, if its issue time is known.
    pub fn refresh_token_age(&self) -> Option<u64> {
        self.refresh_token_issued_at
            .map(|t| self.now_unix.saturating_sub(t))
    }

    /// The report for monitoring (`token status --json`): the fields above plus the
    /// derived ones, so a check needs no date arithmetic. Holds no secret.
    pub fn to_json(&self, account: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("account".into(), account.into());
            o.insert("expires_in_secs".into(), self.expires_in().into());
            o.insert(
                "access_token_valid".into(),
                self.access_token_valid().into(),
            );
            o.insert(
                "refresh_token_age_secs".into(),
                self.refresh_token_age().into(),
            );
            o.insert("healthy".into(), self.warnings.is_empty().into());
        }
        v
    }
}

/// `token status` for a Google account (the 7-day warning is worded for Google).
pub fn status(store: &TokenStore, now_unix: u64) -> Result<TokenStatus, OAuthError> {
    status_with(
        store,
        now_unix,
        ProviderHint::Gmail,
        CredentialKind::RefreshToken,
    )
}

/// `token status`; `hint` decides provider-specific warnings.
pub fn status_with(
    store: &TokenStore,
    now_unix: u64,
    hint: ProviderHint,
    kind: CredentialKind,
) -> Result<TokenStatus, OAuthError> {
    let file = store.load()?;
    let mut s = TokenStatus {
        path: store.path().to_path_buf(),
        credential: kind.name(),
        now_unix,
        has_access_token: file.access_token.is_some(),
        expires_at: file.expires_at,
        last_refresh_at: file.last_refresh_at,
        refresh_token_issued_at: file.refresh_token_issued_at,
        refresh_token_rotates: file.refresh_token_rotates,
        last_error: file.last_error.clone(),
        file_mode: store.mode(),
        warnings: Vec::new(),
    };
    if let Some(err) = &s.last_error {
        let fix = if !kind.uses_refresh_token() {
            " — run `smtp-oauth-relay token refresh` to see the cause and the fix"
        } else if err.starts_with("invalid_grant") {
            " — the refresh token is dead: run `smtp-oauth-relay authorize` again"
        } else if err.starts_with("invalid_client") {
            " — check client_id and client_secret in the config"
        } else {
            ""
        };
        s.warnings
            .push(format!("the last refresh failed: {err}{fix}"));
    }
    if let Some(secs) = s.expires_in() {
        if secs <= 0 && s.last_error.is_none() {
            s.warnings.push(format!(
                "the stored access token expired {} ago: a running relay refreshes it ahead of time, so check that the relay is running and its log (or run `smtp-oauth-relay token refresh`)",
                human(secs.unsigned_abs())
            ));
        }
    }
    if hint == ProviderHint::Gmail {
        if let (Some(age), Some(issued)) = (s.refresh_token_age(), s.refresh_token_issued_at) {
            // A refresh that worked more than 7 days after issue proves the token is not
            // a Testing one.
            let outlived_testing = s
                .last_refresh_at
                .is_some_and(|t| t >= issued.saturating_add(GOOGLE_TESTING_LIFETIME));
            if age > GOOGLE_TESTING_WARN_AFTER && !outlived_testing {
                s.warnings.push(format!(
                    "the refresh token is {} old: Google refresh tokens of an External app in Testing expire after 7 days; if the OAuth consent screen is in Testing, publish the app (or make it Internal) and run `smtp-oauth-relay authorize` again",
                    human(age)
                ));
            }
        }
    }
    if let Some(mode) = s.file_mode {
        if mode & 0o077 != 0 {
            s.warnings.push(format!(
                "the token file is accessible to other users (mode {mode:04o}): run `chmod 600 {}`",
                s.path.display()
            ));
        }
    }
    Ok(s)
}

/// "45 s", "12 min", "3 h 5 min", "6 days".
fn human(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} days", secs / 86_400),
    }
}

fn when(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("unix time {unix}"))
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "token file:     {}", self.path.display())?;
        match (self.expires_in(), self.expires_at) {
            (Some(secs), Some(at)) if secs > 0 => writeln!(
                f,
                "access token:   valid, expires in {} ({})",
                human(secs as u64),
                when(at)
            )?,
            (Some(secs), Some(at)) => writeln!(
                f,
                "access token:   expired {} ago ({})",
                human(secs.unsigned_abs()),
                when(at)
            )?,
            _ if self.has_access_token => writeln!(f, "access token:   stored, expiry unknown")?,
            _ => writeln!(
                f,
                "access token:   none stored (the relay fetches one on start)"
            )?,
        }
        match self.last_refresh_at {
            Some(t) => writeln!(
                f,
                "last refresh:   {} ({} ago)",
                when(t),
                human(self.now_unix.saturating_sub(t))
            )?,
            None => writeln!(f, "last refresh:   never")?,
        }
        match (
            self.credential,
            self.refresh_token_issued_at,
            self.refresh_token_age(),
        ) {
            ("refresh_token", Some(t), Some(age)) => {
                writeln!(f, "refresh token:  issued {} ({} ago)", when(t), human(age))?
            }
            ("refresh_token", _, _) => writeln!(f, "refresh token:  present, issue time unknown")?,
            ("service_account", _, _) => writeln!(
                f,
                "credential:     service account (signed assertion; no refresh token)"
            )?,
            (_, _, _) => writeln!(
                f,
                "credential:     client credentials (app-only; no refresh token)"
            )?,
        }
        if self.credential == "refresh_token" {
            match self.refresh_token_rotates {
                Some(true) => writeln!(
                    f,
                    "rotation:       yes, a new refresh token at each refresh (saved before use)"
                )?,
                Some(false) => writeln!(f, "rotation:       no, the refresh token is kept")?,
                None => writeln!(f, "rotation:       not known until the first refresh")?,
            }
        }
        match &self.last_error {
            Some(e) => writeln!(f, "last error:     {e}")?,
            None => writeln!(f, "last error:     none")?,
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn json_report_has_derived_fields_and_no_token() {
        let s = TokenStatus {
            path: "/var/lib/x.json".into(),
            credential: "refresh_token",
            now_unix: 1000,
            has_access_token: true,
            expires_at: Some(1600),
            last_refresh_at: Some(900),
            refresh_token_issued_at: Some(100),
            refresh_token_rotates: Some(true),
            last_error: None,
            file_mode: Some(0o600),
            warnings: vec![],
        };
        let v = s.to_json("gmail");
        assert_eq!(v["account"], "gmail");
        assert_eq!(v["expires_in_secs"], 600);
        assert_eq!(v["access_token_valid"], true);
        assert_eq!(v["refresh_token_age_secs"], 900);
        assert_eq!(v["healthy"], true);
        assert_eq!(v["refresh_token_rotates"], true);
        assert!(s.to_string().contains("rotation:       yes"), "{s}");
        assert!(!v.to_string().contains("token\":\""), "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::store::TokenFile;
    use secrecy::SecretString;
    use std::os::unix::fs::PermissionsExt;

    const RT: &str = "1//0refresh-SECRET-abc";
    const AT: &str = "ya29.access-SECRET-xyz";
    const NOW: u64 = 1_800_000_000;

    fn store(edit: impl FnOnce(&mut TokenFile)) -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("token.json"));
        let mut f = TokenFile::new(SecretString::from(RT.to_owned()));
        f.access_token = Some(SecretString::from(AT.to_owned()));
        edit(&mut f);
        store.save(&f).unwrap();
        (dir, store)
    }

    #[test]
    fn healthy_token_status_text() {
        let (_d, s) = store(|f| {
            f.expires_at = Some(NOW + 42 * 60);
            f.last_refresh_at = Some(NOW - 18 * 60);
            f.refresh_token_issued_at = Some(NOW - 2 * 86_400);
        });
        let st = status(&s, NOW).unwrap();
        let text = st.to_string();
        assert!(st.access_token_valid() && st.warnings.is_empty(), "{text}");
        assert!(text.contains("valid, expires in 42 min"), "{text}");
        assert!(
            text.contains("(18 min ago)") && text.contains("(2 days ago)"),
            "{text}"
        );
        assert!(text.contains("last error:     none"), "{text}");
        assert!(!text.contains(RT) && !text.contains(AT) && !format!("{st:?}").contains(AT));
    }

    #[test]
    fn expired_token_and_failed_refresh_are_warned_about() {
        let (_d, s) = store(|f| {
            f.expires_at = Some(NOW - 300);
            f.last_error = Some("invalid_grant: Token has been expired or revoked.".into());
        });
        let st = status(&s, NOW).unwrap();
        let text = st.to_string();
        assert!(text.contains("expired 5 min ago"), "{text}");
        assert!(
            text.contains("refresh token:  present, issue time unknown"),
            "{text}"
        );
        assert!(
            st.warnings
                .iter()
                .any(|w| w.contains("last refresh failed")
                    && w.contains("smtp-oauth-relay authorize")),
            "{text}"
        );

        let (_d, s) = store(|f| f.expires_at = Some(NOW - 7200));
        let st = status(&s, NOW).unwrap();
        assert!(st.warnings[0].contains("is running"), "{st}");
    }

    #[test]
    fn old_google_refresh_token_is_warned_about() {
        let (_d, s) = store(|f| {
            f.expires_at = Some(NOW + 1000);
            f.refresh_token_issued_at = Some(NOW - 6 * 86_400 - 60);
            f.last_refresh_at = Some(NOW - 2000);
        });
        let st = status(&s, NOW).unwrap();
        assert!(
            st.warnings
                .iter()
                .any(|w| w.contains("6 days old") && w.contains("Testing expire after 7 days")),
            "{st}"
        );
        assert!(
            status_with(&s, NOW, ProviderHint::Custom, CredentialKind::RefreshToken)
                .unwrap()
                .warnings
                .is_empty()
        );

        // A token that worked past its 7th day is not a Testing one.
        let (_d, s) = store(|f| {
            f.expires_at = Some(NOW + 1000);
            f.refresh_token_issued_at = Some(NOW - 30 * 86_400);
            f.last_refresh_at = Some(NOW - 2000);
        });
        assert!(status(&s, NOW).unwrap().warnings.is_empty());
    }

    #[test]
    fn loose_file_mode_is_warned_about() {
        let (_d, s) = store(|f| f.expires_at = Some(NOW + 1000));
        std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let st = status(&s, NOW).unwrap();
        assert!(
            st.warnings
                .iter()
                .any(|w| w.contains("0644") && w.contains("chmod 600")),
            "{st}"
        );
    }

    #[test]
    fn minimal_file_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::new(dir.path().join("t.json"));
        assert!(status(&s, NOW)
            .unwrap_err()
            .to_string()
            .contains("authorize"));
        std::fs::write(s.path(), format!(r#"{{"refresh_token": "{RT}"}}"#)).unwrap();
        std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let st = status(&s, NOW).unwrap();
        let text = st.to_string();
        assert!(
            text.contains("none stored") && text.contains("last refresh:   never"),
            "{text}"
        );
        assert!(st.warnings.is_empty(), "{text}");
    }
}
