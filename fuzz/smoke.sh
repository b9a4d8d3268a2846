#!/usr/bin/env bash
# Runs every fuzz target briefly so none can rot: `bash fuzz/smoke.sh [seconds per target]`.
# Installs cargo-fuzz if missing. Only the stable toolchain exists here, so
# RUSTC_BOOTSTRAP=1 lets it use the -Z flags libFuzzer instrumentation needs.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
cargo fuzz build -O
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${secs}s"
  mkdir -p "corpus/$target"
  cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 2>&1 |
    grep -E '^(Done|INFO: Seed|==[0-9]+==|SUMMARY|thread .* panicked)' || true
  # cargo fuzz exits non-zero on a crash; pipefail carries it here.
done
