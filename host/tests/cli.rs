//! The `mqplug` command line, as users run it: `run` with a config file
//! against a real broker, `publish` from a JSON Lines file, SIGTERM, `replay`,
//! and the errors a user sees for a bad config.
//!
//! These live in the host crate, not in tests/, so that cargo builds the
//! binary under test itself (`CARGO_BIN_EXE_mqplug`) with the same features
//! as the rest of the test build.

// The publishing threads' futures (a `Publisher` send with its retries)
// are deeper than the default limit lets the compiler lay out.
#![recursion_limit = "256"]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mqplug_tests::plugins::{Guest, guest_plugin_path, plugin_path};
use mqplug_tests::{LocalBroker, workspace_root};

/// The binary under test, built by cargo for this test run.
const MQPLUG: &str = env!("CARGO_BIN_EXE_mqplug");

/// The mqplug binary, compiling into the tests' cache rather than the
/// user's `~/.cache`.
fn mqplug_command() -> Command {
    let mut command = Command::new(MQPLUG);
    command.env(
        "MQPLUG_CACHE_DIR",
        mqplug_tests::test_cache_dir()
            .parent()
            .expect("the cache folder has a parent"),
    );
    command
}

/// Kills the child if the test fails before it exits on its own.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for_lines(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => return done(seen),
        }
    }
    true
}

/// Every line an exited process wrote: the lines still in its pipes arrive
/// after `wait` returns, until both pipes close.
fn read_to_exit(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) {
    wait_for_lines(lines, seen, Duration::from_secs(10), |_| false);
}

/// Starts `mqplug ARGS` with `MQPLUG_LOG=log` and the admin listener on a
/// free port (unless ARGS say otherwise). Its stdout and stderr lines go to
/// the returned channel; the process is killed when `Running` drops.
fn spawn_mqplug<I, A>(args: I, log: &str) -> Result<(Running, mpsc::Receiver<String>)>
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    let mut command = mqplug_command();
    command.args(args).env("MQPLUG_LOG", log);
    spawn_command(command)
}

/// Starts `command` with the admin listener on a free port (unless its
/// arguments say otherwise); see [`spawn_mqplug`].
fn spawn_command(mut command: Command) -> Result<(Running, mpsc::Receiver<String>)> {
    let mut child = command
        .env("MQPLUG_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let running = Running(Some(child));
    let (send, lines) = mpsc::channel();
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let send = send.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
    }
    Ok((running, lines))
}

/// `mqplug run --config CONFIG` at log level info; see [`spawn_mqplug`].
fn spawn_run(config: &std::path::Path) -> Result<(Running, mpsc::Receiver<String>)> {
    spawn_run_logging(config, "info")
}

/// `mqplug run --config CONFIG` with `MQPLUG_LOG=log`.
fn spawn_run_logging(
    config: &std::path::Path,
    log: &str,
) -> Result<(Running, mpsc::Receiver<String>)> {
    spawn_mqplug(
        [
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
        log,
    )
}

/// Writes `DIR/mqplug.toml`: `extra` top-level settings, then the chaos
/// plugin reading its group from the first offset.
fn chaos_config(dir: &std::path::Path, extra: &str) -> Result<std::path::PathBuf> {
    let config = dir.join("mqplug.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\n[[plugin]]\nname = \"chaos\"\npath = \"{}\"\nconsume_from = \"first\"\n",
            plugin_path("chaos")?.display()
        ),
    )?;
    Ok(config)
}

/// `mqplug publish --file FILE`; returns what it printed.
/// `mqplug publish --file FILE` to `broker`; a failure shows the broker's
/// logs too (a broker that refuses sends says why only there).
fn publish_file(broker: &LocalBroker, file: &std::path::Path) -> Result<String> {
    let publish = mqplug_command()
        .args(["publish", "--name-server", &broker.name_server, "--file"])
        .arg(file)
        .output()?;
    let out = String::from_utf8_lossy(&publish.stdout).into_owned();
    ensure!(
        publish.status.success(),
        "publish failed: {out}{}\n{}",
        String::from_utf8_lossy(&publish.stderr),
        broker.logs()
    );
    Ok(out)
}

/// `mqplug publish --file examples/events.jsonl`: four good events and one
/// whose count is not a number.
fn publish_examples(broker: &LocalBroker) -> Result<()> {
    let out = publish_file(broker, &workspace_root().join("examples/events.jsonl"))?;
    ensure!(out.contains("sent 5, failed 0"), "{out}");
    Ok(())
}

#[test]
fn run_and_publish_handle_the_sample_events_and_sigterm_exits_cleanly() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mqplug.toml");
    std::fs::write(
        &config,
        format!(
            "name_server = \"{}\"\n\n[[plugin]]\nname = \"rewards\"\npath = \"{}\"\nconsume_from = \"first\"\n\n[producer]\nenabled = true\ncreate_topic_queues = 4\n",
            broker.name_server,
            plugin_path("reward-logger")?.display()
        ),
    )?;

    let (mut running, lines) = spawn_run(&config)?;
    let mut seen = Vec::new();
    let started = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
        seen.iter().any(|l| l.contains("consumer started"))
    });
    ensure!(started, "mqplug did not start:\n{}", seen.join("\n"));
    assert!(
        seen.iter()
            .any(|l| l.contains("topic=\"marketing.task.completed\"")
                && l.contains("wire_topic=\"marketing_task_completed\"")),
        "both topic names are printed at start-up:\n{}",
        seen.join("\n")
    );

    publish_examples(&broker)?;

    let handled = |seen: &[String]| {
        seen.iter()
            .filter(|l| l.contains("granting") || l.contains("handler error: "))
            .count()
    };
    let all = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |s| {
        handled(s) >= 5
    });
    ensure!(all, "not all events handled:\n{}", seen.join("\n"));
    assert_eq!(
        seen.iter().filter(|l| l.contains("granting")).count(),
        4,
        "four good events"
    );
    assert!(
        seen.iter().any(|l| l.contains("handler error: ")
            && l.contains("event_data.count must be a non-negative integer")
            && l.contains("ConsumeRetryLater")),
        "the bad count is rejected for retry:\n{}",
        seen.join("\n")
    );

    let mut child = running.0.take().context("mqplug is running")?;
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("mqplug did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for_lines(&lines, &mut seen, Duration::from_secs(5), |s| {
        s.iter().any(|l| l.contains("mqplug stopped"))
    });
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        seen.iter().any(|l| l.contains("SIGTERM received")),
        "{}",
        seen.join("\n")
    );
    assert!(seen.iter().any(|l| l.contains("mqplug stopped")));
    Ok(())
}

#[test]
fn replay_prints_each_outcome_without_a_broker() -> Result<()> {
    let output = mqplug_command()
        .args(["replay", "--plugin"])
        .arg(plugin_path("reward-logger")?)
        .arg("--events")
        .arg(workspace_root().join("examples/events.jsonl"))
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("line 1: ConsumeSuccess"), "{out}");
    assert!(
        out.contains("line 5: ConsumeRetryLater (handler error: event_data.count"),
        "{out}"
    );
    assert!(out.contains("4 acknowledged, 1 to retry"), "{out}");
    Ok(())
}

#[test]
fn a_plugin_prints_to_the_hosts_stdout_only_when_granted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let events = dir.path().join("print.jsonl");
    std::fs::write(
        &events,
        r#"{"event_type":"PRINT","user_id":1,"tenant_id":"t","app_id":"a","campaign_id":"c","campaign_name":"n","event_data":{},"timestamp":"2026-11-25T14:19:15+08:00"}"#,
    )?;
    let replay = |grant: bool| -> Result<(String, String)> {
        let mut command = mqplug_command();
        command
            .args(["replay", "--plugin"])
            .arg(plugin_path("chaos")?)
            .arg("--events")
            .arg(&events)
            .env("MQPLUG_LOG", "off");
        if grant {
            command.arg("--inherit-stdio");
        }
        let output = command.output()?;
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let err = String::from_utf8_lossy(&output.stderr).into_owned();
        ensure!(output.status.success(), "{out}{err}");
        ensure!(out.contains("line 1: ConsumeSuccess"), "{out}");
        Ok((out, err))
    };
    let (out, err) = replay(false)?;
    assert!(
        !out.contains("chaos stdout") && !err.contains("chaos stderr"),
        "{out}{err}"
    );
    let (out, err) = replay(true)?;
    assert!(out.contains("chaos stdout "), "{out}");
    assert!(err.contains("chaos stderr "), "{err}");
    Ok(())
}

