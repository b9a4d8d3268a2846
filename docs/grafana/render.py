#!/usr/bin/env python3
"""Renders docs/grafana/spoolrelay.png: the dashboard's panels drawn from real /metrics scrapes.

Grafana cannot be installed on the machine this was made on (no network beyond package
registries), so this is not a Grafana screenshot. It runs the real daemon, drives a
minute of traffic through it (three queues: one delivers, one is suspended for 20 s as a
broker outage would hold it, one has transient and permanent failures), scrapes /metrics
every second, and computes each panel's query by hand (rates over 5 s, histogram
quantiles as PromQL's histogram_quantile does) with the panel titles of spoolrelay.json.

    flock /tmp/cargo.lock cargo build --bin spoolrelay     # the binary it runs
    pip install matplotlib requests
    python3 docs/grafana/render.py [target/debug/spoolrelay]
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import requests  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SECONDS = 60
WINDOW = 5  # the rate window, in scrapes (one per second)

POLICY = r"""
kumo.on('get_queue_config', function(domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.sender' } },
    retry_interval = '2s',
    on_permanent_failure = 'dead_letter',
  }
end)
kumo.on('make.sender', function(domain)
  local sender = {}
  function sender:send(message)
    local data = message:get_data()
    if data:find('bad') then kumo.reject(550, 'refused for good') end
    if data:find('flaky') and message:num_attempts() == 0 then kumo.reject(451, 'try later') end
    return '250 ok'
  end
  return sender
end)
"""

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, frozenset(labels)): value} of one OpenMetrics exposition."""
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or line.startswith("#"):
            continue
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(base, stop):
    """About 150 messages/s over three queues; a few flaky (451 once) and bad (550) ones."""
    http = requests.Session()
    n = 0
    while not stop.is_set():
        n += 1
        queue = ["orders", "events", "audit"][n % 3]
        tag = "bad" if queue == "audit" and n % 50 == 0 else "flaky" if n % 10 == 0 else "ok"
        try:
            http.post(f"{base}/api/v1/queues/{queue}/messages", data=f"{tag} {n} " + "x" * 400, timeout=5)
        except requests.RequestException:
            pass
        time.sleep(1 / 150)


def series(scrapes, name, key="queue", **match):
    """{label value: [values per scrape]} of one metric, summed by `key`."""
    out = {}
    for i, s in enumerate(scrapes):
        for (n, labels), v in s.items():
            d = dict(labels)
            if n != name or any(d.get(k) != want for k, want in match.items()):
                continue
            out.setdefault(d.get(key, ""), [0.0] * len(scrapes))[i] += v
    return out


def rate(values):
    return [0.0 if i < WINDOW else (values[i] - values[i - WINDOW]) / WINDOW for i in range(len(values))]


