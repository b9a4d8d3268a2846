//! TLS (and what SASL can be shown here) to the brokers, end to end through the daemon:
//! certificates made by the test, `stunnel4` terminating TLS in front of the shared RabbitMQ
//! and of a librdkafka mock cluster that advertises stunnel's port, and in front of a local
//! HTTP endpoint for `kumo.http`.
//!
//! Negative cases: a wrong CA and an expired certificate fail with the reason in the
//! message's `last_error`, the message stays spooled, and a daemon restarted with a fixed
//! policy delivers it.

mod common;
#[path = "common/stunnel.rs"]
mod stunnel;

use std::path::Path;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, FutureProducer, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use stunnel::{Pki, Stunnel};

/// Posts one message to `queue` and checks the 200.
async fn post(daemon: &spoolrelay::Daemon, queue: &str, body: &str) {
    let resp = reqwest::Client::new()
        .post(common::url(
            daemon,
            &format!("/api/v1/queues/{queue}/messages"),
        ))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "ingest refused");
}

/// Waits until the one spooled message of `queue` has failed at least once; returns its
/// `last_error`.
async fn first_failure(daemon: &spoolrelay::Daemon, queue: &str) -> String {
    let mut error = String::new();
    common::wait_until("a recorded failed attempt", Duration::from_secs(30), || {
        let msgs = daemon.spool.list(queue, 10).unwrap();
        assert_eq!(msgs.len(), 1, "the message left the spool: {msgs:?}");
        error = msgs[0].last_error.clone().unwrap_or_default();
        msgs[0].attempts >= 1 && !error.is_empty()
    })
    .await;
    error
}

async fn wait_empty(daemon: &spoolrelay::Daemon) {
    common::wait_until("the spool to empty", Duration::from_secs(30), || {
        common::queued(daemon) == 0
    })
    .await;
}

// ---------------------------------------------------------------- AMQP

fn amqp_policy(client: &str, queue: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = 'make.amqp' }} }},
    retry_interval = '200ms',
    max_retry_interval = '500ms',
  }}
end)
kumo.on('make.amqp', function()
  local client = kumo.amqp.build_client({client})
  local sender = {{}}
  function sender:send(message)
    local r = client:publish {{ routing_key = '{queue}', payload = message:get_data() }}:wait()
    if r.status ~= 'Ack' then kumo.reject(451, 'broker said ' .. r.status) end
    return '250 ok'
  end
  function sender:close() client:close() end
  return sender
end)
"#
    )
}

