//! Authenticated, encrypted ingest through the real daemon: HTTPS with certificates this
//! test makes (rcgen), bearer tokens (401 and nothing spooled), tokens limited to a queue
//! prefix (403 outside it, a mixed injection refused whole), mutual TLS, the /metrics
//! token, and a client that never finishes its TLS handshake.

mod common;

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use reqwest::StatusCode;
use serde_json::{json, Value};
use spoolrelay::Config;
use tokio::io::AsyncReadExt;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: String,
    client: String,
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "spoolrelay test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |san: Vec<String>, usage| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(san).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert).unwrap();
    std::fs::write(dir.join("server.key"), server_key).unwrap();
    Pki {
        ca: ca.pem(),
        client: format!("{client_cert}{client_key}"),
    }
}

/// Turns HTTPS on in `config` with the files of [`make_pki`]; `mutual` adds the client CA.
fn use_tls(config: &mut Config, dir: &Path, mutual: bool) {
    config.tls.tls_cert = Some(dir.join("server.pem"));
    config.tls.tls_key = Some(dir.join("server.key"));
    config.tls.tls_client_ca = mutual.then(|| dir.join("ca.pem"));
}

/// An HTTPS client that trusts only the test CA, with the client certificate if asked.
/// rustls, named: the workspace's reqwest also has native-tls (kumo.http), which would be
/// the default and takes no PEM identity.
fn client(pki: &Pki, with_cert: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if with_cert {
        builder = builder.identity(reqwest::Identity::from_pem(pki.client.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

fn https(daemon: &spoolrelay::Daemon, path: &str) -> String {
    format!("https://{}{path}", daemon.addr)
}

/// POSTs `body` to `path` with `token` (if any); returns the status and the JSON answer.
async fn post(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut req = http.post(url).body(body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("request answered");
    let status = resp.status();
    (status, resp.json().await.expect("a JSON answer"))
}

#[tokio::test]
async fn https_ingest_with_a_token_is_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let daemon = common::start_with(
        &common::hold_policy("held"),
        &dir.path().join("spool"),
        |c| {
            use_tls(c, dir.path(), false);
            c.auth.ingest_token = vec!["s3cret".into()];
        },
    )
    .await;
    let http = client(&pki, false);
    let url = https(&daemon, "/api/v1/queues/orders/messages");
    let (status, answer) = post(&http, url, Some("s3cret"), "hello").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["id"].is_string(), "{answer}");
    assert_eq!(common::queued(&daemon), 1);
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::new()
        .post(common::url(&daemon, "/api/v1/queues/orders/messages"))
        .bearer_auth("s3cret")
        .body("hello")
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered on the TLS port");
    assert_eq!(common::queued(&daemon), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_wrong_or_missing_token_gets_401_and_nothing_is_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&common::hold_policy("held"), dir.path(), |c| {
        c.auth.ingest_token = vec!["right-token".into(), "other".into()];
    })
    .await;
    let http = reqwest::Client::new();
    let message = || common::url(&daemon, "/api/v1/queues/orders/messages");
    let batch = common::url(&daemon, "/api/v1/queues/orders/batch");
    let inject = json!({"envelope_sender": "a@b.c", "content": "x",
        "recipients": [{"email": "u@example.com"}]})
    .to_string();
    for token in [
        None,
        Some("wrong"),
        Some("right-toke"),
        Some("right-token2"),
        Some(""),
    ] {
        let (status, answer) = post(&http, message(), token, "m").await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "token {token:?}: {answer}"
        );
        assert!(
            answer["error"].as_str().unwrap().contains("bearer token"),
            "{answer}"
        );
        let (status, _) = post(&http, batch.clone(), token, "{\"data\":\"a\"}\n").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "batch, token {token:?}");
        let url = common::url(&daemon, "/api/inject/v1");
        let (status, _) = post(&http, url, token, inject.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "inject, token {token:?}");
    }
    assert_eq!(
        common::queued(&daemon),
        0,
        "a refused request spooled something"
    );
    // The right tokens (either of the two) are let in: the refusals above were about them.
    for token in ["right-token", "other"] {
        let (status, answer) = post(&http, message(), Some(token), "m").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    assert_eq!(common::queued(&daemon), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_token_limited_to_a_prefix_writes_inside_and_gets_403_outside() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# tenant A\ntok-a tenant-a-* shared\n").unwrap();
    let daemon = common::start_with(
        &common::hold_policy("held"),
        &dir.path().join("spool"),
        |c| {
            c.auth.ingest_tokens_file = Some(tokens.clone());
        },
    )
    .await;
    let http = reqwest::Client::new();
    let message = |q: &str| common::url(&daemon, &format!("/api/v1/queues/{q}/messages"));
    for queue in ["tenant-a-orders", "shared"] {
        let (status, answer) = post(&http, message(queue), Some("tok-a"), "m").await;
        assert_eq!(status, StatusCode::OK, "{queue}: {answer}");
    }
    assert_eq!(common::queued(&daemon), 2);
    for queue in ["tenant-b-orders", "shared2", "tenant-a"] {
        let (status, answer) = post(&http, message(queue), Some("tok-a"), "m").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{queue}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(queue),
            "{answer}"
        );
    }
    let batch = common::url(&daemon, "/api/v1/queues/tenant-b-x/batch");
    let (status, _) = post(&http, batch, Some("tok-a"), "{\"data\":\"a\"}\n").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // An injection naming an allowed and a forbidden queue is refused whole.
    let inject = json!({"envelope_sender": "a@b.c", "content": "x", "recipients": [
        {"email": "u@example.com", "metadata": {"queue": "tenant-a-mail"}},
        {"email": "v@example.com", "metadata": {"queue": "tenant-b-mail"}},
    ]});
    let url = common::url(&daemon, "/api/inject/v1");
    let (status, answer) = post(&http, url.clone(), Some("tok-a"), inject.to_string()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("tenant-b-mail"),
        "{answer}"
    );
    assert_eq!(
        common::queued(&daemon),
        2,
        "a refused request spooled something"
    );
    let inside = json!({"envelope_sender": "a@b.c", "content": "x", "recipients": [
        {"email": "u@example.com", "metadata": {"queue": "tenant-a-mail"}},
    ]});
    let (status, answer) = post(&http, url, Some("tok-a"), inside.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(common::queued(&daemon), 3);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let daemon = common::start_with(
        &common::hold_policy("held"),
        &dir.path().join("spool"),
        |c| use_tls(c, dir.path(), true),
    )
    .await;
    let url = https(&daemon, "/api/v1/queues/orders/messages");
    let refused = client(&pki, false).post(url.clone()).body("m").send().await;
    assert!(
        refused.is_err(),
        "served without a client certificate: {refused:?}"
    );
    assert_eq!(common::queued(&daemon), 0);
    let (status, answer) = post(&client(&pki, true), url, None, "m").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(common::queued(&daemon), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_can_require_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&common::hold_policy("held"), dir.path(), |c| {
        c.auth.metrics_token = Some("scrape".into());
    })
    .await;
    let http = reqwest::Client::new();
    let url = common::url(&daemon, "/metrics");
    let without = http.get(&url).send().await.unwrap();
    assert_eq!(without.status(), StatusCode::UNAUTHORIZED);
    let wrong = http.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let with = http.get(&url).bearer_auth("scrape").send().await.unwrap();
    assert_eq!(with.status(), StatusCode::OK);
    assert!(with.text().await.unwrap().ends_with("# EOF\n"));
    // Ingest stays open: the metrics token is not an ingest token.
    let message = common::url(&daemon, "/api/v1/queues/q/messages");
    let (status, _) = post(&http, message, None, "m").await;
    assert_eq!(status, StatusCode::OK);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_stalled_tls_handshake_blocks_neither_others_nor_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let daemon = common::start_with(
        &common::hold_policy("held"),
        &dir.path().join("spool"),
        |c| {
            use_tls(c, dir.path(), false);
            c.limits.http_header_timeout = Duration::from_secs(1);
            c.limits.max_connections = 2;
        },
    )
    .await;
    // Two sockets that never send a ClientHello hold both permits until the timeout.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(tokio::net::TcpStream::connect(daemon.addr).await.unwrap());
    }
    // The daemon closes them once the handshake timeout passed (generous bound).
    for socket in &mut stalled {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a stalled handshake was not closed: {read:?}"
        );
    }
    // With the permits back, a real client is served.
    let url = https(&daemon, "/api/v1/queues/orders/messages");
    let (status, _) = post(&client(&pki, false), url, None, "m").await;
    assert_eq!(status, StatusCode::OK);
    // A new stalled socket does not hold shutdown past the grace.
    let _open = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(10), daemon.stop())
        .await
        .expect("shutdown not blocked by a stalled handshake")
        .unwrap();
}

#[tokio::test]
async fn a_request_without_a_token_is_refused_before_its_body_is_read() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start_with(&common::hold_policy("held"), dir.path(), |c| {
        c.auth.ingest_token = vec!["s3cret".into()];
        c.limits.http_body_timeout = Duration::from_secs(60);
    })
    .await;
    // Headers announce 8 MiB; the body never comes. The answer must not wait for it.
    let mut socket = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let head = "POST /api/v1/queues/orders/messages HTTP/1.1\r\nhost: x\r\n\
                content-length: 8388608\r\n\r\n";
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer));
    read.await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert_eq!(common::queued(&daemon), 0);
    daemon.stop().await.unwrap();
}
