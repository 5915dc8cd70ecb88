#!/usr/bin/env bash
# The main job, end to end, on a fresh machine:
#   installs what is missing, starts a RocketMQ name server and broker on
#   127.0.0.1 (Apache RocketMQ, data in a temporary folder), starts mqplug with
#   the example plugin, publishes the sample events with the built-in producer
#   and more with the platform's own Go producer (rocketmq-client-go v2), and
#   shows them handled. Everything it started is stopped when it exits.
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
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
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

cat >"$work/mqplug.toml" <<TOML
name_server = "$name_server"
topic = "marketing.task.completed"

[[plugin]]
name = "reward-logger"
path = "$root/target/wasm32-wasip2/release/reward_logger.wasm"
consume_from = "first"
max_reconsume_times = 2

[producer]
enabled = true
create_topic_queues = 4

[admin]
listen = "127.0.0.1:0"   # a free port; printed at start-up
TOML

echo "== starting mqplug" >&2
"$mqplug" run --config "$work/mqplug.toml" >"$work/mqplug.out" 2>"$work/mqplug.log" &
pids+=($!)
wait_for "${pids[1]}" "$work/mqplug.log" 'consumer started'
grep -E 'starting mqplug|consumer started' "$work/mqplug.log" >&2

echo "== publishing examples/events.jsonl with the built-in producer" >&2
"$mqplug" publish --name-server "$name_server" --file examples/events.jsonl

echo "== publishing the platform's edge-value events with its own Go producer (SendSync, marketing-producer-group)" >&2
"$root/target/go-peers/task-producer" -nameserver "$name_server" -batch edge >"$work/go-producer.out"
go_sent=$(grep -c '"msg_id"' "$work/go-producer.out")
echo "the Go producer sent $go_sent events" >&2

expected=$(( $(grep -c . examples/events.jsonl) + go_sent ))
echo "== waiting for mqplug to handle $expected events" >&2
for _ in $(seq 1 600); do
    handled=$(grep -c -E 'granting|handler returned an error' "$work/mqplug.log" || true)
    [[ "$handled" -ge "$expected" ]] && break
    sleep 0.1
done
echo
echo "What the plugin did (one event carries a bad count on purpose: it is"
echo "rejected and the broker will redeliver it, then dead-letter it):"
grep -E 'granting|handler returned an error' "$work/mqplug.log" | sed 's/\x1b\[[0-9;]*m//g'
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
echo "== stopping mqplug (SIGTERM: drains in-flight handlers) and the broker" >&2
kill -TERM "${pids[1]}"; wait "${pids[1]}" || true
tail -n 2 "$work/mqplug.log" | sed 's/\x1b\[[0-9;]*m//g' >&2
[[ "$handled" -ge "$expected" ]] || { echo "only $handled of $expected events handled" >&2; exit 1; }
echo "demo done: $handled of $expected events handled" >&2
