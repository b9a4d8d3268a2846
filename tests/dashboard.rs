//! The Grafana dashboard (`docs/grafana/spoolrelay.json`) loads: it parses, and every
//! metric its queries and variables name is a series a real daemon's `/metrics` exports.
//! A renamed metric, or a typo in a panel, fails here instead of showing an empty graph.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/spoolrelay.json");

/// `ok` delivers, `flaky` fails once and then delivers, `dead` is refused for good and
/// dead-lettered: every per-queue family gets samples.
const POLICY: &str = r#"
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sender' } },
    retry_interval = '100ms',
    on_permanent_failure = 'dead_letter',
  }
end)
kumo.on('make.sender', function(domain)
  local sender = {}
  function sender:send(message)
    if domain == 'dead' then kumo.reject(550, 'refused for good') end
    if domain == 'flaky' and message:num_attempts() == 0 then kumo.reject(451, 'once') end
    return '250 ok'
  end
  return sender
end)
"#;

/// Every PromQL text in the dashboard: panel targets and variable queries.
fn queries(dash: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().expect("a target's expr").to_owned());
        }
    }
    for var in dash["templating"]["list"].as_array().expect("variables") {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// The `spoolrelay_*` names in a PromQL text.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in query.match_indices("spoolrelay_") {
        let name: String = query[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// Sample names of an exposition (`_total`, `_bucket`, … included).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names("sum by (le) (rate(spoolrelay_a_bucket{q=\"x\"}[5m])) / spoolrelay_b");
    assert_eq!(
        names,
        BTreeSet::from(["spoolrelay_a_bucket".into(), "spoolrelay_b".into()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_an_exported_metric() {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("the dashboard is JSON");
    let used: BTreeSet<String> = queries(&dash)
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    // What the issue asks the dashboard to show.
    for needed in [
        "spoolrelay_accepted_total",
        "spoolrelay_delivered_total",
        "spoolrelay_queue_depth",
        "spoolrelay_queue_bytes",
        "spoolrelay_queue_oldest_age_seconds",
        "spoolrelay_spool_fsync_duration_seconds_bucket",
        "spoolrelay_transient_failures_total",
        "spoolrelay_permanent_failures_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }

    let dir = tempfile::tempdir().unwrap();
    let daemon = common::start(POLICY, dir.path()).await;
    let http = reqwest::Client::new();
    for queue in ["ok", "flaky", "dead"] {
        let url = common::url(&daemon, &format!("/api/v1/queues/{queue}/messages"));
        let r = http.post(url).body("x").send().await.unwrap();
        assert!(r.status().is_success());
    }
    common::wait_until("every message settled", Duration::from_secs(20), || {
        common::queued(&daemon) == 0
    })
    .await;
    let scrape = http
        .get(common::url(&daemon, "/metrics"))
        .send()
        .await
        .unwrap();
    let text = scrape.text().await.unwrap();
    let have = exported(&text);
    let missing: Vec<&String> = used.iter().filter(|m| !have.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not export: {missing:?}\n{text}"
    );
    daemon.stop().await.unwrap();
}