#[test]
fn a_misspelt_config_key_is_named_and_nothing_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mqplug.toml");
    std::fs::write(&config, "name_server = \"127.0.0.1:1\"\ntopik = \"x\"\n")?;
    let output = mqplug_command()
        .args(["run", "--config"])
        .arg(&config)
        .output()?;
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(err.contains("unknown field `topik`"), "{err}");
    Ok(())
}

#[test]
fn a_topic_still_illegal_after_mapping_fails_before_connecting() -> Result<()> {
    let output = mqplug_command()
        .args([
            "run",
            "--name-server",
            "127.0.0.1:1",
            "--topic",
            "marketing task",
        ])
        .arg("--plugin")
        .arg(format!(
            "rewards={}",
            plugin_path("reward-logger")?.display()
        ))
        .output()?;
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("which RocketMQ rejects: character ' ' is not allowed"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_failed_send_reports_the_real_cause_and_fails_the_command() -> Result<()> {
    // Nothing listens on port 1.
    let output = mqplug_command()
        .args(["publish", "--name-server", "127.0.0.1:1"])
        .env("MQPLUG_LOG", "off")
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{out}{err}");
    assert!(out.contains("sent 0, failed 1"), "{out}");
    assert!(
        err.contains(
            "event 1: not sent: send to marketing_task_completed (gave up after 5 attempts):"
        ) && err.contains("Connection refused"),
        "{err}"
    );
    assert!(!err.contains("<redacted>"), "{err}");
    assert!(
        err.contains("name server 127.0.0.1:1 did not answer"),
        "the address it could not reach is named: {err}"
    );
    Ok(())
}

/// `mqplug run` against a name server that is not there: it starts (the
/// client keeps trying), says what it cannot reach, and `/readyz` is 503
/// with the same reason.
#[test]
fn run_without_a_name_server_says_so_and_is_not_ready() -> Result<()> {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let name_server = format!("127.0.0.1:{port}");
    let spec = format!("rewards={}", plugin_path("reward-logger")?.display());
    let (_running, lines) = spawn_mqplug(
        ["run", "--name-server", &name_server, "--plugin", &spec],
        "off",
    )?;
    let mut seen = Vec::new();
    let said = format!("name server {name_server} did not answer");
    let started = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
        seen.iter()
            .any(|l| l.starts_with("mqplug: admin on http://"))
            && seen.iter().any(|l| l.contains(&said))
    });
    ensure!(
        started,
        "no admin address or no reason:\n{}",
        seen.join("\n")
    );
    let addr = admin_address(&seen)?;
    let (status, body) = http_get(&addr, "/readyz")?;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert!(body.contains(&format!("broker: {said}")), "{body}");
    let (_, plugins) = http_get(&addr, "/plugins")?;
    let plugins: serde_json::Value = serde_json::from_str(&plugins)?;
    assert_eq!(plugins["ready"], false, "{plugins}");
    assert_eq!(plugins["broker"]["available"], false, "{plugins}");
    Ok(())
}

#[test]
fn examples_in_rust_python_javascript_and_go_handle_the_same_published_events() -> Result<()> {
    let plugins = [
        ("rewards-rs", plugin_path("reward-logger")?),
        ("rewards-py", guest_plugin_path(Guest::Python)?),
        ("rewards-js", guest_plugin_path(Guest::JavaScript)?),
        ("rewards-go", guest_plugin_path(Guest::Go)?),
    ];
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mqplug.toml");
    let mut text = format!(
        "name_server = \"{}\"\n\n[producer]\nenabled = true\ncreate_topic_queues = 4\n",
        broker.name_server
    );
    for (name, path) in &plugins {
        text.push_str(&format!(
            "\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nconsume_from = \"first\"\n",
            path.display()
        ));
    }
    std::fs::write(&config, text)?;

    let (_running, lines) = spawn_run(&config)?;
    let mut seen = Vec::new();
    // Compiling the 12-18 MB Python and JavaScript components takes a while
    // in a debug build.
    let started = wait_for_lines(&lines, &mut seen, Duration::from_secs(240), |seen| {
        seen.iter()
            .filter(|l| l.contains("consumer started"))
            .count()
            >= plugins.len()
    });
    ensure!(started, "mqplug did not start:\n{}", seen.join("\n"));
    publish_examples(&broker)?;

    let count = |seen: &[String], plugin: &str, what: &str| {
        let tag = format!("plugin={plugin} ");
        seen.iter()
            .filter(|l| l.contains(&tag) && l.contains(what))
            .count()
    };
    let all = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
        plugins.iter().all(|(name, _)| {
            count(seen, name, "granting") >= 4
                && count(
                    seen,
                    name,
                    "event_data.count must be a non-negative integer",
                ) >= 1
        })
    });
    ensure!(
        all,
        "not every plugin handled every event:\n{}",
        seen.join("\n")
    );
    for (name, _) in &plugins {
        // The same four grants, in the same words, from every language.
        for grant in [
            "USER_REGISTER by user 123 in campaign campaign-1 (测试活动): granting 10 points",
            "SHARE_ARTICLE by user 125 in campaign campaign-7 (Winter sale): granting 20 points",
        ] {
            assert_eq!(
                count(&seen, name, grant),
                1,
                "{name}: {grant}\n{}",
                seen.join("\n")
            );
        }
        assert_eq!(
            count(&seen, name, "granting"),
            4,
            "{name}\n{}",
            seen.join("\n")
        );
    }
    Ok(())
}

/// The kit's contract checks (tests/tests/conformance.rs lists them by name).
const CONTRACT_CHECKS: usize = 8;

#[test]
fn mqplug_test_exits_0_on_a_passing_plugin_and_writes_junit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let junit = dir.path().join("junit.xml");
    let output = mqplug_command()
        .arg("test")
        .arg(plugin_path("reward-logger")?)
        .arg("--fixtures")
        .arg(workspace_root().join("plugins/reward-logger/fixtures.jsonl"))
        .arg("--junit")
        .arg(&junit)
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}");
    let fixtures = mqplug::conformance::fixtures::parse(&std::fs::read_to_string(
        workspace_root().join("plugins/reward-logger/fixtures.jsonl"),
    )?)
    .len();
    let checks = CONTRACT_CHECKS + 2 * mqplug::conformance::suite::cases().len() + fixtures;
    assert!(
        out.contains(&format!(
            "PASS: {checks} checks, {checks} passed, 0 failed, 0 skipped"
        )),
        "{out}"
    );
    let xml = std::fs::read_to_string(&junit)?;
    assert!(
        xml.contains("<testsuites name=\"mqplug test ")
            && xml.contains(&format!("tests=\"{checks}\" failures=\"0\"")),
        "{xml}"
    );
    assert_eq!(xml.matches("<testcase ").count(), checks, "{xml}");
    Ok(())
}

#[test]
fn mqplug_test_takes_the_grants_from_the_fixture_file_and_flags_add_to_them() -> Result<()> {
    let fixtures = workspace_root().join("plugins/reward-granter/fixtures.jsonl");
    let text = std::fs::read_to_string(&fixtures)?;
    let run = |extra: &[&str]| -> Result<(Option<i32>, String)> {
        let output = mqplug_command()
            .arg("test")
            .arg(plugin_path("reward-granter")?)
            .arg("--fixtures")
            .arg(&fixtures)
            .args(extra)
            .output()?;
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    };
    let (code, out) = run(&[])?;
    assert_eq!(code, Some(0), "{out}");
    let checks = CONTRACT_CHECKS
        + 2 * mqplug::conformance::suite::cases().len()
        + mqplug::conformance::fixtures::parse(&text).len();
    assert!(
        out.contains(&format!("PASS: {checks} checks, {checks} passed")),
        "{out}"
    );
    assert!(out.contains("granted: 2 config, 1 secrets"), "{out}");
    // A flag wins over the file for the same key: another token is sent,
    // and the fixture expecting the file's token fails, naming the header.
    let (code, out) = run(&["--secret", "rewards_token=other-token"])?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("expected header authorization: Bearer test-token, got Bearer [secret]"),
        "{out}"
    );
    Ok(())
}

