//! Cost of one outbound HTTP request from a plugin (the chaos plugin's
//! `HTTP` event: a GET through `wasi:http`, mqplug's grant checks, name
//! resolution, a new connection, the whole response read), against the same
//! request from plain Rust (hyper's HTTP/1 client, a new connection each
//! time) to the same loopback server in the same run, and against the same
//! plugin handling an event that makes no request. The plugin's request is
//! measured blocking (`Plugin::handle`, as a listener thread with one
//! message) and awaited (`Plugin::handle_async` on the plain request's
//! one-thread runtime, as a listener call with a batch); the ratios to
//! the plain request are printed at the end.
//!
//!   cargo bench -p mqplug-tests --bench outbound
//!
//! To profile one way alone (`plain`, `blocking`, `awaited`), in a loop for
//! `MQPLUG_BENCH_SECONDS` (default 10) after an unmeasured second, printing
//! the requests made:
//!
//!   MQPLUG_BENCH_PROFILE=awaited perf stat -e task-clock,context-switches \
//!     -- target/release/deps/outbound-* --bench

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};
use mqplug::config::PluginConfig;
use mqplug::delivery::Delivery;
use mqplug::event::TaskEvent;
use mqplug::outcome::HandlerOutcome;
use mqplug::slot::load_plugin;
use mqplug::wasm::{RuntimeSettings, WasmRuntime};
use mqplug_tests::http_server::{Answer, Server};
use mqplug_tests::plugins::plugin_path;

/// The platform's example event from user 7 with `event_data`.
fn event(event_type: &str, event_data: serde_json::Value) -> TaskEvent {
    mqplug_tests::sample_event_with(event_type, 7, event_data)
}

fn bench(c: &mut Criterion) {
    let server = Server::start(Answer::Ok("granted"));
    let url = format!("{}/grants", server.origin());
    let runtime = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    let entry = PluginConfig {
        allowed_outbound_hosts: vec![server.origin()],
        config: BTreeMap::new(),
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = load_plugin(&runtime, &entry, &Default::default()).unwrap();
    let delivery = Delivery {
        message_id: "C0A8000100002A9F0000000000000001".into(),
        ..Delivery::default()
    };
    let http = event("HTTP", serde_json::json!({"url": url, "method": "GET"}));
    let plain = event("USER_REGISTER", serde_json::json!({}));

    let mut group = c.benchmark_group("outbound_request");
    group.measurement_time(Duration::from_secs(8));
    let client_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = server.addr;
    let plain_request = || {
        client_runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            let driver = tokio::spawn(connection);
            let request = hyper::Request::get("/grants")
                .header("host", addr.to_string())
                .header("idempotency-key", "C0A8000100002A9F0000000000000001")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"granted");
            drop(sender);
            let _ = driver.await;
        })
    };
    let blocking_request = || assert_eq!(plugin.handle(&http, &delivery), HandlerOutcome::Accepted);
    // Awaited on the same one-thread runtime as the plain request: what a
    // listener call's batch does.
    let awaited_request = || {
        let handling = client_runtime.block_on(plugin.handle_async(&http, &delivery));
        assert_eq!(handling.outcome, HandlerOutcome::Accepted)
    };
    if let Ok(way) = std::env::var("MQPLUG_BENCH_PROFILE") {
        let request: &dyn Fn() = match way.as_str() {
            "plain" => &plain_request,
            "blocking" => &blocking_request,
            "awaited" => &awaited_request,
            other => panic!("MQPLUG_BENCH_PROFILE: {other} is not plain, blocking or awaited"),
        };
        let (requests, each) = mqplug_tests::repeat_for_profile(|| {
            request();
            Ok(())
        })
        .unwrap();
        println!(
            "{way}: {requests} requests, {:.1} us each",
            each.as_secs_f64() * 1e6
        );
        return;
    }
    group.bench_function("plain_rust_hyper", |b| b.iter(plain_request));
    group.bench_function("mqplug_plugin_request", |b| b.iter(blocking_request));
    group.bench_function("mqplug_plugin_request_awaited", |b| b.iter(awaited_request));
    group.bench_function("mqplug_plugin_no_request", |b| {
        b.iter(|| assert_eq!(plugin.handle(&plain, &delivery), HandlerOutcome::Accepted))
    });
    group.finish();
    print_ratios();
}

/// Each plugin request against the plain one, from criterion's estimates.
fn print_ratios() {
    let mean = |name: &str| -> Option<f64> {
        let path = mqplug_tests::workspace_root()
            .join("target/criterion/outbound_request")
            .join(name)
            .join("new/estimates.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        json["mean"]["point_estimate"].as_f64()
    };
    let Some(plain) = mean("plain_rust_hyper") else {
        return;
    };
    for name in ["mqplug_plugin_request", "mqplug_plugin_request_awaited"] {
        if let Some(mqplug) = mean(name) {
            println!(
                "{name}: {:.1} us, {:.2}x plain hyper ({:.1} us)",
                mqplug / 1000.0,
                mqplug / plain,
                plain / 1000.0
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
