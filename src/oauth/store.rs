//! The token file: one JSON object per account holding the refresh token (and the last
//! access token, its expiry and refresh bookkeeping), read with error messages that name
//! the path and the fix, and written atomically with mode 0600. Accounts that need no
//! refresh token (service accounts, client credentials) keep the same file without one:
//! it caches their access token and records refresh results for `token status`.
//!
//! Parsing goes through `serde_json::Value` and is done by hand so that no error message
//! ever echoes a value from the file (serde's type errors quote the offending value,
//! which here would be a token). Unknown keys are kept and written back unchanged.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

/// The contents of a token file. `{"refresh_token": "..."}` alone is a valid file; so is
/// `{}` for an account that needs no refresh token.
///
/// `Debug` never shows a token.
#[derive(Clone)]
pub struct TokenFile {
    /// `None` only in files of accounts that need none (`TokenStore::without_refresh_token`).
    pub refresh_token: Option<SecretString>,
    pub access_token: Option<SecretString>,
    /// When `access_token` expires, unix seconds.
    pub expires_at: Option<u64>,
    /// The last successful refresh, unix seconds.
    pub last_refresh_at: Option<u64>,
    /// When this refresh token was obtained or rotated, unix seconds.
    pub refresh_token_issued_at: Option<u64>,
    /// Whether the last refresh came back with a new refresh token (Microsoft's do);
    /// `None` before the first refresh.
    pub refresh_token_rotates: Option<bool>,
    /// The last refresh failure, secret-free (e.g. `invalid_grant: Token has been expired or revoked.`).
    pub last_error: Option<String>,
    /// Keys this version does not know; kept on rewrite.
    pub extra: Map<String, Value>,
}

impl TokenFile {
    /// A file holding only a refresh token.
    pub fn new(refresh_token: SecretString) -> Self {
        TokenFile {
            refresh_token: Some(refresh_token),
            ..TokenFile::empty()
        }
    }

    /// A file with nothing in it yet (an account that needs no refresh token).
    pub fn empty() -> Self {
        TokenFile {
            refresh_token: None,
            access_token: None,
            expires_at: None,
            last_refresh_at: None,
            refresh_token_issued_at: None,
            refresh_token_rotates: None,
            last_error: None,
            extra: Map::new(),
        }
    }

    /// Parses the file's text. Errors never contain the file's content.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ParseError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ParseError::Syntax {
            line: e.line(),
            column: e.column(),
            what: match e.classify() {
                serde_json::error::Category::Eof => "the file ends too early",
                _ => "it is not valid JSON",
            },
        })?;
        Self::from_value(value)
    }

    /// Builds a file from parsed JSON. Errors never contain the value.
    pub fn from_value(value: Value) -> Result<Self, ParseError> {
        let Value::Object(mut map) = value else {
            return Err(ParseError::NotAnObject);
        };
        let refresh_token = match map.remove("refresh_token") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.trim().is_empty() => Some(SecretString::from(s)),
            Some(_) => {
                return Err(ParseError::BadValue {
                    key: "refresh_token",
                    expected: "a non-empty string",
                })
            }
        };
        let access_token = take_string(&mut map, "access_token")?.map(SecretString::from);
        Ok(TokenFile {
            refresh_token,
            access_token,
            expires_at: take_u64(&mut map, "expires_at")?,
            last_refresh_at: take_u64(&mut map, "last_refresh_at")?,
            refresh_token_issued_at: take_u64(&mut map, "refresh_token_issued_at")?,
            refresh_token_rotates: match map.remove("refresh_token_rotates") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(b),
                Some(_) => {
                    return Err(ParseError::BadValue {
                        key: "refresh_token_rotates",
                        expected: "true or false",
                    })
                }
            },
            last_error: take_string(&mut map, "last_error")?,
            extra: map,
        })
    }

    /// The file's text: pretty JSON, optional fields left out when unset.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out =
            serde_json::to_vec_pretty(&self.to_value()).unwrap_or_else(|_| b"{}".to_vec());
        out.push(b'\n');
        out
    }

    /// The file as a JSON object (holds the secrets in clear: for writing the file only).
    pub fn to_value(&self) -> Value {
        let mut map = self.extra.clone();
        if let Some(t) = &self.refresh_token {
            map.insert(
                "refresh_token".into(),
                Value::String(t.expose_secret().to_owned()),
            );
        }
        if let Some(t) = &self.access_token {
            map.insert(
                "access_token".into(),
                Value::String(t.expose_secret().to_owned()),
            );
        }
        for (key, v) in [
            ("expires_at", self.expires_at),
            ("last_refresh_at", self.last_refresh_at),
            ("refresh_token_issued_at", self.refresh_token_issued_at),
        ] {
            match v {
                Some(n) => map.insert(key.into(), Value::from(n)),
                None => map.remove(key),
            };
        }
        match self.refresh_token_rotates {
            Some(b) => map.insert("refresh_token_rotates".into(), Value::Bool(b)),
            None => map.remove("refresh_token_rotates"),
        };
        match &self.last_error {
            Some(e) => map.insert("last_error".into(), Value::String(e.clone())),
            None => map.remove("last_error"),
        };
        Value::Object(map)
    }
}

