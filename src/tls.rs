//! HTTPS on the listener: `--tls-cert` / `--tls-key` (PEM) turn it on, `--tls-client-ca`
//! adds mutual TLS (a client must present a certificate that CA signed).
//!
//! rustls with the `ring` provider: no system OpenSSL on this path and no aws-lc-sys build.
//! The provider is named explicitly rather than taken from the process default, so another
//! crate that enables a second provider cannot make the choice ambiguous at runtime.
//!
//! The handshake itself runs in [`crate::server`], inside the connection's task and under
//! `--http-header-timeout`, so a client that never finishes it holds one connection permit
//! for at most that long and never the accept loop or shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// The listener's TLS flags.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: refuse every client that does not present a certificate signed by a CA
    /// in this PEM file. Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Why the TLS setup could not be built; each names the flag and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{flag} {}: {why}", path.display())]
    Pem {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the certificate, key or CA (e.g. the key does not match).
    #[error("{what}: {source}")]
    Rustls {
        /// What was being set up, with the flags involved.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client CA verifier could not be built.
    #[error("--tls-client-ca: {0}")]
    ClientCa(String),
    /// Only one of --tls-cert / --tls-key was given (the library path has no clap check).
    #[error("--tls-cert and --tls-key must be given together")]
    Incomplete,
}

/// The acceptor for `args`, or `None` when no certificate is configured (plain HTTP).
pub fn acceptor(args: &TlsArgs) -> Result<Option<TlsAcceptor>, TlsError> {
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (None, None) if args.tls_client_ca.is_none() => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err(TlsError::Incomplete),
    };
    let chain = certs("--tls-cert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("--tls-key", key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "TLS protocol versions",
            source,
        })?;
    let builder = match &args.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs("--tls-client-ca", ca)? {
                roots.add(cert).map_err(|source| TlsError::Rustls {
                    what: "--tls-client-ca holds a certificate rustls cannot use",
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "--tls-cert / --tls-key (does the key belong to the certificate?)",
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Every certificate in a PEM file; an empty file is an error, not an empty chain.
fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(flag, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(flag, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            flag,
            path: path.to_owned(),
            why: "no CERTIFICATE block in the file".into(),
        });
    }
    Ok(certs)
}

fn pem_error(
    flag: &'static str,
    path: &Path,
    e: tokio_rustls::rustls::pki_types::pem::Error,
) -> TlsError {
    TlsError::Pem {
        flag,
        path: path.to_owned(),
        why: format!("cannot read it as PEM: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_means_plain_http_and_half_a_pair_is_refused() {
        assert!(acceptor(&TlsArgs::default()).unwrap().is_none());
        let half = TlsArgs {
            tls_cert: Some("cert.pem".into()),
            ..Default::default()
        };
        assert!(matches!(acceptor(&half), Err(TlsError::Incomplete)));
    }

    #[test]
    fn the_flags_parse_and_a_key_needs_a_certificate() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            tls: TlsArgs,
            #[command(flatten)]
            auth: crate::ingest_auth::AuthArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--ingest-token",
            "a",
            "--ingest-token",
            "b",
            "--metrics-token",
            "m",
        ])
        .unwrap();
        assert_eq!(cli.tls.tls_cert, Some("c".into()));
        assert_eq!(cli.auth.ingest_token, ["a", "b"]);
        assert_eq!(cli.auth.metrics_token.as_deref(), Some("m"));
        assert!(Cli::try_parse_from(["x", "--tls-key", "k"]).is_err());
        assert!(Cli::try_parse_from(["x", "--tls-client-ca", "ca"]).is_err());
    }

    #[test]
    fn a_missing_file_names_its_flag_and_path() {
        let args = TlsArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            tls_client_ca: None,
        };
        let err = acceptor(&args)
            .err()
            .expect("missing file refused")
            .to_string();
        assert!(err.contains("--tls-cert /nonexistent/cert.pem"), "{err}");
    }
}
