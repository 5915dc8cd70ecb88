//! Test plugin for mqplug's own tests and for trying the host's failure
//! handling. Its behaviour is chosen by the event type:
//!
//! | event type  | behaviour                                                  |
//! |-------------|------------------------------------------------------------|
//! | `FAIL`      | returns an error every time                                |
//! | `FAIL_ONCE` | returns an error on first delivery, ok on redelivery       |
//! | `PANIC`     | panics (a trap on the host)                                |
//! | `LOOP`      | loops forever (stopped by the host's deadline)             |
//! | `OOM`       | allocates until memory runs out                            |
//! | `STACK_OVERFLOW` | recurses without end                                  |
//! | `SLOW`      | busy for 2 s, then ok (for shutdown-drain tests)           |
//! | `BUSY`      | busy for `event_data.ms` milliseconds, then ok; with `event_data.fail_first` true, an error on the first delivery (for crash tests) |
//! | `SLEEP`     | sleeps `event_data.ms` milliseconds (default one hour) with `std::thread::sleep`, a blocking WASI wait, then ok |
//! | `ECHO`      | logs the campaign name as it is, then returns an error made of it repeated `event_data.repeat` times (for untrusted-text tests) |
//! | `PRINT`     | prints `chaos stdout <message id>` and `chaos stderr <message id>`, then ok |
//! | `PROBE_SANDBOX` | tries files, environment, arguments and the network (a TCP connection to `event_data.port` on 127.0.0.1); an error names whatever it reached |
//! | `CONFIG`    | logs `config <key>=<value>` for every key in `event_data.keys` (`<none>` when unset), then ok |
//! | `LEAK`      | logs `leak <value>` of config key `event_data.key`, then returns an error carrying it too (for redaction tests) |
//! | `HTTP`      | sends `event_data.method` (default GET) to `event_data.url` with `event_data.body`; logs `http <status> <body>` and is ok, or returns the error `http: <why>` |
//! | `PUBLISH`   | publishes `event_data.count` messages `{"for": <message id>, "i": i}` to `event_data.topic` (tag `FOLLOW_UP`); then ok, or with `event_data.then` = `"err"` an error, or with `"err_first"` an error on first delivery only; a refused message is an error |
//! | `DEAD_LETTER` | logs `dead letter <reconsume times>`, is busy for `event_data.ms` (default 0), then asks for the dead-letter queue (`Failure::dead_letter`) |
//! | `RETRY_AFTER` | on first delivery, logs `retry after <ms>` and asks for a retry no sooner than `event_data.ms` (default 1000); ok on redelivery |
//! | `KV`        | one key-value call: `event_data.op` (`get`, `set`, `delete`, `exists`, `keys`, `increment`, `claim`) on bucket `event_data.bucket`, key `event_data.key`, value `event_data.value` (or `event_data.value_len` bytes of `x`), `event_data.delta`, `event_data.ttl_ms`; logs `kv <op> <result>` and is ok, or returns the error `kv: <why>`. With `event_data.repeat` = n, does it n times on keys `<key>0` to `<key><n-1>` (`get`: on `<key>`), logging the last result (for benchmarks) |
//! | `HOARD`     | creates `event_data.count` `wasi:http` header sets, each with one header of `event_data.bytes` bytes, and keeps every one (a hostile plugin taking host memory); logs `hoarded <count>` and is ok, or returns the error `hoard: <why>` |
//! | anything else | ok                                                       |
//!
//! Every call first logs `seen <json>` with the whole event and delivery, so
//! a test can check what reached the plugin.

use std::time::Duration;

use mqplug_plugin::{Delivery, Event, Failure, Handler, log};
use serde_json::json;

struct Chaos;

impl Handler for Chaos {
    fn handle(event: Event, delivery: Delivery) -> Result<(), Failure> {
        match event.event_type.as_str() {
            // A poison event: to the dead-letter queue without retries.
            "DEAD_LETTER" => {
                log::info(&format!("dead letter {}", delivery.reconsume_times));
                // Busy for event_data.ms first (for shutdown tests).
                let ms = event.event_data["ms"].as_u64().unwrap_or(0);
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_millis(ms) {
                    std::hint::spin_loop();
                }
                Err(Failure::dead_letter("chaos: no retry can help"))
            }
            // Retry no sooner than event_data.ms, on the first delivery.
            "RETRY_AFTER" if delivery.reconsume_times == 0 => {
                let delay = event.event_data["ms"].as_u64().unwrap_or(1000);
                log::info(&format!("retry after {delay}"));
                Err(Failure::retry_after(
                    Duration::from_millis(delay),
                    "chaos: busy, try later",
                ))
            }
            _ => Chaos::behave(event, delivery).map_err(Failure::from),
        }
    }
}