/// The file format; unknown keys are kept (like `#[serde(flatten)] extra`).
impl serde::Serialize for TokenFile {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for TokenFile {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        TokenFile::from_value(value).map_err(serde::de::Error::custom)
    }
}

fn take_string(
    map: &mut Map<String, Value>,
    key: &'static str,
) -> Result<Option<String>, ParseError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ParseError::BadValue {
            key,
            expected: "a string",
        }),
    }
}

fn take_u64(map: &mut Map<String, Value>, key: &'static str) -> Result<Option<u64>, ParseError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(_) => Err(ParseError::BadValue {
            key,
            expected: "a whole number of seconds since 1970 (unix time)",
        }),
    }
}

impl fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFile")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "[redacted]"),
            )
            .field("expires_at", &self.expires_at)
            .field("last_refresh_at", &self.last_refresh_at)
            .field("refresh_token_issued_at", &self.refresh_token_issued_at)
            .field("refresh_token_rotates", &self.refresh_token_rotates)
            .field("last_error", &self.last_error)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What is wrong with a token file's content. Never quotes the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what} (line {line}, column {column})")]
    Syntax {
        line: usize,
        column: usize,
        what: &'static str,
    },
    #[error("it is not a JSON object")]
    NotAnObject,
    #[error("it has no \"refresh_token\" key")]
    MissingRefreshToken,
    #[error("the value of \"{key}\" is not {expected}")]
    BadValue {
        key: &'static str,
        expected: &'static str,
    },
}

/// Why the token file could not be read or written. Names the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token file {path} does not exist: run `smtp-oauth-relay authorize …` (with your --config and --account) to create it")]
    Missing { path: PathBuf },
    #[error("cannot read token file {path}: permission denied; it must be readable by the user the relay runs as (chown it to that user, chmod 600)")]
    Unreadable { path: PathBuf },
    #[error("cannot read token file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("token file {path} is invalid: {source}; fix it or run `smtp-oauth-relay authorize …` again")]
    Invalid { path: PathBuf, source: ParseError },
    #[error("token file {path} is readable by group or others (mode {mode:04o}); it holds OAuth tokens: run `chmod 600 {path}` (owned by the user the relay runs as)")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("cannot write token file {path}: {source}{hint}")]
    Write {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
}

/// Reads and atomically rewrites one token file.
#[derive(Debug, Clone)]
pub struct TokenStore {
    path: PathBuf,
    /// The file must hold a refresh token (and exist): accounts that `authorize`.
    needs_refresh_token: bool,
}

impl TokenStore {
    /// The store of an account that refreshes with a stored refresh token: `load` fails
    /// when the file is missing or has none.
    pub fn new(path: PathBuf) -> Self {
        TokenStore {
            path,
            needs_refresh_token: true,
        }
    }

    /// The store of an account that gets tokens without a refresh token (service
    /// account, client credentials): a missing file loads as an empty one and is
    /// created by the first save.
    pub fn without_refresh_token(path: PathBuf) -> Self {
        TokenStore {
            path,
            needs_refresh_token: false,
        }
    }

