//! Google's downloaded OAuth client file (`client_secret_*.json`), read as the console
//! writes it: the `"installed"` shape (a "Desktop app" client) or the `"web"` shape (a
//! "Web application" client with registered redirect URIs). It supplies client id,
//! secret, auth and token URIs and redirect URIs to an account (`client_secret_json`).
//!
//! Parsing goes through `serde_json::Value` by hand so that no error message ever quotes
//! a value from the file (it holds the client secret); errors name the key and the fix.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use secrecy::SecretString;
use serde_json::{Map, Value};

/// Which kind of OAuth client the file describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// `"installed"`: a "Desktop app" client; any loopback redirect port is allowed.
    Installed,
    /// `"web"`: a "Web application" client; only its registered redirect URIs work.
    Web,
}

impl ClientKind {
    pub fn key(self) -> &'static str {
        match self {
            ClientKind::Installed => "installed",
            ClientKind::Web => "web",
        }
    }
}

/// The useful part of a client file. `Debug` never shows the secret.
#[derive(Clone)]
pub struct ClientSecretJson {
    pub kind: ClientKind,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub auth_uri: Option<String>,
    pub token_uri: Option<String>,
    pub redirect_uris: Vec<String>,
    pub project_id: Option<String>,
}

impl fmt::Debug for ClientSecretJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSecretJson")
            .field("kind", &self.kind)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("auth_uri", &self.auth_uri)
            .field("token_uri", &self.token_uri)
            .field("redirect_uris", &self.redirect_uris)
            .field("project_id", &self.project_id)
            .finish()
    }
}

/// What is wrong with a client file. Never quotes the file's content.
#[derive(Debug, thiserror::Error)]
pub enum ClientJsonError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what} (line {line}, column {column}); download the client file again from the Google Cloud console (APIs & Services → Credentials → your OAuth client → Download JSON)")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        what: &'static str,
    },
    #[error("{path} is a service-account key (\"type\": \"service_account\"), not an OAuth client file; for a Workspace service account with domain-wide delegation write `service_account_json = \"{path}\"` instead of `client_secret_json`; otherwise create an OAuth client ID of type \"Desktop app\" (APIs & Services → Credentials → Create credentials → OAuth client ID) and give its downloaded JSON")]
    ServiceAccount { path: PathBuf },
    #[error("{path} has neither an \"installed\" nor a \"web\" object, so it is not an OAuth client file; in the Google Cloud console open APIs & Services → Credentials → your OAuth 2.0 client (type \"Desktop app\" is best) and use its \"Download JSON\" file as is")]
    NoClient { path: PathBuf },
    #[error("{path} has both an \"installed\" and a \"web\" object; keep only the client you mean to use (Google's downloads have one)")]
    BothKinds { path: PathBuf },
    #[error("{path}: \"{section}.{key}\" {problem}")]
    BadValue {
        path: PathBuf,
        section: &'static str,
        key: &'static str,
        problem: &'static str,
    },
}

impl ClientSecretJson {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ClientJsonError> {
        let bytes = std::fs::read(path).map_err(|source| ClientJsonError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses the file's bytes; `path` is used in messages only.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ClientJsonError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ClientJsonError::Syntax {
            path: path.to_owned(),
            line: e.line(),
            column: e.column(),
            what: match e.classify() {
                serde_json::error::Category::Eof => "the file ends too early",
                _ => "it is not valid JSON",
            },
        })?;
        let no_client = || ClientJsonError::NoClient {
            path: path.to_owned(),
        };
        let Value::Object(top) = value else {
            return Err(no_client());
        };
        if top.get("type").and_then(Value::as_str) == Some("service_account") {
            return Err(ClientJsonError::ServiceAccount {
                path: path.to_owned(),
            });
        }
        let (kind, section) = match (top.get("installed"), top.get("web")) {
            (Some(_), Some(_)) => {
                return Err(ClientJsonError::BothKinds {
                    path: path.to_owned(),
                })
            }
            (Some(s), None) => (ClientKind::Installed, s),
            (None, Some(s)) => (ClientKind::Web, s),
            (None, None) => return Err(no_client()),
        };
        let Value::Object(section) = section else {
            return Err(ClientJsonError::BadValue {
                path: path.to_owned(),
                section: kind.key(),
                key: "",
                problem: "is not a JSON object",
            });
        };
        let r = Reader {
            path,
            section: kind.key(),
            map: section,
        };
        let client_id = r
            .string("client_id")?
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| r.bad("client_id", "is missing or empty"))?;
        let client_secret = r
            .string("client_secret")?
            .filter(|s| !s.is_empty())
            .map(SecretString::from);
        let redirect_uris = match section.get("redirect_uris") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| r.bad("redirect_uris", "must be a list of strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(r.bad("redirect_uris", "must be a list of strings")),
        };
        Ok(ClientSecretJson {
            kind,
            client_id: client_id.trim().to_owned(),
            client_secret,
            auth_uri: r.string("auth_uri")?,
            token_uri: r.string("token_uri")?,
            redirect_uris,
            project_id: r.string("project_id")?,
        })
    }
}