impl Chaos {
    fn behave(event: Event, delivery: Delivery) -> Result<(), String> {
        let seen = json!({
            "event_type": event.event_type,
            "user_id": event.user_id,
            "tenant_id": event.tenant_id,
            "app_id": event.app_id,
            "campaign_id": event.campaign_id,
            "campaign_name": event.campaign_name,
            "event_data": event.event_data,
            "timestamp": event.timestamp,
            "message_id": delivery.message_id,
            "topic": delivery.topic,
            "tags": delivery.tags,
            "keys": delivery.keys,
            "reconsume_times": delivery.reconsume_times,
            "queue_id": delivery.queue_id,
            "queue_offset": delivery.queue_offset,
            "born_timestamp": delivery.born_timestamp,
        });
        log::info(&format!("seen {seen}"));
        match event.event_type.as_str() {
            "FAIL" => Err("chaos: asked to fail".to_string()),
            "FAIL_ONCE" if delivery.reconsume_times == 0 => {
                Err("chaos: failing the first delivery".to_string())
            }
            "PANIC" => panic!("chaos: asked to panic"),
            "LOOP" => loop {
                std::hint::black_box(&event);
            },
            "SLOW" => {
                let started = std::time::Instant::now();
                while started.elapsed() < std::time::Duration::from_secs(2) {
                    std::hint::spin_loop();
                }
                log::info("slow: done");
                Ok(())
            }
            "BUSY" => {
                let ms = event
                    .event_data
                    .get("ms")
                    .and_then(|ms| ms.as_u64())
                    .unwrap_or(10);
                let started = std::time::Instant::now();
                while started.elapsed() < std::time::Duration::from_millis(ms) {
                    std::hint::spin_loop();
                }
                let fail_first = event.event_data.get("fail_first") == Some(&json!(true));
                if fail_first && delivery.reconsume_times == 0 {
                    return Err("chaos: busy, then failing the first delivery".to_string());
                }
                Ok(())
            }
            "SLEEP" => {
                let ms = event
                    .event_data
                    .get("ms")
                    .and_then(|ms| ms.as_u64())
                    .unwrap_or(3_600_000);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                log::info("slept");
                Ok(())
            }
            "ECHO" => {
                log::info(&event.campaign_name);
                let repeat = event
                    .event_data
                    .get("repeat")
                    .and_then(|n| n.as_u64())
                    .unwrap_or(1);
                Err(event.campaign_name.repeat(repeat as usize))
            }
            "CONFIG" => {
                let keys = event.event_data.get("keys").and_then(|k| k.as_array());
                for key in keys.into_iter().flatten().filter_map(|k| k.as_str()) {
                    let value = mqplug_plugin::config::get(key);
                    log::info(&format!(
                        "config {key}={}",
                        value.as_deref().unwrap_or("<none>")
                    ));
                }
                Ok(())
            }
            "LEAK" => {
                let key = event.event_data.get("key").and_then(|k| k.as_str());
                let value = key.and_then(mqplug_plugin::config::get).unwrap_or_default();
                log::info(&format!("leak {value}"));
                Err(format!("leaking {value} in a reason"))
            }
            "HTTP" => {
                let field = |name: &str| event.event_data.get(name).and_then(|v| v.as_str());
                let url = field("url").unwrap_or_default();
                let body = field("body").map(str::as_bytes);
                let idempotency_key = delivery.message_id.clone();
                match mqplug_plugin::http::request(
                    field("method").unwrap_or("GET"),
                    url,
                    &[("idempotency-key", &idempotency_key)],
                    body,
                ) {
                    Ok(response) => {
                        log::info(&format!(
                            "http {} {}",
                            response.status,
                            String::from_utf8_lossy(&response.body)
                        ));
                        Ok(())
                    }
                    Err(why) => Err(format!("http: {why}")),
                }
            }
            "KV" => {
                let data = &event.event_data;
                let field =
                    |name: &str| data.get(name).and_then(|v| v.as_str()).unwrap_or_default();
                let key = field("key");
                let value = match data.get("value_len").and_then(|n| n.as_u64()) {
                    Some(len) => vec![b'x'; len as usize],
                    None => field("value").as_bytes().to_vec(),
                };
                let text = |value: Option<Vec<u8>>| match value {
                    Some(value) => String::from_utf8_lossy(&value).into_owned(),
                    None => "<none>".to_string(),
                };
                let bucket =
                    mqplug_plugin::kv::open(field("bucket")).map_err(|why| format!("kv: {why}"))?;
                let ttl = Duration::from_millis(
                    data.get("ttl_ms")
                        .and_then(|n| n.as_u64())
                        .unwrap_or(60_000),
                );
                let op = |key: &str| match field("op") {
                    "get" => bucket.get(key).map(text),
                    "set" => bucket.set(key, &value).map(|()| "ok".to_string()),
                    "delete" => bucket.delete(key).map(|()| "ok".to_string()),
                    "exists" => bucket.exists(key).map(|found| found.to_string()),
                    "keys" => bucket.keys().map(|keys| keys.len().to_string()),
                    "increment" => bucket
                        .increment(key, data.get("delta").and_then(|n| n.as_u64()).unwrap_or(1))
                        .map(|n| n.to_string()),
                    "claim" => bucket.claim(key, &value, ttl).map(text),
                    "release" => bucket.release(key, &value).map(|done| done.to_string()),
                    other => Err(format!("unknown op {other:?}")),
                };
                let result = match data.get("repeat").and_then(|n| n.as_u64()) {
                    None => op(key),
                    Some(times) => {
                        let mut last = Ok(String::new());
                        for i in 0..times {
                            last = if field("op") == "get" {
                                op(key)
                            } else {
                                op(&format!("{key}{i}"))
                            };
                            if last.is_err() {
                                break;
                            }
                        }
                        last
                    }
                };
                let result = result.map_err(|why| format!("kv: {why}"))?;
                log::info(&format!("kv {} {result}", field("op")));
                Ok(())
            }
            "PUBLISH" => {
                let topic = event
                    .event_data
                    .get("topic")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default();
                let count = event
                    .event_data
                    .get("count")
                    .and_then(|n| n.as_u64())
                    .unwrap_or(1);
                // A hostile message's parts, when given.
                let tag = match event.event_data.get("tag") {
                    Some(tag) => tag.as_str(),
                    None => Some("FOLLOW_UP"),
                };
                let keys: Vec<String> = event.event_data["keys"]
                    .as_array()
                    .map(|keys| {
                        keys.iter()
                            .filter_map(|key| key.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                for i in 0..count {
                    let body = match event.event_data.get("body").and_then(|b| b.as_str()) {
                        Some(body) => body.to_string(),
                        None => json!({"for": delivery.message_id, "i": i}).to_string(),
                    };
                    mqplug_plugin::publish::send(topic, tag, &keys, body.as_bytes())?;
                }
                match event.event_data.get("then").and_then(|t| t.as_str()) {
                    Some("err") => Err("chaos: published, then failed".into()),
                    Some("err_first") if delivery.reconsume_times == 0 => {
                        Err("chaos: published, then failed the first delivery".into())
                    }
                    _ => Ok(()),
                }
            }
            "HOARD" => {
                use mqplug_plugin::bindings::wasi::http::types::Fields;
                let count = event.event_data["count"].as_u64().unwrap_or(1);
                let bytes = event.event_data["bytes"].as_u64().unwrap_or(1024) as usize;
                let value = vec![b'x'; bytes];
                for i in 0..count {
                    let fields = Fields::new();
                    if let Err(why) = fields.append("x-hoard", &value) {
                        return Err(format!("hoard: header set {i}: {why:?}"));
                    }
                    // Never dropped: the host keeps it until the instance goes.
                    std::mem::forget(fields);
                }
                log::info(&format!("hoarded {count}"));
                Ok(())
            }
            "PRINT" => {
                println!("chaos stdout {}", delivery.message_id);
                eprintln!("chaos stderr {}", delivery.message_id);
                Ok(())
            }
            "PROBE_SANDBOX" => {
                let port = event
                    .event_data
                    .get("port")
                    .and_then(|port| port.as_u64())
                    .unwrap_or(9876);
                probe_sandbox(port)
            }
            "STACK_OVERFLOW" => {
                let depth = recurse(std::hint::black_box(1));
                Err(format!("recursion returned at depth {depth}"))
            }
            "OOM" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => Ok(()),
        }
    }
}

/// Recurses until the stack runs out; the frame keeps a buffer so the
/// compiler cannot turn the recursion into a loop.
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    if frame[0] == u64::MAX {
        return depth;
    }
    recurse(depth + 1) + frame[63] % 2
}

/// Tries everything a plugin must not be able to do.
/// Tries files, the environment, arguments, a TCP connection to `port` on
/// 127.0.0.1 (where the test listens) and a UDP socket.
fn probe_sandbox(port: u64) -> Result<(), String> {
    let mut reached = Vec::new();
    if std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok() {
        reached.push("a directory listing");
    }
    if std::fs::read("/etc/passwd").is_ok() {
        reached.push("/etc/passwd");
    }
    if std::fs::write("escape.txt", b"x").is_ok() {
        reached.push("a writable file");
    }
    if std::env::vars_os().next().is_some() {
        reached.push("environment variables");
    }
    if std::env::args_os().next().is_some() {
        reached.push("command-line arguments");
    }
    if std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok() {
        reached.push("a TCP connection");
    }
    if std::net::UdpSocket::bind("127.0.0.1:0").is_ok() {
        reached.push("a UDP socket");
    }
    if reached.is_empty() {
        Ok(())
    } else {
        Err(format!("sandbox reached: {}", reached.join(", ")))
    }
}

mqplug_plugin::export_handler!(Chaos);
