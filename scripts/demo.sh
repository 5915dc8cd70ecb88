#!/usr/bin/env bash
# The main job, end to end, on a fresh machine:
#   installs what is missing, starts a RocketMQ name server and broker on
#   127.0.0.1 (Apache RocketMQ, data in a temporary folder) and a small rewards
#   service, starts mqplug with two example plugins (reward-logger logs the
#   reward; reward-granter grants it through the rewards service and publishes
#   marketing.reward.granted), publishes the sample events with the built-in
#   producer and more with the platform's own Go producer (rocketmq-client-go
#   v2), and shows them handled: log lines, grants recorded, follow-up events
#   read by a Go consumer. Everything it started is stopped when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash scripts/setup.sh

echo "== building mqplug and the example plugins" >&2
cargo build --quiet -p mqplug -p mqplug-tests --bins
cargo build --quiet --release --target wasm32-wasip2 \
    --manifest-path plugins/Cargo.toml --target-dir target
(cd tests/peers/go && go build -trimpath -o "$root/target/go-peers/" ./...)
mqplug="$root/target/debug/mqplug"

work=$(mktemp -d -t mqplug-demo.XXXXXX)
pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $status -ne 0 ]]; then
        # What the helpers said, to see why.
        for file in "$work"/*.err "$work"/granted.out; do
            [[ -s "$file" ]] && { echo "-- $file" >&2; tail -n 20 "$file" >&2; }
        done
    fi
    [[ -n "${MQPLUG_DEMO_KEEP:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT

# wait_for PID FILE PATTERN: waits (up to 60 s) for a line matching PATTERN in
# FILE; fails, showing FILE, if process PID exits first.
wait_for() {
    for _ in $(seq 1 600); do
        grep -q -E "$3" "$2" 2>/dev/null && return 0
        if ! kill -0 "$1" 2>/dev/null; then cat "$2" >&2; return 1; fi
        sleep 0.1
    done
    echo "timed out waiting for '$3' in $2" >&2
    return 1
}

echo "== starting a RocketMQ name server and broker (${MQPLUG_BROKER:-java}) on 127.0.0.1" >&2
"$root/target/debug/local-broker" >"$work/broker.out" 2>"$work/broker.err" &
pids+=($!)
wait_for "${pids[0]}" "$work/broker.out" '^NAME_SERVER=' || { cat "$work/broker.err" >&2; exit 1; }
name_server=$(sed -n 's/^NAME_SERVER=//p' "$work/broker.out")
[[ -n "$name_server" ]] || { echo "the broker did not start" >&2; cat "$work/broker.err" >&2; exit 1; }
echo "name server: $name_server" >&2

echo "== starting the rewards service on 127.0.0.1" >&2
# The token is a secret: mqplug reads it from its environment for the plugin.
export REWARDS_TOKEN="demo-$RANDOM$RANDOM"
"$root/target/debug/rewards-service" >"$work/rewards.out" 2>"$work/rewards.err" &
pids+=($!)
wait_for "${pids[1]}" "$work/rewards.out" '^REWARDS_URL=' || { cat "$work/rewards.err" >&2; exit 1; }
rewards_url=$(sed -n 's/^REWARDS_URL=//p' "$work/rewards.out")
echo "rewards service: $rewards_url" >&2

cat >"$work/mqplug.toml" <<TOML
name_server = "$name_server"
topic = "marketing.task.completed"

[[plugin]]
name = "reward-logger"
path = "$root/target/wasm32-wasip2/release/reward_logger.wasm"
consume_from = "first"
max_reconsume_times = 2

[[plugin]]
name = "reward-granter"
path = "$root/target/wasm32-wasip2/release/reward_granter.wasm"
consume_from = "first"
max_reconsume_times = 2
allowed_outbound_hosts = ["$rewards_url"]
allowed_topics = ["marketing.reward.granted"]
[plugin.config]
rewards_url = "$rewards_url"
dedupe_bucket = "granted"         # each grant once per message id (mqplug_plugin::Once)
[plugin.secrets]
rewards_token = { env = "REWARDS_TOKEN" }
[plugin.key_value]
buckets = ["granted"]

[store]                           # the embedded store: one file, in the demo's folder
path = "$work/state.redb"

[producer]
enabled = true
create_topic_queues = 4

[admin]
listen = "127.0.0.1:0"   # a free port; printed at start-up
TOML

echo "== starting mqplug" >&2
"$mqplug" run --config "$work/mqplug.toml" >"$work/mqplug.out" 2>"$work/mqplug.log" &
pids+=($!)
mqplug_pid=$!
wait_for "$mqplug_pid" "$work/mqplug.log" 'consumer started.*reward-granter'
grep -E 'starting mqplug|consumer started' "$work/mqplug.log" >&2

echo "== publishing examples/events.jsonl with the built-in producer" >&2
"$mqplug" publish --name-server "$name_server" --file examples/events.jsonl

echo "== publishing the platform's edge-value events with its own Go producer (SendSync, marketing-producer-group)" >&2
"$root/target/go-peers/task-producer" -nameserver "$name_server" -batch edge >"$work/go-producer.out"
go_sent=$(grep -c '"msg_id"' "$work/go-producer.out")
echo "the Go producer sent $go_sent events" >&2

expected=$(( $(grep -c . examples/events.jsonl) + go_sent ))
# One event carries a bad count on purpose: reward-granter grants the others.
expected_grants=$(( expected - 1 ))
echo "== waiting for mqplug to handle $expected events in each plugin" >&2
for _ in $(seq 1 600); do
    handled=$(grep -c -E 'granting|handler error: event_data.count' "$work/mqplug.log" || true)
    granted=$(grep -c -E 'granted [0-9]+ points' "$work/mqplug.log" || true)
    [[ "$handled" -ge "$expected" && "$granted" -ge "$expected_grants" ]] && break
    sleep 0.1
done

# Started once the follow-ups exist: the name server then knows the topic's
# route (a consumer that subscribes sooner waits for its next route refresh).
echo "== a Go consumer (rocketmq-client-go) reads marketing.reward.granted from its first message" >&2
# It stops at the end of its stdin: a FIFO this script holds open until it exits.
mkfifo "$work/reader-stdin"
"$root/target/go-peers/task-consumer" -nameserver "$name_server" -topic marketing_reward_granted \
    -group demo-reward-readers -from-first -raw >"$work/granted.out" 2>"$work/granted.err" \
    <"$work/reader-stdin" &
pids+=($!)
reader=$!
exec 4>"$work/reader-stdin"
for _ in $(seq 1 600); do
    announced=$(grep -c '"REWARD_GRANTED"' "$work/granted.out" || true)
    [[ "$announced" -ge "$expected_grants" ]] && break
    kill -0 "$reader" 2>/dev/null || break
    sleep 0.1
done
strip() { sed 's/\x1b\[[0-9;]*m//g'; }
echo
echo "What reward-logger did (the event with a bad count is rejected: the broker"
echo "will redeliver it, then dead-letter it):"
grep -E 'granting|handler error: event_data.count' "$work/mqplug.log" | strip
echo
echo "What reward-granter did (the bad count is a poison event: straight to the"
echo "dead-letter queue, no retries):"
grep -E 'granted [0-9]+ points|dead letter' "$work/mqplug.log" | strip
echo
echo "marketing.reward.granted, as the Go consumer read it:"
grep '"REWARD_GRANTED"' "$work/granted.out" | sed -n 's/.*"body":"\(.*\)","keys".*/  \1/p; t; s/^/  /p' | sed 's/\\"/"/g'
echo
admin=$(sed -n 's|^mqplug: admin on http://\([^/]*\)/.*|\1|p' "$work/mqplug.out")
if [[ -n "$admin" ]]; then
    echo "== GET http://$admin/plugins (also /healthz, /readyz, /metrics)" >&2
    exec 3<>"/dev/tcp/${admin%:*}/${admin##*:}"
    printf 'GET /plugins HTTP/1.0\r\n\r\n' >&3
    sed '1,/^\r$/d' <&3
    exec 3<&-
fi
echo
echo "== stopping mqplug (SIGTERM: drains in-flight handlers), the rewards service and the broker" >&2
kill -TERM "$mqplug_pid"; wait "$mqplug_pid" || true
tail -n 2 "$work/mqplug.log" | strip >&2
kill -TERM "${pids[1]}"; wait "${pids[1]}" || true
echo
echo "What the rewards service recorded:"
sed '1d' "$work/rewards.out"
grants=$(grep -c '^grant ' "$work/rewards.out" || true)
[[ "$handled" -ge "$expected" ]] || { echo "only $handled of $expected events handled" >&2; exit 1; }
[[ "$grants" -eq "$expected_grants" ]] || { echo "$grants grants recorded, expected $expected_grants" >&2; exit 1; }
[[ "$announced" -ge "$expected_grants" ]] || { echo "$announced of $expected_grants grants announced" >&2; exit 1; }
echo "demo done: $handled of $expected events handled by each plugin, $grants grants, $announced announced" >&2
