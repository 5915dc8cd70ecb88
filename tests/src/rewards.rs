//! A small rewards service on 127.0.0.1, the reward-granter example's
//! counterpart in the demo and the tests. It grants points once per
//! idempotency key: a repeat gets the first answer and no new grant.
//!
//! - `POST /grants` with `authorization: Bearer <token>` (401 otherwise),
//!   `idempotency-key: <key>` (400 without) and a JSON body
//!   `{"user_id": 1, "points": 10, "campaign_id": "c"}`: 201 and the grant
//!   the first time, 200 and the same grant (`idempotent-replay: true`) on a
//!   repeat.
//! - `GET /grants`: every grant, in order.
//! - `GET /stats`: `{"requests", "grants", "repeated_requests"}`, where a
//!   repeated request is one whose key had been granted before.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

/// A request body larger than this is refused (413).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// One grant the service recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub id: String,
    pub idempotency_key: String,
    pub user_id: u64,
    pub points: u64,
    pub campaign_id: String,
    /// The request's W3C `traceparent` header, if it had one.
    pub traceparent: Option<String>,
}

impl Grant {
    fn to_json(&self) -> Value {
        json!({
            "grant_id": self.id,
            "idempotency_key": self.idempotency_key,
            "user_id": self.user_id,
            "points": self.points,
            "campaign_id": self.campaign_id,
        })
    }
}

/// What the service has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every `POST /grants`, answered or refused.
    pub requests: u64,
    /// Grants made: one per idempotency key.
    pub grants: u64,
    /// Requests for a key already granted (answered with the first grant).
    pub repeated_requests: u64,
}

#[derive(Default)]
struct Ledger {
    grants: Vec<Grant>,
    by_key: HashMap<String, usize>,
    stats: Stats,
    /// While set, every grant request is answered with this status (an
    /// outage) and grants nothing.
    failing: Option<(u16, String)>,
}

/// An event whose `count` is not a number: the reward granter
/// dead-letters it rather than granting anything.
pub fn bad_count_event() -> mqplug::TaskEvent {
    crate::sample_event_with("USER_REGISTER", 9, serde_json::json!({"count": "x"}))
}

/// A running rewards service; stopped on drop.
pub struct RewardsService {
    pub addr: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl RewardsService {
    /// Starts on a free port of 127.0.0.1, accepting `token`.
    pub fn start(token: &str) -> Result<RewardsService> {
        Self::start_on(0, token)
    }

    /// Starts on `port` of 127.0.0.1 (0: a free one), accepting `token`.
    pub fn start_on(port: u16, token: &str) -> Result<RewardsService> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rewards-service")
            .enable_all()
            .build()?;
        // Bound here, outside the runtime: the caller may be in one.
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("bind 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let shared = ledger.clone();
        let expected = format!("Bearer {token}");
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, say: pause rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let (ledger, expected) = (shared.clone(), expected.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (ledger, expected) = (ledger.clone(), expected.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                serve(request, &ledger, &expected).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(RewardsService {
            addr,
            ledger,
            runtime: Some(runtime),
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The reward granter at `path` configured against this service the
    /// way docs/plugins.md grants it: its URL, `token` (this service's, written
    /// to a file in `secrets`) and the follow-up topic `granted`.
    pub fn granter_config(
        &self,
        path: impl Into<std::path::PathBuf>,
        token: &str,
        secrets: &std::path::Path,
        granted: &str,
    ) -> Result<mqplug::config::PluginConfig> {
        let token_file = secrets.join("rewards_token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        Ok(mqplug::config::PluginConfig {
            allowed_outbound_hosts: vec![self.url()],
            allowed_topics: vec![granted.into()],
            config: [("rewards_url".to_string(), self.url())].into(),
            secrets: [(
                "rewards_token".to_string(),
                mqplug::config::SecretSource {
                    env: None,
                    file: Some(token_file),
                },
            )]
            .into(),
            ..mqplug::config::PluginConfig::new("reward-granter", path)
        })
    }

    /// Answers every grant request with `status` and `body` from now on
    /// (an outage), or as usual again with `None`.
    pub fn fail_with(&self, failing: Option<(u16, &str)>) {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failing = failing.map(|(status, body)| (status, body.to_string()));
    }

    pub fn stats(&self) -> Stats {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    pub fn grants(&self) -> Vec<Grant> {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .grants
            .clone()
    }
}

impl Drop for RewardsService {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn refuse(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    answer(status, json!({ "error": why }))
}

async fn serve(
    request: Request<Incoming>,
    ledger: &Mutex<Ledger>,
    expected_authorization: &str,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/grants") => {
            let failing = ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .failing
                .clone();
            match failing {
                Some((status, body)) => {
                    // It says what it was sent, as some services do: the
                    // caller's token is in the answer.
                    let authorization = request
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    // Read as a real service would, then refuse: answering
                    // first would leave the client writing to a closed
                    // connection, a different failure.
                    let _ = request.into_body().collect().await;
                    let status =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    answer(
                        status,
                        json!({ "error": body, "authorization": authorization }),
                    )
                }
                None => grant(request, ledger, expected_authorization).await,
            }
        }
        (&Method::GET, "/grants") => {
            let ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            let grants: Vec<Value> = ledger.grants.iter().map(Grant::to_json).collect();
            answer(StatusCode::OK, Value::Array(grants))
        }
        (&Method::GET, "/stats") => {
            let stats = ledger.lock().unwrap_or_else(|e| e.into_inner()).stats;
            answer(
                StatusCode::OK,
                json!({
                    "requests": stats.requests,
                    "grants": stats.grants,
                    "repeated_requests": stats.repeated_requests,
                }),
            )
        }
        _ => refuse(StatusCode::NOT_FOUND, "no such route"),
    }
}

async fn grant(
    request: Request<Incoming>,
    ledger: &Mutex<Ledger>,
    expected_authorization: &str,
) -> Response<Full<Bytes>> {
    ledger
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stats
        .requests += 1;
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    if header("authorization").as_deref() != Some(expected_authorization) {
        return refuse(StatusCode::UNAUTHORIZED, "bad or missing bearer token");
    }
    let Some(key) = header("idempotency-key").filter(|key| !key.is_empty() && key.len() <= 256)
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "an idempotency-key header is required",
        );
    };
    let traceparent = header("traceparent");
    let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body over 64 KiB"),
    };
    let Ok(fields) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let (Some(user_id), Some(points)) = (fields["user_id"].as_u64(), fields["points"].as_u64())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "user_id and points must be non-negative integers",
        );
    };
    let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&index) = ledger.by_key.get(&key) {
        ledger.stats.repeated_requests += 1;
        let mut response = answer(StatusCode::OK, ledger.grants[index].to_json());
        response.headers_mut().insert(
            "idempotent-replay",
            hyper::header::HeaderValue::from_static("true"),
        );
        return response;
    }
    let grant = Grant {
        id: format!("g-{}", ledger.grants.len() + 1),
        idempotency_key: key.clone(),
        user_id,
        points,
        campaign_id: fields["campaign_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        traceparent,
    };
    let body = grant.to_json();
    let index = ledger.grants.len();
    ledger.grants.push(grant);
    ledger.by_key.insert(key, index);
    ledger.stats.grants += 1;
    answer(StatusCode::CREATED, body)
}
