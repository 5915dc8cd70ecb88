#!/usr/bin/env bash
# Installs the RocketMQ servers the tests, benchmarks and demo run against,
# and prints where they are (stdout; progress on stderr).
#
# MQPLUG_BROKER picks them:
#   java (default)  Apache RocketMQ from Maven Central: prints the jar folder
#   rust            the Rust rocketmq-namesrv/rocketmq-broker 1.0.0 crates,
#                   built with cargo (10-30 minutes the first time): prints
#                   the bin folder
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
case "${MQPLUG_BROKER:-java}" in
    java) exec bash "$here/install-rocketmq-java.sh" ;;
    rust) exec bash "$here/install-rocketmq-rust.sh" ;;
    *) echo "MQPLUG_BROKER must be java or rust, not '${MQPLUG_BROKER}'" >&2; exit 2 ;;
esac