#[test]
fn mqplug_test_keeps_buckets_in_memory_from_the_grants_line_and_checks_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fixtures = workspace_root().join("plugins/reward-granter/dedupe.jsonl");
    let text = std::fs::read_to_string(&fixtures)?;
    let run = |fixtures: &Path| -> Result<(Option<i32>, String)> {
        let output = mqplug_command()
            .arg("test")
            .arg(plugin_path("reward-granter")?)
            .arg("--fixtures")
            .arg(fixtures)
            .output()?;
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    };
    let (code, out) = run(&fixtures)?;
    assert_eq!(code, Some(0), "{out}");
    let checks = CONTRACT_CHECKS
        + 2 * mqplug::conformance::suite::cases().len()
        + mqplug::conformance::fixtures::parse(&text).len();
    assert!(
        out.contains(&format!("PASS: {checks} checks, {checks} passed")),
        "{out}"
    );
    assert!(out.contains("granted: 1 buckets"), "{out}");
    // The same file expecting the failed grant's claim kept, and with a key
    // preset in a bucket it does not grant: each is named.
    let changed = text
        .replace(r#""m-3": null"#, r#""m-3": "^pending$""#)
        .replace(
            r#""kv": {"granted": {"m-2": "pending"}}"#,
            r#""kv": {"elsewhere": {"m-2": "pending"}}"#,
        );
    assert_ne!(changed, text);
    let file = dir.path().join("changed.jsonl");
    std::fs::write(&file, changed)?;
    let (code, out) = run(&file)?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("kv granted/m-3: expected a value matching /^pending$/, it is absent"),
        "{out}"
    );
    assert!(
        out.contains(r#"kv: bucket "elsewhere" is not granted"#),
        "{out}"
    );
    Ok(())
}

#[test]
fn mqplug_test_exits_1_on_a_failing_plugin_and_2_when_it_cannot_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let junit = dir.path().join("junit.xml");
    let output = mqplug_command()
        .arg("test")
        .arg(plugin_path("flaky")?)
        .arg("--junit")
        .arg(&junit)
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{out}");
    // flaky fails every second call: each built-in event's second run.
    let cases = mqplug::conformance::suite::cases().len();
    assert!(
        out.contains(&format!(
            "FAIL: {} checks, {} passed, {cases} failed",
            CONTRACT_CHECKS + 2 * cases,
            CONTRACT_CHECKS + cases
        )),
        "{out}"
    );
    assert!(out.contains("-> not deterministic"), "{out}");
    let xml = std::fs::read_to_string(&junit)?;
    assert_eq!(
        xml.matches("<failure message=\"not deterministic").count(),
        cases,
        "{xml}"
    );

    let output = mqplug_command()
        .arg("test")
        .arg(dir.path().join("missing.wasm"))
        .output()?;
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read") && err.contains("missing.wasm"),
        "{err}"
    );
    Ok(())
}

/// The admin listener's address, from the line `mqplug run` prints.
fn admin_address(seen: &[String]) -> Result<String> {
    Ok(seen
        .iter()
        .find_map(|l| l.strip_prefix("mqplug: admin on http://"))
        .and_then(|rest| rest.split('/').next())
        .context("the admin address")?
        .to_string())
}

/// GET `path` from `addr`: (status line, body).
fn http_get(addr: &str, path: &str) -> Result<(String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("a response")?;
    Ok((
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    ))
}

#[test]
fn the_admin_endpoints_and_json_logs_show_plugins_versions_and_counts() -> Result<()> {
    let broker = LocalBroker::start()?;
    let plugin = plugin_path("reward-logger")?;
    let version = mqplug::wasm::Version::of(&std::fs::read(&plugin)?).0;
    let spec = format!("rewards={}", plugin.display());
    let (_running, lines) = spawn_mqplug(
        [
            "run",
            "--log-format",
            "json",
            "--admin-listen",
            "127.0.0.1:0",
            "--name-server",
            &broker.name_server,
            "--plugin",
            &spec,
        ],
        "info",
    )?;
    let mut seen = Vec::new();
    let started = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
        seen.iter()
            .any(|l| l.starts_with("mqplug: admin on http://"))
    });
    ensure!(started, "mqplug did not start:\n{}", seen.join("\n"));
    let addr = admin_address(&seen)?;

    assert_eq!(http_get(&addr, "/healthz")?.0, "HTTP/1.1 200 OK");
    // Ready: the name server answers. The topic is not created yet, which
    // /readyz notes.
    let (status, body) = http_get(&addr, "/readyz")?;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert_eq!(
        body,
        "ready\ntopic marketing_task_completed: no broker holds it yet (its first producer or mqadmin updateTopic creates it)\n"
    );
    assert_eq!(http_get(&addr, "/nope")?.0, "HTTP/1.1 404 Not Found");

    // The topic does not exist until the producer creates it, so publish
    // after the consumer is up: it subscribes by name.
    publish_examples(&broker)?;
    let handled = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
        seen.iter().filter(|l| l.contains("granting")).count() >= 4
    });
    ensure!(handled, "events not handled:\n{}", seen.join("\n"));

    // A plugin's log line as JSON, with the message span's fields.
    let line = seen
        .iter()
        .find(|l| l.contains("granting"))
        .context("a plugin log line")?;
    let json: serde_json::Value = serde_json::from_str(line).context("a JSON log line")?;
    assert_eq!(json["span"]["plugin"], "rewards", "{json}");
    assert_eq!(json["span"]["version"], &version[..12], "{json}");
    assert!(json["span"]["message_id"].is_string(), "{json}");
    assert_eq!(json["span"]["reconsume_times"], 0, "{json}");

    // A plugin's log line comes before its message is counted: wait for the
    // counters to catch up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(&addr, "/metrics")?
        .1
        .contains("mqplug_messages_total{plugin=\"rewards\",outcome=\"success\"} 4")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = http_get(&addr, "/plugins")?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let plugins: serde_json::Value = serde_json::from_str(&body)?;
    let rewards = &plugins["plugins"][0];
    assert_eq!(rewards["name"], "rewards", "{plugins}");
    assert_eq!(rewards["version"], version.as_str(), "{plugins}");
    assert_eq!(rewards["group"], "mqplug-rewards", "{plugins}");
    assert_eq!(rewards["state"], "serving", "{plugins}");
    assert!(
        rewards["messages"]["success"].as_u64() >= Some(4),
        "{plugins}"
    );

    let (_, metrics) = http_get(&addr, "/metrics")?;
    for expected in [
        format!("mqplug_plugin_info{{plugin=\"rewards\",version=\"{version}\"}} 1"),
        "mqplug_messages_total{plugin=\"rewards\",outcome=\"success\"} 4".to_string(),
        "mqplug_failures_total{plugin=\"rewards\",kind=\"rejected\"}".to_string(),
        "mqplug_handler_duration_seconds_count{plugin=\"rewards\"}".to_string(),
        "mqplug_plugin_loads_total{plugin=\"rewards\",result=\"ok\"".to_string(),
        "mqplug_pool_live{kind=\"component_instances\"} ".to_string(),
        "mqplug_pool_capacity_component_instances 256".to_string(),
        "process_resident_memory_bytes ".to_string(),
    ] {
        assert!(
            metrics.contains(&expected),
            "missing {expected}:\n{metrics}"
        );
    }
    Ok(())
}

/// `message_id=...` of a log line's `message` span.
fn message_id_of(line: &str) -> Option<&str> {
    let rest = line.split("message_id=").nth(1)?;
    rest.split([' ', '}']).next()
}

