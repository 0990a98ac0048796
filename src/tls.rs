//! TLS setup shared by the daemon and its tools: the process-wide crypto provider and the
//! client configuration for upstream connections (webpki roots plus an optional CA file).

use std::{path::Path, sync::Arc};

use rustls::RootCertStore;
use rustls_pki_types::{pem::PemObject, CertificateDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read CA file {path}: {detail} (ca_file must be a PEM file of CA certificates)"
    )]
    CaFile { path: String, detail: String },
    #[error("CA file {path} holds no usable certificate: {detail}")]
    CaCert { path: String, detail: String },
}

/// Installs aws-lc-rs as the process-wide rustls provider. mail-send uses aws-lc-rs and
/// reqwest uses ring; with both compiled in, rustls cannot choose on its own and panics.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A client config that trusts the webpki roots and, if given, the CAs in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| TlsError::CaFile {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        add_pem_roots(&mut roots, &pem).map_err(|detail| TlsError::CaCert {
            path: path.display().to_string(),
            detail,
        })?;
    }
    Ok(config_with_roots(roots))
}

/// A client config that trusts only the CAs in `pem` (the sandbox's generated CA).
pub fn client_config_from_pem(pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    add_pem_roots(&mut roots, pem.as_bytes()).map_err(|detail| TlsError::CaCert {
        path: "(inline)".into(),
        detail,
    })?;
    Ok(config_with_roots(roots))
}

fn add_pem_roots(roots: &mut RootCertStore, pem: &[u8]) -> Result<(), String> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
        added += 1;
    }
    if added == 0 {
        return Err("no PEM CERTIFICATE block found".into());
    }
    Ok(())
}

fn config_with_roots(roots: RootCertStore) -> Arc<rustls::ClientConfig> {
    install_crypto_provider();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a cert").unwrap();
        let e = client_config(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("no PEM"), "{e}");
        let e = client_config(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        assert!(client_config(None).is_ok());
    }
}
