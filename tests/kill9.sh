#!/usr/bin/env bash
# The kill -9 test (tests/reliability_kill9.rs) for longer than CI runs it: the real daemon
# behind HTTP, SIGKILLed at random moments and restarted on the same spool while eight
# clients post (some payloads over 128 KiB, stored by sled as blob files), then a drain to
# a librdkafka mock cluster and a read-back. Prints a summary line with acked, delivered,
# lost and duplicates; fails if an acknowledged message is missing.
#
#   bash tests/kill9.sh        # 50 kills
#   bash tests/kill9.sh 200    # 200 kills
set -euo pipefail
cd "$(dirname "$0")/.."
RELIABILITY_CYCLES="${1:-50}" cargo test -p spoolrelay --test reliability_kill9 -- --nocapture