/// The body of a BUSY event for the chaos plugin: `ms` milliseconds of work
/// for user `user` (which the tests use as the event's number).
fn busy_body(user: u64, ms: u64) -> String {
    format!(
        r#"{{"event_type":"BUSY","user_id":{user},"tenant_id":"t","app_id":"a","campaign_id":"c","campaign_name":"n","event_data":{{"ms":{ms}}},"timestamp":"2026-11-25T14:19:15+08:00"}}"#
    )
}

/// What an interrupted stream left: the events each host completed.
struct Interrupted {
    published: u64,
    by_first: Vec<(String, u64, i64)>,
    by_second: Vec<(String, u64, i64)>,
    /// How the first host exited.
    first_exit: std::process::ExitStatus,
}

/// Publishes 200 busy events, starts a host, sends it `signal` once it has
/// completed 40, then starts a second host (same group) and waits until
/// every event was completed by one of them.
fn interrupt_mid_stream(signal: libc::c_int) -> Result<Interrupted> {
    const N: u64 = 200;
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config = chaos_config(
        dir.path(),
        &format!("name_server = \"{}\"", broker.name_server),
    )?;
    // Each event keeps the plugin busy for 100 ms: at concurrency 4, some
    // 4 s of work are left when the test sees 40 completed, far more than
    // a busy machine takes to notice and send the signal.
    let events = dir.path().join("events.jsonl");
    let lines: Vec<String> = (0..N).map(|user| busy_body(user, 100)).collect();
    std::fs::write(&events, lines.join("\n"))?;
    publish_file(&broker, &events)?;

    let spawn = || spawn_run_logging(&config, "info,mqplug::dispatch=debug");

    let (mut first, lines) = spawn()?;
    let mut seen_first = Vec::new();
    let some = wait_for_lines(&lines, &mut seen_first, Duration::from_secs(90), |seen| {
        completed(seen).len() >= 40
    });
    ensure!(
        some,
        "the first host handled too little:\n{}",
        seen_first.join("\n")
    );
    let mut child = first.0.take().context("running")?;
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let first_exit = child.wait()?;
    read_to_exit(&lines, &mut seen_first);
    let by_first = completed(&seen_first);

    let (_second, lines) = spawn()?;
    let mut seen_second = Vec::new();
    let all = wait_for_lines(&lines, &mut seen_second, Duration::from_secs(120), |seen| {
        handled_users(&by_first, &completed(seen)).len() as u64 >= N
    });
    let by_second = completed(&seen_second);
    ensure!(
        all,
        "not every event was handled after the restart: first host {} completions, second {}",
        by_first.len(),
        by_second.len()
    );
    ensure!(
        by_first.len() < N as usize,
        "the signal did not land mid-stream"
    );
    Ok(Interrupted {
        published: N,
        by_first,
        by_second,
        first_exit,
    })
}

#[test]
fn a_host_killed_with_sigkill_mid_stream_loses_nothing_after_a_restart() -> Result<()> {
    let run = interrupt_mid_stream(libc::SIGKILL)?;
    let duplicates = handled_twice(&run.by_first, &run.by_second);
    println!(
        "SIGKILL: published {}; first host completed {} before the kill, second host {}; \
         {duplicates} handled twice (completed before the kill, offset not yet committed)",
        run.published,
        run.by_first.len(),
        run.by_second.len()
    );
    Ok(())
}

#[test]
fn a_host_stopped_with_sigterm_mid_stream_acknowledges_what_it_handled() -> Result<()> {
    let run = interrupt_mid_stream(libc::SIGTERM)?;
    let duplicates = handled_twice(&run.by_first, &run.by_second);
    println!(
        "SIGTERM: published {}; first host completed {} (in-flight ones included) and exited {}; \
         second host {}; {duplicates} handled twice",
        run.published,
        run.by_first.len(),
        run.first_exit,
        run.by_second.len()
    );
    assert!(run.first_exit.success(), "{}", run.first_exit);
    assert_eq!(
        duplicates, 0,
        "a message the stopped host completed was delivered again"
    );
    Ok(())
}

/// Publishes BUSY events with user ids 0, 1, 2, ... on its own thread, one
/// every `every`, through the library's producer, until `stop` turns true;
/// `sent` counts them. Returns how many were sent.
fn publish_paced(
    name_server: &str,
    every: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<u64>> {
    let name_server = name_server.to_string();
    std::thread::spawn(move || {
        use mqplug::mq::{MqRuntime, ProducerSettings, Publisher};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mq = MqRuntime::new(1)?;
            let topic = mqplug::topic::TopicName::new("marketing.task.completed")?;
            let publisher =
                Publisher::start(&mq, ProducerSettings::new(name_server, topic)).await?;
            let mut user = 0;
            while !stop.load(Ordering::SeqCst) {
                let event = mqplug::TaskEvent::decode(busy_body(user, 20).as_bytes(), usize::MAX)?;
                publisher.publish(&event).await?;
                user += 1;
                sent.store(user, Ordering::SeqCst);
                tokio::time::sleep(every).await;
            }
            publisher.shutdown().await;
            mq.shutdown().await;
            Ok(user)
        })
    })
}

/// `mqplug run --config CONFIG` with `MQPLUG_LOG=log`, once its consumer
/// has started: the process, its line channel and the lines so far.
fn start_host_logging(
    config: &std::path::Path,
    log: &str,
    which: &str,
) -> Result<(Running, mpsc::Receiver<String>, Vec<String>)> {
    let (running, lines) = spawn_run_logging(config, log)?;
    let mut seen = Vec::new();
    ensure!(
        wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
            seen.iter().any(|l| l.contains("consumer started"))
        }),
        "the {which} host did not start:\n{}",
        seen.join("\n")
    );
    Ok((running, lines, seen))
}

/// Sets the flag when dropped, also when the test fails early.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What one host's log says it completed: (message id, user id, queue id)
/// of every `seen` line whose message the dispatcher then reported handled.
fn completed(seen: &[String]) -> Vec<(String, u64, i64)> {
    let done: std::collections::HashSet<&str> = seen
        .iter()
        .filter(|l| l.contains("mqplug::dispatch: handled"))
        .filter_map(|l| message_id_of(l))
        .collect();
    seen.iter()
        .filter_map(|l| {
            let id = message_id_of(l)?;
            let json = &l[l.find("seen {")? + 5..];
            let value: serde_json::Value = serde_json::from_str(json).ok()?;
            if !done.contains(id) {
                return None;
            }
            Some((
                id.to_string(),
                value["user_id"].as_u64()?,
                value["queue_id"].as_i64()?,
            ))
        })
        .collect()
}

/// The user ids either host completed.
fn handled_users(
    first: &[(String, u64, i64)],
    second: &[(String, u64, i64)],
) -> std::collections::HashSet<u64> {
    first
        .iter()
        .chain(second)
        .map(|(_, user, _)| *user)
        .collect()
}

/// Messages both hosts completed.
fn handled_twice(first: &[(String, u64, i64)], second: &[(String, u64, i64)]) -> usize {
    let first: std::collections::HashSet<&String> = first.iter().map(|(id, _, _)| id).collect();
    second
        .iter()
        .filter(|(id, _, _)| first.contains(id))
        .count()
}