struct Reader<'a> {
    path: &'a Path,
    section: &'static str,
    map: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn bad(&self, key: &'static str, problem: &'static str) -> ClientJsonError {
        ClientJsonError::BadValue {
            path: self.path.to_owned(),
            section: self.section,
            key,
            problem,
        }
    }

    fn string(&self, key: &'static str) -> Result<Option<String>, ClientJsonError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(key, "is not a string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const SECRET: &str = "GOCSPX-client-SECRET-123";

    fn installed() -> String {
        format!(
            r#"{{"installed":{{"client_id":"123-abc.apps.googleusercontent.com","project_id":"my-relay","auth_uri":"https://accounts.google.com/o/oauth2/auth","token_uri":"https://oauth2.googleapis.com/token","auth_provider_x509_cert_url":"https://www.googleapis.com/oauth2/v1/certs","client_secret":"{SECRET}","redirect_uris":["http://localhost"]}}}}"#
        )
    }

    fn parse(text: &str) -> Result<ClientSecretJson, ClientJsonError> {
        ClientSecretJson::parse(text.as_bytes(), Path::new("/etc/relay/client.json"))
    }

    #[test]
    fn installed_shape() {
        let c = parse(&installed()).unwrap();
        assert_eq!(c.kind, ClientKind::Installed);
        assert_eq!(c.client_id, "123-abc.apps.googleusercontent.com");
        assert_eq!(c.client_secret.unwrap().expose_secret(), SECRET);
        assert_eq!(
            c.auth_uri.as_deref(),
            Some("https://accounts.google.com/o/oauth2/auth")
        );
        assert_eq!(
            c.token_uri.as_deref(),
            Some("https://oauth2.googleapis.com/token")
        );
        assert_eq!(c.redirect_uris, ["http://localhost"]);
        assert_eq!(c.project_id.as_deref(), Some("my-relay"));
    }

    #[test]
    fn web_shape() {
        let c = parse(&format!(
            r#"{{"web":{{"client_id":"9-web.apps.googleusercontent.com","project_id":"p","auth_uri":"https://accounts.google.com/o/oauth2/auth","token_uri":"https://oauth2.googleapis.com/token","auth_provider_x509_cert_url":"x","client_secret":"{SECRET}","redirect_uris":["https://example.org/callback","https://example.org/cb2"],"javascript_origins":["https://example.org"]}}}}"#
        ))
        .unwrap();
        assert_eq!(c.kind, ClientKind::Web);
        assert_eq!(
            c.redirect_uris,
            ["https://example.org/callback", "https://example.org/cb2"]
        );
    }

    #[test]
    fn errors_name_the_problem_and_never_the_secret() {
        let e = parse(&format!(r#"{{"other":{{"client_secret":"{SECRET}"}}}}"#)).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("neither an \"installed\" nor a \"web\""), "{m}");
        assert!(
            m.contains("Download JSON") && m.contains("client.json"),
            "{m}"
        );

        let m = parse(&format!(
            r#"{{"type":"service_account","private_key":"{SECRET}"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(m.contains("service-account") && !m.contains(SECRET), "{m}");

        let m = parse(&installed().replace("\"client_id\":", "\"x\":"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("\"installed.client_id\" is missing"), "{m}");

        let m = parse(&installed().replace("[\"http://localhost\"]", "\"http://localhost\""))
            .unwrap_err()
            .to_string();
        assert!(m.contains("redirect_uris") && m.contains("list"), "{m}");

        let m = parse(&installed()[..60]).unwrap_err().to_string();
        assert!(
            m.contains("ends too early") && !m.contains("123-abc"),
            "{m}"
        );
        let m = parse(&installed().replace("{\"installed\"", "{oops \"installed\""))
            .unwrap_err()
            .to_string();
        assert!(m.contains("not valid JSON") && m.contains("line 1"), "{m}");

        let m = parse(&installed().replace(&format!("\"{SECRET}\""), "42"))
            .unwrap_err()
            .to_string();
        assert!(m.contains("client_secret\" is not a string"), "{m}");

        let both = r#"{"installed":{},"web":{}}"#;
        assert!(matches!(
            parse(both),
            Err(ClientJsonError::BothKinds { .. })
        ));
        assert!(matches!(
            parse("[1]"),
            Err(ClientJsonError::NoClient { .. })
        ));
    }

    #[test]
    fn debug_redacts_secret() {
        let c = parse(&installed()).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains(SECRET) && d.contains("redacted"), "{d}");
    }
}
