//! The platform's own RocketMQ clients as test peers: `task-producer` and
//! `task-consumer`, written in Go with rocketmq-client-go v2 the way the
//! platform's guide shows (tests/peers/go). Built once per test run with the
//! machine's Go; modules and build cache live outside the checkout.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::workspace_root;

/// The folder with the built `task-producer` and `task-consumer`.
pub fn go_peers_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let source = workspace_root().join("tests/peers/go");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("go-peers");
        std::fs::create_dir_all(&target)
            .map_err(|err| format!("cannot create {}: {err}", target.display()))?;
        // A trailing slash: a folder for several commands.
        go_build(&source, &format!("{}/", target.display()), "./...")?;
        Ok(target)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// `go build -trimpath -o OUTPUT PACKAGES` in `source`, with the machine's
/// Go (modules from the Go module proxy, cached outside the checkout).
pub(crate) fn go_build(
    source: &std::path::Path,
    output: &str,
    packages: &str,
) -> Result<(), String> {
    let status = Command::new("go")
        .current_dir(source)
        .args(["build", "-trimpath", "-o", output, packages])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|err| format!("cannot run go (is Go installed?): {err}"))?;
    if !status.success() {
        return Err(format!("go build in {} failed: {status}", source.display()));
    }
    Ok(())
}

/// Runs `command` (a Go peer, `name` in errors) to the end with no stdin;
/// what it printed, or an error with its stdout and stderr if it failed.
fn run_to_end(mut command: Command, name: &str) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {name}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{name} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// One line `task-producer` printed for an event it sent.
#[derive(Debug, Clone)]
pub struct GoSent {
    pub index: u64,
    /// The id the Go client set (the `UNIQ_KEY` property).
    pub msg_id: String,
    /// The JSON body exactly as `json.Marshal` wrote it.
    pub body: String,
    /// The W3C trace context it carried (with `-otlp`).
    pub traceparent: Option<String>,
}

/// Runs `task-producer` to the end with `args` (besides `-nameserver`), and
/// returns what it sent. Fails if any send failed.
pub fn go_produce(name_server: &str, args: &[&str]) -> Result<Vec<GoSent>> {
    let mut command = Command::new(go_peers_dir()?.join("task-producer"));
    command.arg("-nameserver").arg(name_server).args(args);
    run_to_end(command, "task-producer")?
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .with_context(|| format!("task-producer printed {line:?}"))?;
            Ok(GoSent {
                index: value["index"].as_u64().context("no index")?,
                msg_id: value["msg_id"].as_str().context("no msg_id")?.to_string(),
                body: value["body"].as_str().context("no body")?.to_string(),
                traceparent: value["traceparent"]
                    .as_str()
                    .filter(|tp| !tp.is_empty())
                    .map(str::to_string),
            })
        })
        .collect()
}

/// `bench-peer produce`: `count` events sent with the Go producer's
/// `SendSync` from `inflight` goroutines; its rate in messages per second.
pub fn go_bench_produce(
    name_server: &str,
    topic: &str,
    count: usize,
    inflight: usize,
) -> Result<f64> {
    let mut command = Command::new(go_peers_dir()?.join("bench-peer"));
    command
        .args(["produce", "-nameserver", name_server, "-topic", topic])
        .args(["-count", &count.to_string()])
        .args(["-inflight", &inflight.to_string()]);
    let stdout = run_to_end(command, "bench-peer produce")?;
    let line: Value = serde_json::from_str(stdout.trim()).context("bench-peer produce's line")?;
    line["rate"]
        .as_f64()
        .context("no rate in bench-peer's line")
}

/// A running `task-consumer` (or `bench-peer drain`): every line it prints
/// is kept, in order.
pub struct GoConsumer {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Arc<(Mutex<Vec<Value>>, Condvar)>,
}

impl GoConsumer {
    /// Starts a consumer in `group` on `topic`, from the first offset, and
    /// waits until it has started.
    pub fn start(name_server: &str, topic: &str, group: &str) -> Result<GoConsumer> {
        GoConsumer::start_with(name_server, topic, group, &[])
    }

    /// [`GoConsumer::start`] with more of `task-consumer`'s flags (`-raw`,
    /// `-otlp ADDRESS`).
    pub fn start_with(
        name_server: &str,
        topic: &str,
        group: &str,
        flags: &[&str],
    ) -> Result<GoConsumer> {
        let mut command = Command::new(go_peers_dir()?.join("task-consumer"));
        command
            .arg("-nameserver")
            .arg(name_server)
            .arg("-topic")
            .arg(topic)
            .arg("-group")
            .arg(group)
            .arg("-from-first")
            .args(flags);
        GoConsumer::spawn(command, "task-consumer")
    }

    /// `bench-peer drain`: the Go push consumer with its defaults, from the
    /// first offset, printing `{"drained":N,"rate":R}` once `count`
    /// messages were handled (and with `latency`, each message's id and
    /// `handled_ns`).
    pub fn bench_drain(
        name_server: &str,
        topic: &str,
        group: &str,
        count: usize,
        latency: bool,
    ) -> Result<GoConsumer> {
        let mut command = Command::new(go_peers_dir()?.join("bench-peer"));
        command
            .arg("drain")
            .arg("-nameserver")
            .arg(name_server)
            .arg("-topic")
            .arg(topic)
            .arg("-group")
            .arg(group)
            .arg("-count")
            .arg(count.to_string());
        if latency {
            command.arg("-latency");
        }
        GoConsumer::spawn(command, "bench-peer drain")
    }

    fn spawn(mut command: Command, name: &str) -> Result<GoConsumer> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take();
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.0.lock().unwrap().push(value);
                sink.1.notify_all();
            }
        });
        let consumer = GoConsumer {
            child: Some(child),
            stdin,
            lines,
        };
        if !consumer.wait_until(Duration::from_secs(60), |lines| {
            lines.iter().any(|l| l["ready"] == true)
        }) {
            bail!("{name} did not start: {:?}", consumer.lines());
        }
        Ok(consumer)
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.0.lock().unwrap().clone()
    }

    /// The deliveries printed so far (lines with a message id).
    pub fn deliveries(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|line| line.get("msg_id").is_some())
            .collect()
    }

    /// Waits until `done` holds for the lines printed, or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.lines;
        let mut guard = lines.lock().unwrap();
        loop {
            if done(&guard) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Shuts the consumer down cleanly (it persists its offsets and leaves
    /// the group) and waits for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("task-consumer exited with {status}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("task-consumer did not stop within 30 s")
    }
}

impl Drop for GoConsumer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
