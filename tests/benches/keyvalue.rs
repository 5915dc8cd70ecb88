//! Plugins' state, measured side by side in one run:
//!
//! - per operation (get, set, claim) from a plugin, against the same
//!   operation on the same store from plain Rust (`Backend` called
//!   directly), for the embedded file and for Redis on loopback. The
//!   plugin's side is the chaos plugin's `KV` event doing the operation 100
//!   times in a loop, divided by 100: the handler call around it adds its
//!   cost once per 100 operations.
//! - the reward-granter end to end (its HTTP request to the rewards service
//!   on loopback, its follow-up put in the outbox) per event, without the
//!   dedupe and with it on the embedded file and on Redis.
//!
//!   cargo bench -p mqplug-tests --bench keyvalue

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mqplug::config::{KeyValueConfig, PluginConfig, SecretSource};
use mqplug::delivery::Delivery;
use mqplug::outcome::HandlerOutcome;
use mqplug::slot::load_plugin;
use mqplug::store::{Backend, Namespace, RedisStore, Write};
use mqplug::wasm::{Plugin, RuntimeSettings, StoreSettings, WasmRuntime};
use mqplug_tests::LocalRedis;
use mqplug_tests::plugins::plugin_path;
use mqplug_tests::rewards::RewardsService;
use serde_json::json;

/// Operations per plugin call.
const BATCH: u64 = 100;

fn runtime(store: StoreSettings) -> Arc<WasmRuntime> {
    WasmRuntime::new(RuntimeSettings {
        store,
        ..RuntimeSettings::default()
    })
    .unwrap()
}

fn key_value(buckets: &[&str]) -> Option<KeyValueConfig> {
    Some(KeyValueConfig {
        buckets: buckets.iter().map(|b| b.to_string()).collect(),
        max_key_bytes: 512,
        max_value_bytes: 64 * 1024,
        max_total_mb: 1024,
    })
}

fn chaos(runtime: &Arc<WasmRuntime>) -> Plugin {
    let entry = PluginConfig {
        key_value: key_value(&["bench"]),
        log_lines_per_second: 1_000_000,
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    load_plugin(runtime, &entry, &Default::default()).unwrap()
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn delivery() -> Delivery {
    Delivery {
        message_id: format!("bench-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        ..Delivery::default()
    }
}

/// Runs `iters` operations `op` from the plugin, in calls of [`BATCH`].
fn plugin_ops(plugin: &Plugin, op: &str, keys: &str, iters: u64) -> Duration {
    let mut left = iters;
    let started = Instant::now();
    while left > 0 {
        let repeat = left.min(BATCH);
        // Distinct keys per call for claims (a fresh claim each time).
        let key = format!("{keys}{}-", NEXT.fetch_add(1, Ordering::Relaxed));
        let key = if op == "get" { keys.to_string() } else { key };
        let event = mqplug_tests::sample_event_with(
            "KV",
            7,
            json!({"op": op, "bucket": "bench", "key": key, "value": "v".repeat(64), "repeat": repeat}),
        );
        assert_eq!(plugin.handle(&event, &delivery()), HandlerOutcome::Accepted);
        left -= repeat;
    }
    started.elapsed()
}

/// Each operation from `runtime`'s plugin and on `store` directly.
fn per_op(c: &mut Criterion, label: &str, runtime: &Arc<WasmRuntime>, store: Arc<dyn Backend>) {
    let plugin = chaos(runtime);
    let ns = Namespace::new("chaos", "bench");
    let value = "v".repeat(64);
    // What `get` reads, from both sides.
    store
        .write(&ns, "k", value.as_bytes(), None, Write::Set, u64::MAX)
        .unwrap();
    let mut group = c.benchmark_group(format!("kv_{label}"));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("get_plain_rust", |b| {
        b.iter(|| assert!(store.get(&ns, "k").unwrap().is_some()))
    });
    group.bench_function("get_from_plugin", |b| {
        b.iter_custom(|iters| plugin_ops(&plugin, "get", "k", iters))
    });
    group.bench_function("set_plain_rust", |b| {
        b.iter(|| {
            store
                .write(&ns, "s", value.as_bytes(), None, Write::Set, u64::MAX)
                .unwrap()
        })
    });
    group.bench_function("set_from_plugin", |b| {
        b.iter_custom(|iters| plugin_ops(&plugin, "set", "s", iters))
    });
    group.bench_function("claim_plain_rust", |b| {
        b.iter(|| {
            let key = format!("c{}", NEXT.fetch_add(1, Ordering::Relaxed));
            store
                .write(
                    &ns,
                    &key,
                    b"pending",
                    Some(Duration::from_secs(600)),
                    Write::Claim,
                    u64::MAX,
                )
                .unwrap()
        })
    });
    group.bench_function("claim_from_plugin", |b| {
        b.iter_custom(|iters| plugin_ops(&plugin, "claim", "c", iters))
    });
    group.finish();
}

fn granter(
    runtime: &Arc<WasmRuntime>,
    rewards: &RewardsService,
    dedupe: bool,
    token_file: &std::path::Path,
) -> Plugin {
    let entry = PluginConfig {
        key_value: dedupe.then(|| key_value(&["granted"])).flatten(),
        allowed_outbound_hosts: vec![rewards.url()],
        allowed_topics: vec!["marketing.reward.granted".into()],
        config: [
            ("rewards_url".to_string(), rewards.url()),
            (
                "dedupe_bucket".to_string(),
                if dedupe { "granted" } else { "" }.to_string(),
            ),
        ]
        .into(),
        secrets: [(
            "rewards_token".to_string(),
            SecretSource {
                env: None,
                file: Some(token_file.to_path_buf()),
            },
        )]
        .into(),
        ..PluginConfig::new("reward-granter", plugin_path("reward-granter").unwrap())
    };
    load_plugin(runtime, &entry, &Default::default()).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let redis = LocalRedis::start().unwrap();
    let redis_settings = StoreSettings::Redis {
        url: redis.url(),
        prefix: "bench".into(),
        timeout: Duration::from_secs(2),
    };

    // The plugin's runtime opens the file; plain Rust uses the same store
    // (one process holds a redb file at a time).
    let embedded = runtime(StoreSettings::Embedded { path });
    let store = chaos(&embedded)
        .settings()
        .key_value
        .store()
        .cloned()
        .expect("a plugin with buckets has the store");
    per_op(c, "embedded", &embedded, store);
    // Redis: the plugin's runtime and plain Rust each with their own
    // connections to the same server.
    let redis_runtime = runtime(redis_settings);
    let redis_store: Arc<dyn Backend> =
        Arc::new(RedisStore::connect(&redis.url(), "bench", Duration::from_secs(2)).unwrap());
    per_op(c, "redis", &redis_runtime, redis_store);

    // The reward-granter end to end, per event.
    let rewards = RewardsService::start("bench-token").unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "bench-token").unwrap();
    let event = mqplug_tests::sample_event_with("USER_REGISTER", 7, json!({}));
    let mut group = c.benchmark_group("granter_per_event");
    group.measurement_time(Duration::from_secs(8));
    for (label, runtime, dedupe) in [
        ("no_dedupe", embedded.clone(), false),
        ("dedupe_embedded", embedded.clone(), true),
        ("dedupe_redis", redis_runtime.clone(), true),
    ] {
        let plugin = granter(&runtime, &rewards, dedupe, &token);
        group.bench_function(label, |b| {
            b.iter(|| {
                let (outcome, outbox) = plugin.handle_with_outbox(&event, &delivery());
                assert_eq!(outcome, HandlerOutcome::Accepted);
                assert_eq!(outbox.len(), 1);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