#[test]
fn two_hosts_share_the_queues_and_a_killed_one_hands_its_queues_to_the_other() -> Result<()> {
    const AFTER_KILL: u64 = 300;
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    // Both hosts: one consumer group, a topic of 4 queues created at start.
    let config = chaos_config(
        dir.path(),
        &format!(
            "name_server = \"{}\"\n[producer]\nenabled = true\ncreate_topic_queues = 4",
            broker.name_server
        ),
    )?;
    let start_host =
        |which: &str| start_host_logging(&config, "info,mqplug::dispatch=debug", which);
    let (mut first, first_lines, mut seen_first) = start_host("first")?;
    let (_second, second_lines, mut seen_second) = start_host("second")?;

    // 100 events a second, 20 ms of work each, until the survivor has had
    // AFTER_KILL more after the kill: the kill always lands mid-stream.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publishing = publish_paced(
        &broker.name_server,
        Duration::from_millis(10),
        stop.clone(),
        sent.clone(),
    );
    let stop_publishing = StopOnDrop(stop);
    // Until both hosts have completed events: the group shares the queues.
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed(&seen_first).len() < 30 || completed(&seen_second).len() < 30 {
        ensure!(
            Instant::now() < deadline && !publishing.is_finished(),
            "the hosts did not share the stream: first completed {}, second {}",
            completed(&seen_first).len(),
            completed(&seen_second).len()
        );
        seen_first.extend(first_lines.try_iter());
        seen_second.extend(second_lines.try_iter());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut child = first.0.take().context("running")?;
    child.kill()?; // SIGKILL mid-stream
    child.wait()?;
    read_to_exit(&first_lines, &mut seen_first);
    let by_first = completed(&seen_first);
    let first_queues: std::collections::BTreeSet<i64> =
        by_first.iter().map(|(_, _, q)| *q).collect();
    let second_queues_before: std::collections::BTreeSet<i64> =
        completed(&seen_second).iter().map(|(_, _, q)| *q).collect();

    let sent_at_kill = sent.load(Ordering::SeqCst);
    while sent.load(Ordering::SeqCst) < sent_at_kill + AFTER_KILL && !publishing.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stop_publishing);
    let n = publishing
        .join()
        .map_err(|_| anyhow::anyhow!("the publishing thread panicked"))??;
    let all = wait_for_lines(
        &second_lines,
        &mut seen_second,
        Duration::from_secs(180),
        |seen| handled_users(&by_first, &completed(seen)).len() as u64 >= n,
    );
    let by_second = completed(&seen_second);
    let users = handled_users(&by_first, &by_second);
    let missing: Vec<u64> = (0..n).filter(|u| !users.contains(u)).collect();
    let duplicates = handled_twice(&by_first, &by_second);
    let second_queues_after: std::collections::BTreeSet<i64> =
        by_second.iter().map(|(_, _, q)| *q).collect();
    println!(
        "failover: published {n} ({sent_at_kill} before the kill); first host completed {} on queues {first_queues:?} before SIGKILL; \
         second host completed {} (queues {second_queues_before:?} before the kill, {second_queues_after:?} in all); \
         {duplicates} handled by both; missing {}",
        by_first.len(),
        by_second.len(),
        missing.len()
    );
    ensure!(all, "events never handled after the failover: {missing:?}");
    // The killed host's queues moved to the survivor.
    assert!(
        first_queues.is_subset(&second_queues_after),
        "the second host never consumed the first host's queues {first_queues:?}: {second_queues_after:?}"
    );
    Ok(())
}

/// The platform's own Go consumer (rocketmq-client-go v2, the guide's push
/// consumer with its `json.Unmarshal` into `TaskEventMessage`) reads what
/// `mqplug publish` sends: every field decodes with the platform's struct, the
/// tag and keys are mqplug's, and nothing is retried.
#[test]
fn mqplug_publish_feeds_the_platforms_go_consumer() -> Result<()> {
    use mqplug_tests::peers::GoConsumer;

    // The Go client needs the Java broker (the Rust 1.0.0 servers refuse it).
    let broker = LocalBroker::start_kind(mqplug_tests::broker::BrokerKind::Java)?;
    let file = workspace_root().join("examples/events.jsonl");
    let expected: Vec<mqplug::TaskEvent> = std::fs::read_to_string(&file)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| mqplug::TaskEvent::decode(line.as_bytes(), usize::MAX))
        .collect::<Result<_, _>>()?;
    // The Go consumer needs the topic to exist: the first publish creates it,
    // and the consumer starts from the first offset.
    let out = publish_file(&broker, &file)?;
    ensure!(
        out.contains(&format!("sent {}, failed 0", expected.len())),
        "{out}"
    );
    let go = GoConsumer::start(
        &broker.name_server,
        "marketing_task_completed",
        "marketing-consumer-group",
    )?;
    let all = go.wait_until(Duration::from_secs(90), |lines| {
        lines.iter().filter(|l| l.get("msg_id").is_some()).count() >= expected.len()
    });
    let deliveries = go.deliveries();
    ensure!(all, "the Go consumer got {deliveries:?}\n{}", broker.logs());

    let mut ids = std::collections::HashSet::new();
    for delivery in &deliveries {
        ensure!(
            delivery.get("error").is_none(),
            "json.Unmarshal failed, so the Go consumer retries: {delivery}"
        );
        ensure!(delivery["reconsume_times"] == 0, "retried: {delivery}");
        ensure!(
            ids.insert(delivery["msg_id"].to_string()),
            "delivered twice: {delivery}"
        );
        let decoded = &delivery["event"];
        let event = expected
            .iter()
            .find(|e| {
                decoded["UserID"] == e.user_id && decoded["EventType"] == e.event_type.as_str()
            })
            .with_context(|| format!("the Go consumer decoded an unknown event: {delivery}"))?;
        // What the platform's struct holds is what mqplug was asked to send.
        let sent: serde_json::Value = serde_json::from_slice(&event.encode())?;
        for field in [
            "TenantID",
            "AppID",
            "CampaignID",
            "CampaignName",
            "Timestamp",
        ] {
            assert_eq!(decoded[field], sent[field], "{field} in {delivery}");
        }
        assert_eq!(decoded["EventData"], sent["EventData"], "{delivery}");
        assert_eq!(delivery["tags"], event.event_type.as_str(), "mqplug's tag");
        assert_eq!(delivery["keys"], event.key().as_str(), "mqplug's key");
    }
    assert_eq!(deliveries.len(), expected.len(), "each event once");
    Ok(())
}

/// `mqplug new NAME --lang LANG` in `dir`, then the project's own build
/// (the command its README gives, with this checkout's tools), then
/// `mqplug test` with its fixtures: the kit must pass as generated.
fn new_project_builds_and_passes_the_kit(lang: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = format!("first-{lang}-plugin");
    let project = dir.path().join(&name);
    let output = mqplug_command()
        .args(["new", &name, "--lang", lang, "--dir"])
        .arg(&project)
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm_name = format!("{}.wasm", name.replace('-', "_"));
    assert!(out.contains("mqplug test"), "{out}");
    let component = match lang {
        "rust" => {
            // The checkout's lock file and target folder: the same crates,
            // already built.
            std::fs::copy(
                workspace_root().join("plugins/Cargo.lock"),
                project.join("Cargo.lock"),
            )?;
            run(Command::new("cargo")
                .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
                .env("CARGO_TARGET_DIR", mqplug_tests::plugins::target_dir())
                .current_dir(&project))?;
            mqplug_tests::plugins::target_dir()
                .join("wasm32-wasip2/release")
                .join(&wasm_name)
        }
        "python" => {
            let (componentize_py, _) = mqplug_tests::plugins::guest_tools()?;
            run(Command::new(componentize_py)
                .args([
                    "-d",
                    "wit",
                    "-w",
                    "plugin",
                    "componentize",
                    "--stub-wasi",
                    "app",
                    "-o",
                ])
                .arg(&wasm_name)
                .current_dir(&project))?;
            project.join(&wasm_name)
        }
        "go" => {
            // Its build script finds wasm-tools and the adapter where this
            // checkout's install script put them.
            mqplug_tests::plugins::guest_tools()?;
            run(Command::new("bash").arg("build.sh").current_dir(&project))?;
            project.join(&wasm_name)
        }
        _ => {
            // What `npm run build` runs, with the componentize-js this
            // checkout installed (instead of `npm install`).
            let (_, node_modules) = mqplug_tests::plugins::guest_tools()?;
            run(Command::new("node")
                .args(["componentize.mjs", &format!("{name}.js"), &wasm_name])
                .env("NODE_PATH", node_modules)
                .current_dir(&project))?;
            project.join(&wasm_name)
        }
    };
    let output = mqplug_command()
        .arg("test")
        .arg(&component)
        .arg("--fixtures")
        .arg(project.join("fixtures.jsonl"))
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{lang}: {out}");
    assert!(
        out.contains("line 4: the platform's example event"),
        "{out}"
    );
    assert!(out.contains("err, dead letter: no tenant"), "{out}");
    Ok(())
}

