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
    let (moved, handled, latency, shot) = tokio::task::spawn_blocking(move || -> Result<_> {
        let moved = browser.wait_for_text("#plugin-rewards .handled", WAIT, |t| {
            t.parse::<usize>().is_ok_and(|n| n >= EVENTS)
        })?;
        let latency = browser.text("#plugin-rewards .latency")?;
        let shot = match std::env::var_os("MQPLUG_SCREENSHOT") {
            Some(path) => {
                std::fs::write(&path, browser.screenshot()?)?;
                Some(path)
            }
            None => None,
        };
        Ok((moved.0, moved.1, latency, shot))
    })
    .await??;
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
    if let Some(path) = shot {
        println!("screenshot: {}", path.to_string_lossy());
    }
    Ok(())
}