/// The table form: `amqps://` with a private CA, heartbeat and connect timeout; guest/guest is
/// RabbitMQ's PLAIN login, here over TLS.
fn amqps_table(port: u16, ca: &std::path::Path) -> String {
    format!(
        "{{ url = 'amqps://guest:guest@127.0.0.1:{port}/%2f', tls = {{ ca_file = '{}' }}, heartbeat = 10, connect_timeout = '5s' }}",
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_with_a_private_ca_delivers() {
    let pki = Pki::new();
    let tls = Stunnel::start(&pki, &pki.cert, 0, 5672);
    let (_conn, channel) = common::amqp::fresh_queue("tls-amqp-ok").await;
    let dir = tempfile::tempdir().unwrap();
    let lua = amqp_policy(&amqps_table(tls.port, &pki.ca), "tls-amqp-ok");
    let daemon = common::start(&lua, dir.path()).await;
    post(&daemon, "q", "over amqps").await;
    wait_empty(&daemon).await;
    let got = common::amqp::take_all(&channel, "tls-amqp-ok", Duration::from_millis(500)).await;
    assert_eq!(got, vec![b"over amqps".to_vec()]);
    daemon.stop().await.unwrap();
}

/// A daemon process (its log is what an operator reads), `SSL_CERT_FILE` set if given.
struct Relay {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

fn spawn_relay(lua: &str, dir: &Path, ssl_cert_file: Option<&Path>) -> Relay {
    let policy = dir.join("policy.lua");
    std::fs::write(&policy, lua).unwrap();
    let log = dir.join("relay.log");
    let port = common::free_port();
    let mut cmd = common::relay_command(&policy, &dir.join("spool"), port);
    cmd.arg("--drain-timeout").arg("2s");
    if let Some(ca) = ssl_cert_file {
        cmd.env("SSL_CERT_FILE", ca);
    }
    let child = cmd
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn spoolrelay");
    Relay { child, port, log }
}

/// A failed test must not leave the daemon running (it would also keep cargo's lock file
/// open for whoever runs the tests under `flock`).
impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    async fn stop(mut self) {
        let ok = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        let status =
            common::wait_exit(&mut self.child, "spoolrelay", Duration::from_secs(20)).await;
        assert!(status.success(), "{}", common::tail(&self.log, 20));
    }

    /// Waits for a log entry that names `queue` and says `why`; returns it.
    async fn log_line(&self, queue: &str, why: &str) -> String {
        let queue_field = format!("queue={queue}");
        let start = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            // An entry runs from its timestamp to the next one (errors carry Lua tracebacks).
            let found = text
                .split("\n20")
                .find(|e| e.contains(&queue_field) && e.contains(why));
            if let Some(entry) = found {
                return entry.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no log line with {queue_field} and {why:?} within 30 s:\n{}",
                common::tail(&self.log, 10)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn post(&self, queue: &str, body: &str) {
        common::wait_live(self.port).await;
        let resp = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/api/v1/queues/{queue}/messages",
                self.port
            ))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "ingest refused");
    }

    /// Waits until the one message of `queue` has failed once (admin API); its `last_error`.
    async fn last_error(&self, queue: &str) -> String {
        let url = format!(
            "http://127.0.0.1:{}/api/admin/queues/{queue}/messages",
            self.port
        );
        let start = std::time::Instant::now();
        loop {
            let msgs: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            if let Some(error) = msgs[0]["last_error"].as_str() {
                return error.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no failed attempt of {queue} within 30 s: {msgs}\n{}",
                common::tail(&self.log, 10)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn spooled(&self) -> Option<u64> {
        common::spooled(&reqwest::Client::new(), self.port).await
    }
}

/// Holds one message on a failing endpoint (checking the log line), stops, and restarts
/// with `fixed`: the message reaches RabbitMQ.
async fn held_then_delivered(bad: Relay, fixed: impl FnOnce() -> Relay, why: &str, rq: &str) {
    let (_conn, channel) = common::amqp::fresh_queue(rq).await;
    bad.post("tlsq", "held until the policy is fixed").await;
    let entry = bad.log_line("tlsq", why).await;
    assert!(entry.contains("cannot connect"), "{entry}");
    assert!(entry.contains("queue 'tlsq'"), "{entry}");
    assert_eq!(
        bad.spooled().await,
        Some(1),
        "the message must stay spooled"
    );
    bad.stop().await;

    let good = fixed();
    common::wait_live(good.port).await;
    let start = std::time::Instant::now();
    while good.spooled().await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not delivered after the fix: {}",
            common::tail(&good.log, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = common::amqp::take_all(&channel, rq, Duration::from_millis(500)).await;
    assert_eq!(got, vec![b"held until the policy is fixed".to_vec()]);
    good.stop().await;
}

/// The seed's string form, `amqps://…`, trusts `SSL_CERT_FILE`: the wrong CA there fails
/// with OpenSSL's reason, the right one delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_wrong_ca_is_held_then_delivered() {
    let pki = Pki::new();
    let tls = Stunnel::start(&pki, &pki.cert, 0, 5672);
    let rq = "tls-amqp-wrong-ca";
    let lua = amqp_policy(
        &format!("'amqps://guest:guest@127.0.0.1:{}/%2f'", tls.port),
        rq,
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = spawn_relay(&lua, dir.path(), Some(&pki.other_ca));
    let fixed = || spawn_relay(&lua, dir.path(), Some(&pki.ca));
    held_then_delivered(bad, fixed, "certificate verify failed", rq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_expired_certificate_is_held_then_delivered() {
    let pki = Pki::new();
    let expired = Stunnel::start(&pki, &pki.expired, 0, 5672);
    let good = Stunnel::start(&pki, &pki.cert, 0, 5672);
    let rq = "tls-amqp-expired";
    let dir = tempfile::tempdir().unwrap();
    let bad = spawn_relay(
        &amqp_policy(&amqps_table(expired.port, &pki.ca), rq),
        dir.path(),
        None,
    );
    let fixed_lua = amqp_policy(&amqps_table(good.port, &pki.ca), rq);
    let fixed = || spawn_relay(&fixed_lua, dir.path(), None);
    // lapin's TLS layer (tcp-stream) keeps OpenSSL's error but drops its verify result, so
    // the log says "certificate verify failed", not "has expired" (see docs/connecting.md).
    held_then_delivered(bad, fixed, "certificate verify failed", rq).await;
}

/// A webhook policy (policy/examples/webhook.lua's shape) posting to `url`.
fn webhook_policy(url: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = 'make.hook' }} }},
    retry_interval = '1s',
  }}
end)
kumo.on('make.hook', function(domain, tenant, campaign)
  local client = kumo.http.build_client {{ timeout = '5s' }}
  local sender = {{}}
  function sender:send(message)
    local response = client:post('{url}'):body(message:get_data()):send()
    if response:status_is_success() then return '250 posted' end
    kumo.reject(451, 'status ' .. response:status_code())
  end
  return sender
end)
"#
    )
}