/// Runs a build command; its output in the error when it fails.
fn run(command: &mut Command) -> Result<()> {
    let output = command.output()?;
    ensure!(
        output.status.success(),
        "{command:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn mqplug_new_writes_a_rust_plugin_that_builds_and_passes_the_kit() -> Result<()> {
    new_project_builds_and_passes_the_kit("rust")
}

#[test]
fn mqplug_new_writes_a_python_plugin_that_builds_and_passes_the_kit() -> Result<()> {
    new_project_builds_and_passes_the_kit("python")
}

#[test]
fn mqplug_new_writes_a_javascript_plugin_that_builds_and_passes_the_kit() -> Result<()> {
    new_project_builds_and_passes_the_kit("js")
}

#[test]
fn mqplug_new_writes_a_go_plugin_that_builds_and_passes_the_kit() -> Result<()> {
    new_project_builds_and_passes_the_kit("go")
}

/// `mqplug dlq redrive` while the host runs and holds the plugin's embedded
/// store (which one process may open at a time): the dead letter goes back
/// to the plugin's group through its retry topic, and the running host
/// handles it again, with the same message id.
/// Waits up to 90 s until message `id` is in `group`'s dead-letter queue
/// on `broker`; whether it is.
async fn in_dead_letter_queue(broker: &LocalBroker, group: &str, id: &str) -> Result<bool> {
    let mq = mqplug::mq::MqRuntime::new(1)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut found = false;
    while !found && Instant::now() < deadline {
        found = mqplug::dlq::read(&mq, &broker.name_server, group)
            .await?
            .is_some_and(|letters| letters.iter().any(|l| l.delivery.message_id == id));
        if !found {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    mq.shutdown().await;
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_beside_a_running_host_that_holds_the_store_goes_through_that_host() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("mqplug.toml");
    std::fs::write(
        &config_file,
        format!(
            "name_server = \"{}\"\n\
             [runtime]\ncache_dir = \"{}\"\n\
             [reload]\nwatch = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [producer]\nenabled = true\ncreate_topic_queues = 4\n\
             [store]\npath = \"state.redb\"\n\
             [[plugin]]\nname = \"rewards\"\npath = \"{}\"\nconsume_from = \"first\"\n\
             [plugin.key_value]\nbuckets = [\"seen\"]\n",
            broker.name_server,
            mqplug_tests::test_cache_dir().display(),
            plugin_path("chaos")?.display()
        ),
    )?;
    let config = mqplug::HostConfig::from_file(&config_file)?;
    let recorder = mqplug_tests::Recorder::new();
    let host = mqplug::Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let poison = publisher
        .publish(&mqplug_tests::sample_event("DEAD_LETTER", 1))
        .await?
        .message_id;
    let dead_lettered = in_dead_letter_queue(&broker, "mqplug-rewards", &poison).await?;
    let handled_before = recorder
        .handled()
        .iter()
        .filter(|h| h.message_id == poison)
        .count();

    let redrive = tokio::task::spawn_blocking({
        let mut command = mqplug_command();
        command
            .args(["dlq", "redrive", "--config"])
            .arg(&config_file)
            .args(["--plugin", "rewards"]);
        move || command.output()
    })
    .await??;
    let handled_again = recorder.wait_until(Duration::from_secs(90), |r| {
        r.handled()
            .iter()
            .filter(|h| h.message_id == poison)
            .count()
            > handled_before
    });
    host.shutdown().await;
    ensure!(
        dead_lettered,
        "the poison event was not dead-lettered:\n{}",
        broker.logs()
    );
    let out = String::from_utf8_lossy(&redrive.stdout);
    let err = String::from_utf8_lossy(&redrive.stderr);
    assert_eq!(redrive.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("handing 1 dead letter(s) to the running host(s) of group mqplug-rewards"),
        "{out}"
    );
    assert!(out.contains(&format!("{poison}: handed back")), "{out}");
    assert!(
        handled_again,
        "the running host did not handle the letter again:\n{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_bad_build_is_listed_and_redriven_through_the_fixed_build() -> Result<()>
{
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let plugin_file = dir.path().join("rewards.wasm");
    // The bad build: the chaos plugin dead-letters a DEAD_LETTER event.
    std::fs::copy(plugin_path("chaos")?, &plugin_file)?;
    let config_file = dir.path().join("mqplug.toml");
    std::fs::write(
        &config_file,
        format!(
            "name_server = \"{}\"\n\
             [runtime]\ncache_dir = \"{}\"\n\
             [reload]\nwatch = false\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [producer]\nenabled = true\ncreate_topic_queues = 4\n\
             [[plugin]]\nname = \"rewards\"\npath = \"rewards.wasm\"\nconsume_from = \"first\"\n",
            broker.name_server,
            mqplug_tests::test_cache_dir().display()
        ),
    )?;
    let config = mqplug::HostConfig::from_file(&config_file)?;
    let recorder = mqplug_tests::Recorder::new();
    let host = mqplug::Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let poison = publisher
        .publish(&mqplug_tests::sample_event("DEAD_LETTER", 1))
        .await?
        .message_id;
    let handled = recorder.wait_until(Duration::from_secs(90), |r| {
        r.handled().iter().any(|h| h.message_id == poison)
    });
    // The listener sends the message back after the handler's report: the
    // host stays up until the broker has it in the dead-letter queue (and
    // the name server its route).
    let dead_lettered = handled && in_dead_letter_queue(&broker, "mqplug-rewards", &poison).await?;
    host.shutdown().await;
    ensure!(
        handled && dead_lettered,
        "the poison event was not handled ({handled}) or not dead-lettered:\n{}",
        broker.logs()
    );

    // The fixed build replaces the file; the host is not running.
    std::fs::copy(plugin_path("reward-logger")?, &plugin_file)?;
    let dlq = |args: &[&str]| {
        let mut command = mqplug_command();
        command
            .arg("dlq")
            .args(args)
            .arg("--config")
            .arg(&config_file)
            .args(["--plugin", "rewards"]);
        command
    };
    let list = tokio::task::spawn_blocking({
        let mut command = dlq(&["list"]);
        move || command.output()
    })
    .await??;
    let out = String::from_utf8_lossy(&list.stdout);
    assert_eq!(
        list.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        out.contains("1 dead letter(s) in %DLQ%mqplug-rewards"),
        "{out}"
    );
    let err = String::from_utf8_lossy(&list.stderr);
    assert!(
        !err.contains("ERROR"),
        "a list that worked logs no error: {err}"
    );
    assert!(
        out.contains(&format!("{poison}  delivered 1x"))
            && out.contains("DEAD_LETTER by user 1 in campaign-1"),
        "{out}"
    );

    let redrive = tokio::task::spawn_blocking({
        let mut command = dlq(&["redrive"]);
        move || command.output()
    })
    .await??;
    let out = String::from_utf8_lossy(&redrive.stdout);
    let err = String::from_utf8_lossy(&redrive.stderr);
    assert_eq!(redrive.status.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("{poison}: ConsumeSuccess")), "{out}");
    assert!(out.contains("1 acknowledged, 0 not"), "{out}");
    // The fixed build saw the message with its id.
    assert!(
        err.contains(&format!("message_id={poison}")) && err.contains("granting 10 points"),
        "{err}"
    );

    let missing = tokio::task::spawn_blocking({
        let mut command = dlq(&["redrive", "--id", "no-such-id"]);
        move || command.output()
    })
    .await??;
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{err}");
    assert!(err.contains("no dead letter \"no-such-id\""), "{err}");
    Ok(())
}

#[test]
fn a_fixture_file_cannot_open_the_network_to_its_plugin() -> Result<()> {
    use mqplug_tests::http_server::{Answer, Server};
    let server = Server::start(Answer::Ok("reached"));
    let dir = tempfile::tempdir()?;
    let fixtures = dir.path().join("fixtures.jsonl");
    let event = serde_json::json!({
        "event_type": "HTTP", "user_id": 1, "tenant_id": "t", "app_id": "a",
        "campaign_id": "c", "campaign_name": "n",
        "event_data": {"url": format!("{}/metadata", server.origin())},
        "timestamp": "2026-11-25T14:19:15+08:00",
    });
    std::fs::write(
        &fixtures,
        format!(
            "{}\n{}\n",
            serde_json::json!({"grants": {"allowed_outbound_hosts": [server.origin()]}}),
            serde_json::json!({"name": "calls out", "event": event, "expect": "err",
                "reason": "the fixture has no answer"}),
        ),
    )?;
    let output = mqplug_command()
        .arg("test")
        .arg(plugin_path("chaos")?)
        .arg("--fixtures")
        .arg(&fixtures)
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(
        server.requests().is_empty(),
        "a granted origin from the file was reached: {:?}",
        server.requests()
    );
    Ok(())
}

/// Where the reward-granter's dedupe claims live in [`exactly_once`].
enum DedupeStore<'a> {
    /// Shared by two hosts in one group.
    Redis(&'a mqplug_tests::LocalRedis),
    /// One host's own file.
    Embedded,
}

/// What [`exactly_once`] measured.
struct ExactlyOnce {
    /// Events the producer reported sent.
    published: u64,
    /// Sends that failed after every retry (the broker may still have
    /// stored some: their grants are not required, and still counted).
    not_sent: u64,
    stats: mqplug_tests::rewards::Stats,
    /// Users granted more than once (duplicate grants) and never (lost).
    granted_twice: usize,
    never_granted: usize,
    /// Messages the plugin accepted more than once: deliveries RocketMQ
    /// made again after a success (each found its grant recorded).
    accepted_again: usize,
    /// Deliveries that found the grant recorded and asked the service
    /// nothing.
    recorded_before: usize,
    /// Deliveries that found another delivery's claim and were retried.
    claim_held: usize,
    /// Messages whose grant reached the service again (`already granted
    /// before` in the plugin's log).
    repeated: Vec<String>,
}

/// Handlers the killed host runs at once (the plugin's default
/// concurrency): the most grants a kill can catch between the service's
/// answer and the record.
const KILLED_HOST_CONCURRENCY: u64 = 4;

/// The reward-granter with its dedupe on, N events at a steady pace, one
/// host killed with SIGKILL mid-stream and restarted, then the broker
/// stopped and restarted mid-stream; the rewards service on loopback counts
/// every request and grant.
fn exactly_once(store: DedupeStore) -> Result<ExactlyOnce> {
    use mqplug_tests::rewards::RewardsService;
    const N: u64 = 1000;
    const KILL_AT: u64 = 300;
    const BROKER_RESTART_AT: u64 = 650;
    let mut broker = LocalBroker::start()?;
    let rewards = RewardsService::start("exactly-once-token")?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("token"), "exactly-once-token")?;
    let (store_config, hosts) = match &store {
        DedupeStore::Redis(redis) => (
            format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url()),
            2,
        ),
        DedupeStore::Embedded => ("[store]\npath = \"state.redb\"\n".to_string(), 1),
    };
    let config = dir.path().join("mqplug.toml");
    std::fs::write(
        &config,
        format!(
            r#"name_server = "{name_server}"
[producer]
enabled = true
create_topic_queues = 4
{store_config}
[[plugin]]
name = "reward-granter"
path = "{wasm}"
consume_from = "first"
deadline_ms = 3000
allowed_outbound_hosts = ["{url}"]
allowed_topics = ["marketing.reward.granted"]
[plugin.key_value]
buckets = ["granted"]
[plugin.config]
rewards_url = "{url}"
dedupe_bucket = "granted"
# Above the deadline; a claim orphaned by the kill holds this long.
dedupe_lease_ms = "5000"
[plugin.secrets]
rewards_token = {{ file = "token" }}
"#,
            name_server = broker.name_server,
            wasm = plugin_path("reward-granter")?.display(),
            url = rewards.url(),
        ),
    )?;
    let start_host = |which: &str| start_host_logging(&config, "info", which);
    // Every line of every host process, in the end.
    let mut all_lines: Vec<String> = Vec::new();
    let (mut killed, killed_lines, mut seen_killed) = start_host("first")?;
    let mut others = Vec::new();
    for _ in 1..hosts {
        others.push(start_host("second")?);
    }

    // 40 events a second: the kill and the broker restart land mid-stream.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publishing = publish_riding_outages(
        &broker.name_server,
        N,
        Duration::from_millis(25),
        stop.clone(),
        sent.clone(),
    );
    let stop_publishing = StopOnDrop(stop.clone());
    let wait_sent = |n: u64| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while sent.load(Ordering::SeqCst) < n {
            ensure!(
                Instant::now() < deadline && !publishing.is_finished(),
                "publishing stalled at {}",
                sent.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    wait_sent(KILL_AT)?;
    let mut child = killed.0.take().context("running")?;
    child.kill()?; // SIGKILL mid-stream
    child.wait()?;
    read_to_exit(&killed_lines, &mut seen_killed);
    all_lines.append(&mut seen_killed);
    std::thread::sleep(Duration::from_secs(1));
    let (_restarted, restarted_lines, mut seen_restarted) = start_host("restarted")?;

    wait_sent(BROKER_RESTART_AT)?;
    broker.stop_broker();
    std::thread::sleep(Duration::from_secs(5));
    broker.start_broker()?;
    let (sent_users, not_sent) = publishing
        .join()
        .map_err(|_| anyhow::anyhow!("the publishing thread panicked"))??;
    drop(stop_publishing);
    let published = sent_users.len() as u64;

    // Until every event is granted, then a quiet period for late duplicates.
    let deadline = Instant::now() + Duration::from_secs(240);
    while rewards.stats().grants < published + not_sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(mqplug_tests::QUIET_PERIOD * 3);
    read_to_exit_now(&restarted_lines, &mut seen_restarted);
    all_lines.append(&mut seen_restarted);
    for (_, lines, seen) in &mut others {
        read_to_exit_now(lines, seen);
        all_lines.append(seen);
    }

    let mut per_user: std::collections::HashMap<u64, usize> = Default::default();
    for grant in rewards.grants() {
        *per_user.entry(grant.user_id).or_default() += 1;
    }
    let mut accepted: std::collections::HashMap<&str, usize> = Default::default();
    for line in all_lines
        .iter()
        .filter(|l| l.contains("mqplug::plugin") && l.contains("granted "))
    {
        if let Some(id) = message_id_of(line) {
            *accepted.entry(id).or_default() += 1;
        }
    }
    let count = |needle: &str| all_lines.iter().filter(|l| l.contains(needle)).count();
    Ok(ExactlyOnce {
        published,
        stats: rewards.stats(),
        granted_twice: per_user.values().filter(|n| **n > 1).count(),
        never_granted: sent_users
            .iter()
            .filter(|user| !per_user.contains_key(user))
            .count(),
        not_sent,
        accepted_again: accepted.values().filter(|n| **n > 1).count(),
        recorded_before: count(", recorded before)"),
        claim_held: count("is being handled by another delivery"),
        repeated: all_lines
            .iter()
            .filter(|l| l.contains(", already granted before)"))
            .filter_map(|l| message_id_of(l).map(str::to_string))
            .collect(),
    })
}

/// Publishes `n` granter events (user ids 0..n) every `every`, each with
/// patient retries so a broker restart is ridden out; returns the users
/// sent and the count of sends that failed after every retry.
fn publish_riding_outages(
    name_server: &str,
    n: u64,
    every: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(Vec<u64>, u64)>> {
    let name_server = name_server.to_string();
    std::thread::spawn(move || {
        use mqplug::mq::{Backoff, MqRuntime, ProducerSettings, Publisher};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mq = MqRuntime::new(1)?;
            let topic = mqplug::topic::TopicName::new("marketing.task.completed")?;
            let mut settings = ProducerSettings::new(name_server, topic);
            settings.backoff = Backoff {
                attempts: 20,
                initial: Duration::from_millis(200),
                max: Duration::from_secs(2),
            };
            let publisher = Publisher::start(&mq, settings).await?;
            let (mut users, mut failed) = (Vec::new(), 0);
            for user in 0..n {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let event = mqplug::TaskEvent::decode(busy_body(user, 0).as_bytes(), usize::MAX)?;
                match publisher.publish(&event).await {
                    Ok(_) => users.push(user),
                    Err(_) => failed += 1,
                }
                sent.store(user + 1, Ordering::SeqCst);
                tokio::time::sleep(every).await;
            }
            publisher.shutdown().await;
            mq.shutdown().await;
            Ok((users, failed))
        })
    })
}

/// The lines a running process has written so far.
fn read_to_exit_now(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) {
    seen.extend(lines.try_iter());
}

fn report_exactly_once(label: &str, run: &ExactlyOnce) -> Result<()> {
    println!(
        "exactly once, {label}: published {} (not sent {}); grants {} (users granted twice {}, \
         never {}); requests {}, repeated {} (first ids {:?}); RocketMQ delivered {} accepted events again, \
         {} deliveries found the grant recorded and asked nothing, {} found another delivery's \
         claim and were retried",
        run.published,
        run.not_sent,
        run.stats.grants,
        run.granted_twice,
        run.never_granted,
        run.stats.requests,
        run.stats.repeated_requests,
        run.repeated.iter().take(5).collect::<Vec<_>>(),
        run.accepted_again,
        run.recorded_before,
        run.claim_held,
    );
    ensure!(
        run.never_granted == 0,
        "{} events never granted",
        run.never_granted
    );
    ensure!(
        run.granted_twice == 0,
        "{} users granted twice",
        run.granted_twice
    );
    ensure!(run.stats.grants >= run.published);
    // The dedupe stops every repeat but the grants the kill caught between
    // the service's answer and the record: their claims end with the lease
    // and the redelivery asks again (answered with the first grant).
    ensure!(
        run.stats.repeated_requests <= KILLED_HOST_CONCURRENCY,
        "{} repeated requests, more than the {KILLED_HOST_CONCURRENCY} grants a kill can catch",
        run.stats.repeated_requests,
    );
    Ok(())
}

#[test]
fn two_hosts_sharing_redis_grant_every_event_once_through_a_sigkill_and_a_broker_restart()
-> Result<()> {
    let redis = mqplug_tests::LocalRedis::start()?;
    let run = exactly_once(DedupeStore::Redis(&redis))?;
    report_exactly_once("two hosts, Redis", &run)
}

#[test]
fn one_host_with_its_embedded_store_grants_every_event_once_through_a_sigkill_and_a_broker_restart()
-> Result<()> {
    let run = exactly_once(DedupeStore::Embedded)?;
    report_exactly_once("one host, embedded store", &run)
}

/// `mqplug state list|get|clear` on the embedded store a config names; and,
/// while another process holds that store, an error that says what to do.
#[test]
fn state_lists_shows_and_clears_a_plugins_bucket() -> Result<()> {
    use mqplug::store::{Backend, Embedded, Namespace, Write};
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mqplug.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"state.redb\"\n\
             [[plugin]]\nname = \"rewards\"\npath = {:?}\n\
             [plugin.key_value]\nbuckets = [\"seen\", \"granted\"]\n",
            plugin_path("chaos")?.display().to_string()
        ),
    )?;
    let store_path = dir.path().join("state.redb");
    {
        let store = Embedded::open(&store_path)?;
        let seen = Namespace::new("rewards", "seen");
        store.write(&seen, "user-1", b"first", None, Write::Set, u64::MAX)?;
        store.write(
            &seen,
            "evil\u{1b}[31m",
            b"\x1b[2J",
            None,
            Write::Set,
            u64::MAX,
        )?;
        let granted = Namespace::new("rewards", "granted");
        store.write(&granted, "grant-9", b"\xff\x00", None, Write::Set, u64::MAX)?;
    }
    let state = |args: &[&str]| -> Result<(Option<i32>, String, String)> {
        let output = mqplug_command()
            .arg("state")
            .args(args)
            .arg("--config")
            .arg(&config)
            .args(["--plugin", "rewards"])
            .env("MQPLUG_LOG", "off")
            .output()?;
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    };
    let (code, out, err) = state(&["list"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("bucket seen of plugin rewards: 2 key(s)"),
        "{out}"
    );
    assert!(out.contains("user-1  5 bytes"), "{out}");
    assert!(
        out.contains("bucket granted of plugin rewards: 1 key(s)"),
        "{out}"
    );
    assert!(!out.contains('\u{1b}'), "keys are escaped: {out:?}");
    let (code, out, _) = state(&["get", "--bucket", "seen", "user-1"])?;
    assert_eq!((code, out.as_str()), (Some(0), "first\n"));
    let (_, out, _) = state(&["get", "--bucket", "granted", "grant-9"])?;
    assert_eq!(out, "hex ff00\n");
    let (code, _, err) = state(&["get", "--bucket", "seen", "nobody"])?;
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = state(&["list", "--bucket", "someone-elses"])?;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("not granted bucket \"someone-elses\""),
        "{err}"
    );

    // Held by another process (a running host): what to do, not a lock error.
    {
        let _held = Embedded::open(&store_path)?;
        let (code, _, err) = state(&["list"])?;
        assert_eq!(code, Some(1));
        assert!(err.contains("stop the host first"), "{err}");
    }

    let (code, out, err) = state(&["clear", "--bucket", "seen"])?;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("cleared 2 key(s) from bucket seen"), "{out}");
    let (_, out, _) = state(&["list"])?;
    assert!(
        out.contains("bucket seen of plugin rewards: 0 key(s)"),
        "{out}"
    );
    assert!(
        out.contains("bucket granted of plugin rewards: 1 key(s)"),
        "{out}"
    );
    Ok(())
}

