//! Certificates for the sandbox's fake Gmail: a throw-away CA generated at start and a
//! server certificate it signs for `localhost`, `127.0.0.1` and `::1`, turned into the
//! rustls server configuration STARTTLS uses (and a client configuration trusting the CA).

use std::io;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The generated CA and the server certificate + key it signed.
pub(crate) struct SandboxCa {
    pub(crate) ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn cert_error(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("sandbox certificate generation failed: {e}"))
}

impl SandboxCa {
    pub(crate) fn generate() -> io::Result<SandboxCa> {
        let ca_key = KeyPair::generate().map_err(cert_error)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "smtp-oauth-relay sandbox CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_error)?;

        let server_key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .map_err(cert_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "smtp.gmail.com (sandbox)");
        params.is_ca = IsCa::ExplicitNoCa;
        let server_cert = params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(cert_error)?;

        Ok(SandboxCa {
            ca_pem: ca_cert.pem(),
            server_cert: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
        })
    }
}

/// The rustls server configuration for STARTTLS (TLS 1.2 and 1.3, like Gmail).
pub(crate) fn server_config(ca: &SandboxCa) -> io::Result<Arc<rustls::ServerConfig>> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.server_key.clone()));
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![ca.server_cert.clone()], key)
        .map_err(|e| io::Error::other(format!("sandbox TLS configuration failed: {e}")))?;
    Ok(Arc::new(config))
}

/// A rustls client configuration whose only trust anchor is the CA in `ca_pem`.
pub(crate) fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        let _ = roots.add(cert);
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