/// `kumo.http` trusts what the brokers trust (issue 14: "TLS uses the same trust settings
/// as the brokers"): with the wrong CA in `SSL_CERT_FILE` the POST fails with OpenSSL's
/// reason and the message stays; with the right one it reaches the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_webhook_trusts_ssl_cert_file_like_the_brokers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let posts = Arc::new(AtomicUsize::new(0));
    let counter = posts.clone();
    let app = axum::Router::new().route(
        "/log",
        axum::routing::post(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let pki = Pki::new();
    let tls = Stunnel::start(&pki, &pki.cert, 0, http_port);
    let lua = webhook_policy(&format!("https://localhost:{}/log", tls.port));
    let dir = tempfile::tempdir().unwrap();

    let bad = spawn_relay(&lua, dir.path(), Some(&pki.other_ca));
    bad.post("hookq", "over https").await;
    let error = bad.last_error("hookq").await;
    assert!(error.contains("certificate verify failed"), "{error}");
    assert_eq!(
        bad.spooled().await,
        Some(1),
        "the message must stay spooled"
    );
    assert_eq!(posts.load(Ordering::SeqCst), 0);
    bad.stop().await;

    let good = spawn_relay(&lua, dir.path(), Some(&pki.ca));
    common::wait_live(good.port).await;
    let start = std::time::Instant::now();
    while good.spooled().await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not delivered with the right CA: {}",
            common::tail(&good.log, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(posts.load(Ordering::SeqCst), 1, "posted once over https");
    good.stop().await;
}

// ---------------------------------------------------------------- Kafka

/// A mock Kafka cluster whose one broker advertises `advertised` (stunnel's port), so clients
/// that bootstrap through TLS stay on TLS. Returns the mock's own (plain) port too.
struct TlsMockKafka {
    /// Owns the mock cluster (librdkafka runs it inside this client).
    _owner: BaseProducer,
    plain_port: u16,
}

fn mock_kafka_advertising(advertised: u16, topic: &str) -> TlsMockKafka {
    use rdkafka::bindings as rd;
    let owner: BaseProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .expect("a client with a mock cluster");
    let host = std::ffi::CString::new("127.0.0.1").unwrap();
    let topic = std::ffi::CString::new(topic).unwrap();
    // SAFETY: the mock cluster belongs to `owner`, alive for all these calls (and kept in
    // the returned value); broker 1 is the mock's only broker.
    let plain = unsafe {
        let raw = rd::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        assert!(!raw.is_null(), "no mock cluster on the client");
        let plain = std::ffi::CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(raw))
            .to_string_lossy()
            .into_owned();
        let err = rd::rd_kafka_mock_topic_create(raw, topic.as_ptr(), 1, 1);
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        rd::rd_kafka_mock_broker_set_host_port(raw, 1, host.as_ptr(), advertised as i32);
        plain
    };
    let plain_port = plain.rsplit(':').next().unwrap().parse().unwrap();
    TlsMockKafka {
        _owner: owner,
        plain_port,
    }
}

fn kafka_tls_policy(port: u16, ca: &std::path::Path, topic: &str) -> String {
    format!(
        r#"
kumo.on('get_queue_config', function()
  return kumo.make_queue_config {{
    protocol = {{ custom_lua = {{ constructor = 'make.kafka' }} }},
    retry_interval = '200ms',
    max_retry_interval = '500ms',
  }}
end)
kumo.on('make.kafka', function()
  local producer = kumo.kafka.build_producer {{
    ['bootstrap.servers'] = '127.0.0.1:{port}',
    ['security.protocol'] = 'ssl',
    ['ssl.ca.location'] = '{}',
    ['ssl.endpoint.identification.algorithm'] = 'https',
    ['compression.type'] = 'zstd',
    ['linger.ms'] = '2',
  }}
  local sender = {{}}
  function sender:send(message)
    producer:send {{ topic = '{topic}', payload = message:get_data(), timeout = '3s' }}
    return '250 ok'
  end
  function sender:close() producer:close() end
  return sender
end)
"#,
        ca.display()
    )
}

/// Reads partition 0 of `topic` through TLS until `want` messages came (or 20 s passed).
fn consume_tls(port: u16, ca: &std::path::Path, topic: &str, want: usize) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{port}"))
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca.display().to_string())
        .set("group.id", "broker-tls-test")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while got.len() < want && start.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            got.push(m.payload().unwrap_or_default().to_vec());
        }
    }
    got
}

