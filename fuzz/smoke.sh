#!/usr/bin/env bash
# Runs every fuzz target briefly so none can rot: `bash fuzz/smoke.sh [seconds per target]`.
# Installs cargo-fuzz if missing. Only the stable toolchain exists here, so
# RUSTC_BOOTSTRAP=1 lets it use the -Z flags libFuzzer instrumentation needs.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
export RUSTC_BOOTSTRAP=1
# cc instruments C dependencies with -fsanitize=address under cargo-fuzz (zstd-sys among
# them); librdkafka's configure then links a check program against that libzstd with plain
# gcc and fails on the __asan_* symbols ("Configure failed", rdkafka's zstd feature). Linking
# its checks with the ASan runtime makes them pass; librdkafka itself stays uninstrumented.
export LDFLAGS="${LDFLAGS:-} -fsanitize=address"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
cargo fuzz build -O
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${secs}s"
  mkdir -p "corpus/$target"
  # Only the summary lines are shown; a crash must still fail the run, so the fuzzer's own
  # exit status is taken from the pipe (grep's "no line matched" is not a failure).
  set +e
  cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 2>&1 |
    grep -E '^(Done|INFO: Seed|==[0-9]+==|SUMMARY|thread .* panicked)'
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "fuzz target $target failed (exit $status); the input is under fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
