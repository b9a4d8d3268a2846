//! `spoolctl --url`: the same commands against a running daemon's admin API.
//!
//! The daemon holds the spool's lock while it runs, so this is the only way to look at or
//! change a live spool. Answers are read into the same types the offline commands build
//! (`SpoolStats`, `MessageView`) and printed by the same functions.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use spool::view::MessageView;
use spool::SpoolStats;

use crate::output::Output;

pub struct Remote {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Remote {
    pub fn new(
        url: &str,
        token: Option<String>,
        tls: &crate::client_tls::ClientTls,
    ) -> anyhow::Result<Remote> {
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "--url must be an http:// or https:// address (e.g. http://127.0.0.1:8000), \
             got {url:?}"
        );
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(120));
        if let Some(config) = tls.config()? {
            agent = agent.tls_config(config);
        }
        Ok(Remote {
            base: url.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()),
            agent: agent.build(),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(token) => req.set("Authorization", &format!("Bearer {token}")),
            None => req,
        }
    }

    /// Sends `req` (with `body` as JSON if given) and reads the JSON answer, turning the
    /// daemon's `{"error": ...}` into the error message.
    fn call<T: DeserializeOwned>(
        &self,
        req: ureq::Request,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let what = format!("{} {}", req.method(), req.url());
        let sent = match body {
            Some(body) => req.send_json(body),
            None => req.call(),
        };
        match sent {
            Ok(resp) => resp
                .into_json()
                .with_context(|| format!("{what}: the answer is not the expected JSON")),
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let error = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                let hint = if status == 401 {
                    " (pass --token or set SPOOLRELAY_ADMIN_TOKEN)"
                } else {
                    ""
                };
                anyhow::bail!("{what}: HTTP {status}: {error}{hint}")
            }
            Err(ureq::Error::Transport(e)) => {
                anyhow::bail!("cannot reach the daemon ({what}): {e}")
            }
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(self.request("GET", path), None)
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: Value) -> anyhow::Result<T> {
        self.call(self.request("POST", path), Some(body))
    }

    pub fn summary(&self, out: &Output) -> anyhow::Result<ExitCode> {
        let stats: SpoolStats = self.get("/api/admin/queues")?;
        let now = spool::now_ms();
        let suspended = if out.json {
            Vec::new()
        } else {
            self.suspended()?
        };
        crate::inspect::print_summary(out, &stats, now, &suspended)
    }

    /// The suspended queues with reason and expiry (an older daemon sends names only).
    fn suspended(&self) -> anyhow::Result<Vec<crate::inspect::Suspended>> {
        let v: Value = self.get("/api/admin/suspended")?;
        let names: Vec<String> = serde_json::from_value(v["suspended"].clone()).unwrap_or_default();
        Ok(names
            .into_iter()
            .map(|queue| {
                let detail = &v["details"][&queue];
                crate::inspect::Suspended {
                    reason: detail["reason"].as_str().map(str::to_owned),
                    until_ms: detail["until_ms"].as_u64(),
                    queue,
                }
            })
            .collect())
    }

    pub fn ls(
        &self,
        out: &Output,
        queue: &str,
        limit: usize,
        due: bool,
        failed: bool,
    ) -> anyhow::Result<ExitCode> {
        let path = format!(
            "/api/admin/queues/{}/messages?limit={limit}&due={due}&failed={failed}",
            encode(queue)
        );
        let msgs: Vec<MessageView> = self.get(&path)?;
        crate::inspect::print_ls(out, &msgs, spool::now_ms())
    }

    pub fn show(&self, out: &Output, id: u64, data: bool) -> anyhow::Result<ExitCode> {
        let view: MessageView = self.get(&format!("/api/admin/messages/{id}?data={data}"))?;
        crate::inspect::print_show(out, &view, data)
    }

    pub fn dead_letter_ls(&self, out: &Output, queue: Option<&str>) -> anyhow::Result<ExitCode> {
        let path = match queue {
            Some(q) => format!("/api/admin/dead-letter?queue={}", encode(q)),
            None => "/api/admin/dead-letter".into(),
        };
        let dead: Vec<MessageView> = self.get(&path)?;
        crate::repair::print_dead_letters(out, &dead)
    }

    pub fn dead_letter_requeue(
        &self,
        out: &Output,
        queue: Option<&str>,
        id: Option<u64>,
    ) -> anyhow::Result<ExitCode> {
        let body = json!({ "queue": queue, "id": id.map(|id| id.to_string()) });
        let answer: Value = self.post("/api/admin/dead-letter/requeue", body)?;
        out.done("requeued from dead-letter", count(&answer)?)
    }

    pub fn requeue(&self, out: &Output, queue: &str, to: Option<&str>) -> anyhow::Result<ExitCode> {
        let path = format!("/api/admin/queues/{}/requeue", encode(queue));
        let answer: Value = self.post(&path, json!({ "to": to }))?;
        let what = if to.is_some() {
            "moved"
        } else {
            "made due now"
        };
        out.done(what, count(&answer)?)
    }

    /// `suspend` (with its optional `{"for", "reason"}`) or `resume`.
    pub fn suspension(
        &self,
        out: &Output,
        queue: &str,
        action: &str,
        body: Value,
    ) -> anyhow::Result<ExitCode> {
        let path = format!("/api/admin/queues/{}/{action}", encode(queue));
        let answer: Value = self.post(&path, body)?;
        if out.json {
            out.json(&answer);
        } else {
            let state = if answer["suspended"] == true {
                "suspended"
            } else {
                "resumed"
            };
            let already = if answer["changed"] == false {
                " (already)"
            } else {
                ""
            };
            let until = match answer["until_ms"].as_u64() {
                Some(until) => format!(
                    " for {}",
                    crate::output::age(until.saturating_sub(spool::now_ms()))
                ),
                None => String::new(),
            };
            println!("queue {queue:?}: {state}{already}{until}");
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl Remote {
    /// `POST /api/admin/reload`: the daemon loads its policy file again; a refusal comes
    /// back as the error (file:line).
    pub fn reload(&self, out: &Output) -> anyhow::Result<ExitCode> {
        let answer: Value = self.post("/api/admin/reload", json!({}))?;
        if out.json {
            out.json(&answer);
        } else {
            println!(
                "policy {} reloaded (generation {})",
                answer["chunk"].as_str().unwrap_or("?"),
                answer["generation"]
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Starts a drain and, with `wait`, follows it (`GET /api/admin/drain?wait=`) to its
    /// end: the exit code is then the daemon's own (0 drained, 3 leftovers, 4 deadline).
    pub fn drain(
        &self,
        out: &Output,
        deadline: Option<&str>,
        wait: bool,
    ) -> anyhow::Result<ExitCode> {
        let body = json!({ "deadline": deadline });
        if !wait {
            let started: Value = self.post("/api/admin/drain", body)?;
            if out.json {
                out.json(&started);
            } else {
                print_drain(&started);
            }
            return Ok(ExitCode::SUCCESS);
        }
        // Every request waits for the end (20 s at most), so the one in flight when the
        // drain ends gets the outcome before the daemon closes its listener.
        let mut status: Value = self.post("/api/admin/drain?wait=20s", body)?;
        loop {
            if out.json {
                out.json(&status);
            } else {
                print_drain(&status);
            }
            if let Some(code) = status["exit_code"].as_u64() {
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            status = self.get("/api/admin/drain?wait=20s").with_context(|| {
                "the daemon stopped answering before it reported how the drain ended \
                 (it ended between two polls): its exit code and log say how"
            })?;
        }
    }
}

/// One drain state for people: the outcome (or progress) and what is left, by why.
fn print_drain(status: &Value) {
    let left = &status["remaining"];
    match status["outcome"].as_str() {
        None => println!(
            "draining: {} deliverable ({} in flight), deadline in {}",
            left["deliverable"],
            left["in_flight"],
            crate::output::age(
                status["deadline_ms"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(spool::now_ms())
            )
        ),
        Some("drained") => println!("drained: every message delivered"),
        Some("leftovers") => println!("drained what was deliverable; messages are left:"),
        Some(other) => println!("drain ended ({other}): the deadline passed first; left:"),
    }
    let per_queue = |why: &str, map: &Value| {
        for (queue, n) in map.as_object().into_iter().flatten() {
            println!("  {queue}: {n} {why}");
        }
    };
    per_queue("in a suspended queue", &left["suspended"]);
    per_queue(
        "waiting for a retry due after the deadline",
        &left["past_deadline"],
    );
    if left["dead_letter"].as_u64().unwrap_or(0) > 0 {
        println!("  dead letters: {}", left["dead_letter"]);
    }
}

fn count(answer: &Value) -> anyhow::Result<u64> {
    answer["count"]
        .as_u64()
        .with_context(|| format!("the daemon's answer has no count: {answer}"))
}

/// Percent-encodes a path segment or query value: queue names may hold `/`, `@`, `!`, …
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_everything_but_unreserved() {
        assert_eq!(
            super::encode("c:t@ex.com!r/x y"),
            "c%3At%40ex.com%21r%2Fx%20y"
        );
    }
}