def quantile(q, scrapes, name, key=None):
    """histogram_quantile(q, sum by (le[, key]) (rate(name_bucket[5s]))) per scrape."""
    per = {}
    for i in range(WINDOW, len(scrapes)):
        buckets = {}
        for (n, labels), v in scrapes[i].items():
            d = dict(labels)
            if n != name + "_bucket":
                continue
            before = scrapes[i - WINDOW].get((n, labels), 0.0)
            g = d.get(key, "") if key else ""
            le = float("inf") if d["le"] == "+Inf" else float(d["le"])
            buckets.setdefault(g, {}).setdefault(le, 0.0)
            buckets[g][le] += v - before
        for g, b in buckets.items():
            les = sorted(b)
            total = b[les[-1]]
            vals = per.setdefault(g, [float("nan")] * len(scrapes))
            if total <= 0:
                continue
            rank, lo, prev = q * total, 0.0, 0.0
            for le in les:
                if b[le] >= rank:
                    hi = le if le != float("inf") else lo
                    vals[i] = lo + (hi - lo) * ((rank - prev) / max(b[le] - prev, 1e-12))
                    break
                lo, prev = le, b[le]
    return per


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/spoolrelay")
    dash = json.load(open(os.path.join(HERE, "spoolrelay.json")))
    titles = [p["title"] for p in dash["panels"] if p["type"] != "row"]
    tmp = tempfile.mkdtemp()
    policy = os.path.join(tmp, "policy.lua")
    open(policy, "w").write(POLICY)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = subprocess.Popen(
        [binary, "--policy", policy, "--spool", os.path.join(tmp, "spool"), "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "RUST_LOG": "error"},
    )
    try:
        for _ in range(200):
            try:
                if requests.get(f"{base}/livez", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        stop = threading.Event()
        threading.Thread(target=load, args=(base, stop), daemon=True).start()
        scrapes = []
        for t in range(SECONDS):
            if t == 15:  # the "events" broker goes away for 20 s
                requests.post(f"{base}/api/admin/queues/events/suspend", timeout=5)
            if t == 35:
                requests.post(f"{base}/api/admin/queues/events/resume", timeout=5)
            scrapes.append(parse(requests.get(f"{base}/metrics", timeout=5).text))
            time.sleep(1)
        stop.set()
    finally:
        daemon.terminate()
        daemon.wait()
    draw(scrapes, titles)


def draw(scrapes, titles):
    t = list(range(len(scrapes)))
    plt.style.use("dark_background")
    fig, axes = plt.subplots(5, 2, figsize=(16, 18))
    axes = axes.flatten()

    def plot(ax, title, lines, unit=""):
        for label, values, *style in lines:
            ax.plot(t, values, style[0] if style else "-", label=label, linewidth=1.4)
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.2)
        ax.legend(fontsize=7, loc="upper left")

    def by_queue(name, fn=lambda v: v, suffix="", style="-"):
        return [(q + suffix, fn(v), style) for q, v in sorted(series(scrapes, name).items())]

    plot(axes[0], titles[0], by_queue("spoolrelay_accepted_total", rate), "msg/s")
    plot(axes[1], titles[1], by_queue("spoolrelay_delivered_total", rate), "msg/s")
    plot(axes[2], titles[2], by_queue("spoolrelay_queue_depth") + by_queue("spoolrelay_queue_due", suffix=" due now", style="--"), "messages")
    total = series(scrapes, "spoolrelay_spool_bytes", key="none")
    plot(axes[3], titles[3], by_queue("spoolrelay_queue_bytes") + [("total", v, ":") for v in total.values()], "bytes")
    plot(axes[4], titles[4], by_queue("spoolrelay_queue_oldest_age_seconds"), "seconds")
    fsync = "spoolrelay_spool_fsync_duration_seconds"
    p50, p99 = quantile(0.5, scrapes, fsync).get("", []), quantile(0.99, scrapes, fsync).get("", [])
    groups = rate(series(scrapes, "spoolrelay_spool_commit_groups_total", key="none").get("", [0.0] * len(t)))
    secs = rate(series(scrapes, "spoolrelay_spool_fsync_seconds_total", key="none").get("", [0.0] * len(t)))
    jobs = rate(series(scrapes, "spoolrelay_spool_commit_jobs_total", key="none").get("", [0.0] * len(t)))
    mean = [s / g if g else float("nan") for s, g in zip(secs, groups)]
    plot(axes[5], titles[5], [("p50", p50), ("p99", p99), ("mean", mean, "--")], "seconds")
    plot(axes[6], titles[6], [("writes per fsync", [j / g if g else float("nan") for j, g in zip(jobs, groups)])], "writes")
    plot(axes[7], titles[7],
         by_queue("spoolrelay_transient_failures_total", rate, " transient")
         + by_queue("spoolrelay_permanent_failures_total", rate, " permanent", "--")
         + by_queue("spoolrelay_dead_lettered_total", rate, " dead-lettered", ":"), "per second")
    dead = series(scrapes, "spoolrelay_dead_letter_depth", key="none").get("", [0.0] * len(t))
    quarantined = series(scrapes, "spoolrelay_quarantined_total", key="none").get("", [0.0] * len(t))
    plot(axes[8], titles[8], [("dead letters", dead), ("quarantined", quarantined)], "messages")
    lat = quantile(0.99, scrapes, "spoolrelay_send_latency_seconds", key="queue")
    plot(axes[9], titles[9], [(q + " p99", v) for q, v in sorted(lat.items())], "seconds")
    for ax in axes:
        ax.set_xlabel("seconds", fontsize=8)
    fig.suptitle(
        "spoolrelay dashboard (docs/grafana/spoolrelay.json): its panels drawn from real /metrics scrapes\n"
        "by docs/grafana/render.py, NOT by Grafana. 60 s of traffic; queue 'events' suspended from 15 s to 35 s",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(os.path.join(HERE, "spoolrelay.png"), dpi=80)


if __name__ == "__main__":
    main()
