//! Cost of one outbound HTTP request from a plugin (the chaos plugin's
//! `HTTP` event: a GET through `wasi:http`, mqplug's grant checks, name
//! resolution, a new connection, the whole response read), against the same
//! request from plain Rust (hyper's HTTP/1 client, a new connection each
//! time) to the same loopback server in the same run, and against the same
//! plugin handling an event that makes no request.
//!
//!   cargo bench -p mqplug-tests --bench outbound

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
    group.bench_function("plain_rust_hyper", |b| {
        b.iter(|| {
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
        })
    });
    group.bench_function("mqplug_plugin_request", |b| {
        b.iter(|| assert_eq!(plugin.handle(&http, &delivery), HandlerOutcome::Accepted))
    });
    group.bench_function("mqplug_plugin_no_request", |b| {
        b.iter(|| assert_eq!(plugin.handle(&plain, &delivery), HandlerOutcome::Accepted))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
