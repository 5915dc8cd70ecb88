//! The `mqplug` command line, as users run it: `run` with a config file
//! against a real broker, `publish` from a JSON Lines file, SIGTERM, `replay`,
//! and the errors a user sees for a bad config.
//!
//! These live in the host crate, not in tests/, so that cargo builds the
//! binary under test itself (`CARGO_BIN_EXE_mqplug`) with the same features
//! as the rest of the test build.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mqplug_tests::plugins::plugin_path;
use mqplug_tests::{LocalBroker, workspace_root};

/// The binary under test, built by cargo for this test run.
const MQPLUG: &str = env!("CARGO_BIN_EXE_mqplug");

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

    let mut child = Command::new(MQPLUG)
        .args(["run", "--config"])
        .arg(&config)
        .env("MQPLUG_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let mut running = Running(Some(child));
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
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

    let publish = Command::new(MQPLUG)
        .args(["publish", "--name-server", &broker.name_server, "--file"])
        .arg(workspace_root().join("examples/events.jsonl"))
        .output()?;
    let out = String::from_utf8_lossy(&publish.stdout);
    assert!(publish.status.success(), "publish failed: {out}");
    assert!(out.contains("sent 5, failed 0"), "{out}");

    let handled = |seen: &[String]| {
        seen.iter()
            .filter(|l| l.contains("granting") || l.contains("handler returned an error"))
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
        seen.iter().any(|l| l.contains("handler returned an error")
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
    let output = Command::new(MQPLUG)
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
fn a_misspelt_config_key_is_named_and_nothing_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("mqplug.toml");
    std::fs::write(&config, "name_server = \"127.0.0.1:1\"\ntopik = \"x\"\n")?;
    let output = Command::new(MQPLUG)
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
    let output = Command::new(MQPLUG)
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
    let output = Command::new(MQPLUG)
        .args(["publish", "--name-server", "127.0.0.1:1"])
        .env("MQPLUG_LOG", "off")
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{out}{err}");
    assert!(out.contains("sent 0, failed 1"), "{out}");
    assert!(
        err.contains("event 1: not sent: send to marketing_task_completed:")
            && err.contains("Connection refused"),
        "{err}"
    );
    assert!(!err.contains("<redacted>"), "{err}");
    Ok(())
}
