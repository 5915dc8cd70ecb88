//! The status page at `/` in a real browser (Debian's headless Chromium over
//! WebDriver): it loads, shows a plugin that serves and one whose reload
//! failed, and its counters move when events are published.
//!
//! `MQPLUG_SCREENSHOT=docs/status-page.png` also saves what the browser shows.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::Host;
use mqplug::config::PluginConfig;
use mqplug_tests::browser::Browser;
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_plugins_state_and_its_counters_move() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let broken = dir.path().join("audit.wasm");
    std::fs::copy(plugin_path("reward-logger")?, &broken)?;
    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        "marketing.task.completed",
        vec![
            PluginConfig::new("rewards", plugin_path("reward-logger")?),
            PluginConfig::new("audit", &broken),
        ],
    );
    config.reload.poll_ms = 50;
    config.reload.settle_ms = 300;
    let host = Host::start(&config, recorder.observers()).await?;
    let addr = host.admin_addr().context("the admin listener")?;

    // A bad build of `audit`: refused, its previous build keeps serving.
    std::fs::write(&broken, b"not a component")?;
    let refused = recorder.wait_until(WAIT, |r| {
        r.loads()
            .iter()
            .any(|(plugin, _, result)| plugin == "audit" && result.is_err())
    });
    ensure!(refused, "the bad build was not refused");

    let page = tokio::task::spawn_blocking(move || -> Result<_> {
        let browser = Browser::start()?;
        browser.goto(&format!("http://{addr}/"))?;
        let serving =
            browser.wait_for_text("#plugin-rewards .state", WAIT, |t| t.starts_with("serving"))?;
        let failed = browser.wait_for_text("#plugin-audit .state", WAIT, |t| {
            t.starts_with("reload-failed")
        })?;
        let before = browser.text("#plugin-rewards .handled")?;
        let error = browser.text("#plugin-audit .error")?;
        Ok((browser, serving, failed, before, error))
    })
    .await??;
    let (browser, serving, failed, before, error) = page;
    ensure!(serving.0, "rewards not shown serving: {:?}", serving.1);
    ensure!(failed.0, "audit not shown reload-failed: {:?}", failed.1);
    // Why the build was refused, next to the state.
    let error = error.unwrap_or_default();
    assert!(error.contains("not a valid wasm component"), "{error}");
    assert_eq!(before.as_deref(), Some("0"), "nothing handled yet");

    let publisher = host.publisher().context("the producer is enabled")?;
    const EVENTS: usize = 5;
    for user in 0..EVENTS as u64 {
        publisher
            .publish(&sample_event("USER_REGISTER", user))
            .await?;
    }
    // The page refreshes by itself: its counters follow.
    let (moved, handled, latency, shot, lag, points) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let moved = browser.wait_for_text("#plugin-rewards .handled", WAIT, |t| {
                t.parse::<usize>().is_ok_and(|n| n >= EVENTS)
            })?;
            let latency = browser.text("#plugin-rewards .latency")?;
            // The lag the host read from the broker, and the chart's handled
            // line rising above its baseline (a sample every 5 s).
            let lag = browser
                .wait_for_text("#plugin-rewards .lag", WAIT, |t| t.parse::<u64>().is_ok())?;
            let deadline = std::time::Instant::now() + WAIT;
            let mut points = None;
            let rose = |points: &str| {
                points
                    .split(' ')
                    .filter_map(|point| point.split(',').nth(1))
                    .any(|y| y.parse::<f64>().is_ok_and(|y| y < 30.0))
            };
            while std::time::Instant::now() < deadline && !points.as_deref().is_some_and(rose) {
                std::thread::sleep(Duration::from_millis(500));
                points = browser.attribute("#plugin-rewards .chart polyline.handled", "points")?;
            }
            let points = (points.as_deref().is_some_and(rose), points);
            let shot = match std::env::var_os("MQPLUG_SCREENSHOT") {
                Some(path) => {
                    std::fs::write(&path, browser.screenshot()?)?;
                    Some(path)
                }
                None => None,
            };
            Ok((moved.0, moved.1, latency, shot, lag, points))
        })
        .await??;
    let plugins_now = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr)?;
        write!(stream, "GET /plugins HTTP/1.1\r\nhost: t\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        text
    };
    host.shutdown().await;
    ensure!(
        moved,
        "the handled counter did not reach {EVENTS}: {handled:?}"
    );
    let latency = latency.unwrap_or_default();
    assert!(
        latency.contains(" / ") && latency.contains("events"),
        "{latency}"
    );
    assert!(lag.0, "no lag shown: {:?}", lag.1);
    assert!(
        points.0,
        "the chart did not show the events handled: {:?}\n{plugins_now}",
        points.1
    );
    if let Some(path) = shot {
        println!("screenshot: {}", path.to_string_lossy());
    }
    Ok(())
}

