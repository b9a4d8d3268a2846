//! `spoolctl --url https://…`: which servers to trust and which certificate to show.
//!
//! Without `--ca`, ureq's bundled Mozilla roots (webpki-roots) decide, so a daemon with a
//! public certificate works as is. `--ca FILE` (or `SSL_CERT_FILE`) trusts only the CAs in
//! that PEM file: the usual case for a relay behind a private CA. `--client-cert` and
//! `--client-key` answer a daemon started with `--tls-client-ca` (mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The HTTPS flags of `spoolctl --url`.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust only the CA certificates in this PEM file for an https:// --url.
    #[arg(long, global = true, value_name = "FILE", env = "SSL_CERT_FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for a daemon that requires mutual TLS (--tls-client-ca).
    #[arg(long, global = true, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, global = true, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientTls {
    /// The rustls configuration these flags ask for; `None`: ureq's defaults will do.
    pub fn config(&self) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
        if self.ca.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for cert in certs("--ca", ca)? {
                    roots
                        .add(cert)
                        .with_context(|| format!("--ca {}: unusable CA", ca.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certs("--client-cert", cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("--client-key {}: not a PEM key", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("--client-cert / --client-key: does the key match?")?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(config)))
    }
}

fn certs(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{flag} {}: cannot read it as PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{flag} {}: no CERTIFICATE block in the file",
        path.display()
    );
    Ok(certs)
}