/// The first run as a newcomer makes it: `mqplug run` with the default log
/// filter on a broker that has no topic yet, then `mqplug publish`, whose
/// first send creates it.
#[test]
fn a_topic_created_after_start_is_said_waited_for_and_picked_up_without_client_noise() -> Result<()>
{
    let broker = LocalBroker::start()?;
    let spec = format!("rewards={}", plugin_path("reward-logger")?.display());
    let mut command = mqplug_command();
    command
        .args([
            "run",
            "--name-server",
            &broker.name_server,
            "--plugin",
            &spec,
        ])
        .env_remove("MQPLUG_LOG");
    let (_running, lines) = spawn_command(command)?;
    let mut seen = Vec::new();
    let waiting = wait_for_lines(&lines, &mut seen, Duration::from_secs(60), |seen| {
        seen.iter().any(|l| l.contains("consumer started"))
            && seen
                .iter()
                .any(|l| l.contains("topic marketing_task_completed is not on the broker yet"))
    });
    ensure!(
        waiting,
        "mqplug did not say what it waits for:\n{}",
        seen.join("\n")
    );

    let published = Instant::now();
    publish_examples(&broker)?;
    let handled = |seen: &[String]| {
        seen.iter()
            .filter(|l| l.contains("granting") || l.contains("handler error: "))
            .count()
    };
    let all = wait_for_lines(&lines, &mut seen, Duration::from_secs(90), |s| {
        handled(s) >= 5
    });
    ensure!(all, "not all events handled:\n{}", seen.join("\n"));
    eprintln!(
        "published to handled on a new topic: {:.1} s",
        published.elapsed().as_secs_f64()
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("topic marketing_task_completed is on the broker now")),
        "mqplug says when the topic appears:\n{}",
        seen.join("\n")
    );
    let noise: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("rocketmq_client_rust"))
        .collect();
    assert!(
        noise.is_empty(),
        "the client's warnings about a topic that is not there yet are kept below WARN:\n{}",
        seen.join("\n")
    );
    Ok(())
}