/// A plugin the config adds but that cannot load (its secret file is not
/// there) is on the page as `failed`, with why, and the page says why the
/// host is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_plugin_that_failed_to_load_and_why_the_host_is_not_ready()
-> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    let write_config = |with_audit: bool| -> Result<()> {
        let mut text = format!(
            "name_server = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [reload]\npoll_ms = 50\nsettle_ms = 300\n[runtime]\ncache_dir = {:?}\n\
             [[plugin]]\nname = \"rewards\"\npath = {:?}\n",
            broker.name_server,
            mqplug_tests::test_cache_dir().display().to_string(),
            plugin_path("reward-logger")?.display().to_string()
        );
        if with_audit {
            text.push_str(&format!(
                "[[plugin]]\nname = \"audit\"\npath = {:?}\n[plugin.secrets]\ntoken = {{ file = {:?} }}\n",
                plugin_path("reward-logger")?.display().to_string(),
                dir.path().join("missing_token").display().to_string()
            ));
        }
        let partial = config_path.with_extension("partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &config_path)?;
        Ok(())
    };
    write_config(false)?;
    let host = Host::start(
        &mqplug::HostConfig::from_file(&config_path)?,
        Default::default(),
    )
    .await?;
    let addr = host.admin_addr().context("the admin listener")?;
    write_config(true)?;
    let seen = tokio::task::spawn_blocking(move || -> Result<_> {
        let browser = Browser::start()?;
        browser.goto(&format!("http://{addr}/"))?;
        let state =
            browser.wait_for_text("#plugin-audit .state", WAIT, |t| t.starts_with("failed"))?;
        let reasons = browser.wait_for_text("#reasons", WAIT, |t| {
            t.contains("plugin audit: not serving")
        })?;
        let summary = browser.text("#summary")?;
        // The whole error is the tooltip (the cell shows 200 characters).
        let error = browser.attribute("#plugin-audit .error", "title")?;
        Ok((state, reasons, summary, error))
    })
    .await??;
    host.shutdown().await;
    let (state, reasons, summary, error) = seen;
    assert!(state.0, "audit not shown failed: {:?}", state.1);
    let error = error.unwrap_or_default();
    assert!(
        error.contains("missing_token"),
        "the error names the secret file: {error}"
    );
    assert!(reasons.0, "no reason shown: {:?}", reasons.1);
    assert!(
        summary.unwrap_or_default().starts_with("not ready"),
        "the summary says not ready"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_canary_beside_the_current_build_and_promotes_it() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut entry = PluginConfig::new("rewards", plugin_path("noop")?);
    entry.canary = Some(mqplug::canary::CanaryConfig {
        path: plugin_path("reward-logger")?,
        percent: 50,
        window: 200,
        min_events: 20,
    });
    let config = host_config(&broker, "marketing.task.completed", vec![entry]);
    let host = Host::start(&config, recorder.observers()).await?;
    let addr = host.admin_addr().context("the admin listener")?;
    let publisher = host.publisher().context("the producer is enabled")?;
    const EVENTS: usize = 20;
    for user in 0..EVENTS as u64 {
        publisher
            .publish(&sample_event("USER_REGISTER", user))
            .await?;
    }
    let handled = recorder.wait_until(WAIT, |r| r.handled_by("rewards").len() >= EVENTS);
    ensure!(
        handled,
        "not all handled: {:?}",
        recorder.handled_by("rewards")
    );
    let current = mqplug::wasm::Version::of(&std::fs::read(plugin_path("noop")?)?).0;
    let candidate = mqplug::wasm::Version::of(&std::fs::read(plugin_path("reward-logger")?)?).0;

    let seen = tokio::task::spawn_blocking(move || -> Result<_> {
        let browser = Browser::start()?;
        browser.goto(&format!("http://{addr}/"))?;
        let running =
            browser.wait_for_text("#canary-rewards .state", WAIT, |t| t.starts_with("running"))?;
        let share = browser.text("#canary-rewards td.num")?;
        // Both builds side by side, with what each handled.
        let counted = |t: &str| t.contains(" handled since the canary started");
        let sides = browser.wait_for_text("#canary-rewards .candidate", WAIT, counted)?;
        let current_side = browser.text("#canary-rewards .current")?;
        if let Some(path) = std::env::var_os("MQPLUG_SCREENSHOT") {
            std::fs::write(path, browser.screenshot()?)?;
        }
        let clicked = browser.click("#canary-rewards button.promote")?;
        let promoted = browser.wait_for_text("#canary-rewards .state", WAIT, |t| {
            t.starts_with("promoted")
        })?;
        let build =
            browser.wait_for_text("#plugin-rewards td:nth-child(3)", WAIT, |t| !t.is_empty())?;
        let buttons = browser.text("#canary-rewards button")?;
        Ok((
            running,
            share,
            sides,
            current_side,
            clicked,
            promoted,
            build,
            buttons,
        ))
    })
    .await??;
    let serving = host.plugins()[0].version().to_string();
    host.shutdown().await;
    let (running, share, sides, current_side, clicked, promoted, build, buttons) = seen;
    ensure!(
        running.0,
        "the canary is not shown running: {:?}",
        running.1
    );
    assert_eq!(share.as_deref(), Some("50%"));
    let candidate_side = sides.1.unwrap_or_default();
    let current_side = current_side.unwrap_or_default();
    assert!(
        candidate_side.starts_with(&candidate[..12]),
        "{candidate_side}"
    );
    assert!(current_side.starts_with(&current[..12]), "{current_side}");
    // What each build handled adds up to what was published.
    let handled_by = |side: &str| -> usize {
        side.split(" handled since")
            .next()
            .and_then(|text| text.rsplit('\n').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(usize::MAX)
    };
    assert_eq!(
        handled_by(&candidate_side) + handled_by(&current_side),
        EVENTS,
        "{candidate_side}\n{current_side}"
    );
    ensure!(clicked, "no promote button");
    ensure!(promoted.0, "not shown promoted: {:?}", promoted.1);
    assert!(
        build.1.unwrap_or_default().starts_with(&candidate[..12]),
        "the plugin's build is the candidate's now"
    );
    assert_eq!(buttons, None, "no buttons on a promoted canary");
    assert_eq!(serving, candidate);
    Ok(())
}
