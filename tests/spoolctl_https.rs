//! `spoolctl --url https://…` against a daemon serving HTTPS with a private CA and
//! mutual TLS: trusted with --ca and a client certificate, refused without either.

use std::path::Path;
use std::process::Output;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// Writes ca.pem, server.pem/.key (for 127.0.0.1) and client.pem/.key into `dir`.
fn make_pki(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "spoolctl test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san, usage) in [
        (
            "server",
            vec!["127.0.0.1".to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        ("client", vec![], ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(san).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

async fn spoolctl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_spoolctl"))
            .env_remove("SPOOLRELAY_ADMIN_TOKEN")
            .env_remove("SPOOLRELAY_URL")
            .env_remove("SSL_CERT_FILE")
            .args(args)
            .output()
            .expect("run spoolctl")
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn spoolctl_talks_to_an_https_daemon_with_its_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    make_pki(pki);
    let policy = policy::Policy::from_source("p.lua", "").expect("policy loads");
    let mut config = spoolrelay::Config::new(policy, pki.join("spool"));
    config.listen = "127.0.0.1:0".into();
    config.tls.tls_cert = Some(pki.join("server.pem"));
    config.tls.tls_key = Some(pki.join("server.key"));
    config.tls.tls_client_ca = Some(pki.join("ca.pem"));
    let daemon = spoolrelay::start(config, spoolrelay::Shutdown::new())
        .await
        .expect("daemon starts");
    let url = format!("https://{}", daemon.addr);
    let path = |name: &str| pki.join(name).display().to_string();
    let base = vec!["--url".to_string(), url, "--json".into()];
    let ca = vec!["--ca".to_string(), path("ca.pem")];
    let client = vec![
        "--client-cert".to_string(),
        path("client.pem"),
        "--client-key".into(),
        path("client.key"),
    ];
    let run = |extra: Vec<Vec<String>>| {
        let mut args = base.clone();
        args.extend(extra.into_iter().flatten());
        args.push("summary".into());
        spoolctl(args)
    };
    let ok = run(vec![ca.clone(), client.clone()]).await;
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(
        ok.status.success(),
        "spoolctl over mutual TLS failed: {stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("JSON summary");
    assert!(summary["queues"].is_object(), "{summary}");
    // Without the private CA the server is not trusted; without a client certificate the
    // daemon refuses the handshake.
    for (what, extra) in [("no --ca", vec![client]), ("no client cert", vec![ca])] {
        let refused = run(extra).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{what}: spoolctl succeeded");
        assert!(
            stderr.contains("cannot reach the daemon"),
            "{what}: {stderr}"
        );
    }
    daemon.stop().await.unwrap();
}