/// Held on a bad TLS endpoint (`bad_cert` served, `bad_ca` trusted) with librdkafka's reason
/// in `last_error`; restarted with the right CA and certificate (zstd, hostname verification
/// on): delivered, and read back over TLS.
async fn kafka_held_then_delivered(
    bad_cert: fn(&Pki) -> &Path,
    bad_ca: fn(&Pki) -> &Path,
    why: &str,
    topic: &str,
) {
    let pki = Pki::new();
    let port = common::free_port();
    let kafka = mock_kafka_advertising(port, topic);
    let bad = Stunnel::start(&pki, bad_cert(&pki), port, kafka.plain_port);
    let dir = tempfile::tempdir().unwrap();

    let daemon = common::start(&kafka_tls_policy(port, bad_ca(&pki), topic), dir.path()).await;
    post(&daemon, "kq", "kafka over tls").await;
    let error = first_failure(&daemon, "kq").await;
    assert!(error.contains(why), "{error:?} should say {why:?}");
    daemon.stop().await.unwrap();
    drop(bad);

    // The broker advertises this port: the good endpoint takes it over.
    let _good = Stunnel::start(&pki, &pki.cert, port, kafka.plain_port);
    let daemon = common::start(&kafka_tls_policy(port, &pki.ca, topic), dir.path()).await;
    wait_empty(&daemon).await;
    daemon.stop().await.unwrap();
    let (ca, topic) = (pki.ca.clone(), topic.to_string());
    let got = tokio::task::spawn_blocking(move || consume_tls(port, &ca, &topic, 1))
        .await
        .unwrap();
    assert_eq!(got, vec![b"kafka over tls".to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_ssl_wrong_ca_is_held_then_delivered() {
    kafka_held_then_delivered(
        |p| &p.cert,
        |p| &p.other_ca,
        "certificate verify failed",
        "tls-wrong-ca",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_ssl_expired_certificate_is_held_then_delivered() {
    kafka_held_then_delivered(
        |p| &p.expired,
        |p| &p.ca,
        "certificate verify failed",
        "tls-expired",
    )
    .await;
}

/// The build has what managed brokers need: TLS, SASL PLAIN/SCRAM over TLS and all four
/// codecs. (No SASL endpoint runs here: the mock cluster has none.) Without rdkafka's `ssl`
/// and `zstd` features librdkafka refuses these values when the client is created.
#[test]
fn kafka_client_accepts_sasl_ssl_and_every_codec() {
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        let made: Result<FutureProducer, _> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanisms", mechanism)
            .set("sasl.username", "u")
            .set("sasl.password", "p")
            .create();
        if let Err(e) = made {
            panic!("sasl_ssl with {mechanism} refused: {e}");
        }
    }
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let made: Result<FutureProducer, _> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("compression.type", codec)
            .create();
        if let Err(e) = made {
            panic!("compression.type={codec} refused: {e}");
        }
    }
}
