#!/usr/bin/env bash
# The daemon power-loss test (tests/powerloss.rs) for longer than CI runs it: kill -9 plus a
# simulated power cut per cycle, then a drain to the broker; every acknowledged message must
# arrive. Needs root (or fusermount3) and /dev/fuse.
#
#   bash tests/powerloss.sh        # 50 cycles
#   bash tests/powerloss.sh 200    # 200 cycles
set -euo pipefail
cd "$(dirname "$0")/.."
POWERLOSS_CYCLES="${1:-50}" cargo test --test powerloss acked_messages_survive_power_cuts -- --nocapture