    /// Whether this account's file holds a refresh token.
    pub fn needs_refresh_token(&self) -> bool {
        self.needs_refresh_token
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<TokenFile, StoreError> {
        let bytes = match fs::read(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.needs_refresh_token => {
                return Ok(TokenFile::empty())
            }
            other => other,
        };
        let bytes = bytes.map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StoreError::Missing {
                path: self.path.clone(),
            },
            io::ErrorKind::PermissionDenied => StoreError::Unreadable {
                path: self.path.clone(),
            },
            _ => StoreError::Read {
                path: self.path.clone(),
                source,
            },
        })?;
        let file = TokenFile::from_json(&bytes).map_err(|source| StoreError::Invalid {
            path: self.path.clone(),
            source,
        })?;
        if self.needs_refresh_token && file.refresh_token.is_none() {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                source: ParseError::MissingRefreshToken,
            });
        }
        Ok(file)
    }

    /// Writes `file` atomically: a new temp file (mode 0600) in the same directory,
    /// fsync, rename over the old file, fsync the directory.
    pub fn save(&self, file: &TokenFile) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "token".into());
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let write_err = |source: io::Error| {
            let hint = match source.kind() {
                io::ErrorKind::NotFound => " (does its directory exist?)",
                io::ErrorKind::PermissionDenied => {
                    " (the relay's user needs write permission on the file's directory)"
                }
                _ => "",
            };
            StoreError::Write {
                path: self.path.clone(),
                source,
                hint,
            }
        };
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The umask cannot widen 0600, but a pre-existing ACL default might: be sure.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&file.to_json())?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &self.path)?;
            fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write_err)
    }

    /// The file's permission bits, if it exists.
    /// Refuses a token file that group or others may read or write. A missing file is
    /// left to `load` to report.
    pub fn check_private(&self) -> Result<(), StoreError> {
        match self.mode() {
            Some(mode) if mode & 0o077 != 0 => Err(StoreError::TooOpen {
                path: self.path.clone(),
                mode,
            }),
            _ => Ok(()),
        }
    }

    pub fn mode(&self) -> Option<u32> {
        fs::metadata(&self.path)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_or_world_readable_file_is_refused_with_the_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, r#"{"refresh_token":"x"}"#).unwrap();
        let store = TokenStore::new(path.clone());
        std::fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = store.check_private().unwrap_err().to_string();
        assert!(
            e.contains("0644") && e.contains(&format!("chmod 600 {}", path.display())),
            "{e}"
        );
        std::fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        store.check_private().unwrap();
        TokenStore::new(dir.path().join("missing"))
            .check_private()
            .unwrap();
    }

    const RT: &str = "1//0refresh-SECRET-abc";
    const AT: &str = "ya29.access-SECRET-xyz";

    fn store() -> (tempfile::TempDir, TokenStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::new(dir.path().join("gmail.json"));
        (dir, s)
    }

    #[test]
    fn minimal_file_is_valid() {
        let (_d, s) = store();
        fs::write(s.path(), format!(r#"{{"refresh_token": "{RT}"}}"#)).unwrap();
        let f = s.load().unwrap();
        assert_eq!(f.refresh_token.as_ref().unwrap().expose_secret(), RT);
        assert!(f.access_token.is_none() && f.expires_at.is_none() && f.last_error.is_none());
    }

    #[test]
    fn round_trip_keeps_unknown_keys() {
        let (_d, s) = store();
        fs::write(
            s.path(),
            format!(r#"{{"refresh_token": "{RT}", "scope": "https://mail.google.com/", "nested": {{"a": [1, 2]}}, "expires_at": 5}}"#),
        )
        .unwrap();
        let mut f = s.load().unwrap();
        f.access_token = Some(SecretString::from(AT.to_owned()));
        f.expires_at = Some(1_800_000_000);
        f.last_error = Some("invalid_grant: x".into());
        s.save(&f).unwrap();
        let g = s.load().unwrap();
        assert_eq!(g.access_token.unwrap().expose_secret(), AT);
        assert_eq!(g.expires_at, Some(1_800_000_000));
        assert_eq!(g.last_error.as_deref(), Some("invalid_grant: x"));
        assert_eq!(g.extra["scope"], "https://mail.google.com/");
        assert_eq!(g.extra["nested"]["a"][1], 2);
        assert!(!g.extra.contains_key("refresh_token"));
    }

    #[test]
    fn save_is_0600_and_leaves_no_temp_files() {
        let (d, s) = store();
        fs::write(s.path(), format!(r#"{{"refresh_token": "{RT}"}}"#)).unwrap();
        fs::set_permissions(s.path(), fs::Permissions::from_mode(0o644)).unwrap();
        let f = s.load().unwrap();
        s.save(&f).unwrap();
        assert_eq!(s.mode(), Some(0o600));
        // A fresh file too.
        let s2 = TokenStore::new(d.path().join("new.json"));
        s2.save(&f).unwrap();
        assert_eq!(s2.mode(), Some(0o600));
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn save_into_missing_dir_names_path() {
        let (d, _) = store();
        let s = TokenStore::new(d.path().join("nope/t.json"));
        let e = s.save(&TokenFile::new(SecretString::from(RT.to_owned())));
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("nope/t.json") && msg.contains("directory"),
            "{msg}"
        );
        assert!(!msg.contains(RT));
    }

    #[test]
    fn missing_file_says_run_authorize() {
        let (_d, s) = store();
        let msg = s.load().unwrap_err().to_string();
        assert!(msg.contains("gmail.json"), "{msg}");
        assert!(msg.contains("smtp-oauth-relay authorize"), "{msg}");
    }

    #[test]
    fn unreadable_file_gives_permission_hint() {
        let (_d, s) = store();
        fs::write(s.path(), format!(r#"{{"refresh_token": "{RT}"}}"#)).unwrap();
        fs::set_permissions(s.path(), fs::Permissions::from_mode(0o000)).unwrap();
        if fs::read(s.path()).is_ok() {
            return; // running as root: permissions are not enforced
        }
        let msg = s.load().unwrap_err().to_string();
        assert!(
            msg.contains("permission denied") && msg.contains("chmod 600"),
            "{msg}"
        );
    }

    #[test]
    fn bad_json_gives_line_and_column_without_content() {
        let (_d, s) = store();
        fs::write(
            s.path(),
            format!("{{\n  \"refresh_token\": \"{RT}\",\n  oops\n}}"),
        )
        .unwrap();
        let msg = s.load().unwrap_err().to_string();
        assert!(msg.contains("line 3, column 3"), "{msg}");
        assert!(!msg.contains(RT) && !msg.contains("oops"), "{msg}");
        assert!(msg.contains("gmail.json"));
    }

    #[test]
    fn wrong_types_name_the_key_not_the_value() {
        let (_d, s) = store();
        fs::write(
            s.path(),
            format!(r#"{{"refresh_token": "{RT}", "expires_at": "{AT}"}}"#),
        )
        .unwrap();
        let msg = s.load().unwrap_err().to_string();
        assert!(msg.contains("\"expires_at\""), "{msg}");
        assert!(!msg.contains(AT) && !msg.contains(RT), "{msg}");

        fs::write(s.path(), format!(r#"{{"access_token": "{AT}"}}"#)).unwrap();
        let msg = s.load().unwrap_err().to_string();
        assert!(msg.contains("no \"refresh_token\" key"), "{msg}");
        assert!(!msg.contains(AT));

        fs::write(s.path(), "[1]").unwrap();
        assert!(s
            .load()
            .unwrap_err()
            .to_string()
            .contains("not a JSON object"));
        fs::write(s.path(), r#"{"refresh_token": 12}"#).unwrap();
        assert!(s
            .load()
            .unwrap_err()
            .to_string()
            .contains("non-empty string"));
        fs::write(s.path(), "").unwrap();
        assert!(s.load().unwrap_err().to_string().contains("ends too early"));
    }

    #[test]
    fn serde_impls_match_the_file_format() {
        let f: TokenFile = serde_json::from_str(&format!(
            r#"{{"refresh_token": "{RT}", "expires_at": 7, "x": true}}"#
        ))
        .unwrap();
        assert_eq!(f.expires_at, Some(7));
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["refresh_token"], RT);
        assert_eq!(v["x"], true);
        let e = serde_json::from_str::<TokenFile>(&format!(
            r#"{{"refresh_token": "{RT}", "expires_at": "{AT}"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(!e.contains(AT) && e.contains("expires_at"), "{e}");
    }

    #[test]
    fn debug_never_shows_tokens() {
        let mut f = TokenFile::new(SecretString::from(RT.to_owned()));
        f.access_token = Some(SecretString::from(AT.to_owned()));
        let d = format!("{f:?}");
        assert!(!d.contains(RT) && !d.contains(AT), "{d}");
        assert!(d.contains("redacted"));
    }
}
