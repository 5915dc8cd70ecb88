//! Hot reload against a real broker: a swap under a steady stream loses and
//! retries nothing; broken builds never replace a working one; plugins come
//! and go with the config; a warm compile cache skips compilation.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::config::{HostConfig, PluginConfig};
use mqplug::wasm::{Compiled, Plugin, PluginSettings, RuntimeSettings, Version, WasmRuntime};
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

const WAIT: Duration = Duration::from_secs(90);

/// A host config that watches quickly and caches compiled plugins in `dir`.
fn watching_config(broker: &LocalBroker, dir: &Path, plugins: Vec<PluginConfig>) -> HostConfig {
    let mut config = host_config(broker, "marketing.task.completed", plugins);
    config.reload.poll_ms = 50;
    config.reload.settle_ms = 300;
    config.runtime.cache_dir = Some(dir.join("cache"));
    config
}

/// GET `path` from the admin listener.
fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// A config file's text for `name_server`, with the producer on, the admin
/// listener on a free port and the file watched quickly; plugins follow.
fn watched_config_text(name_server: &str) -> String {
    format!(
        "name_server = \"{name_server}\"\n[producer]\nenabled = true\ncreate_topic_queues = 4\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[reload]\npoll_ms = 50\nsettle_ms = 300\n\
         [runtime]\ncache_dir = {:?}\n",
        mqplug_tests::test_cache_dir()
    )
}

fn plugins_json(host: &Host) -> Result<serde_json::Value> {
    let response = get(host.admin_addr().context("admin is on")?, "/plugins")?;
    let body = response.split("\r\n\r\n").nth(1).context("a body")?;
    Ok(serde_json::from_str(body)?)
}

/// Waits until the host serves exactly `names`; on timeout, returns what it
/// serves instead.
async fn serving(host: &Host, names: &[&str]) -> Result<(), Vec<String>> {
    let now = || -> Vec<String> {
        host.plugins()
            .iter()
            .map(|p| p.name().to_string())
            .collect()
    };
    let waited = tokio::time::timeout(WAIT, async {
        while now() != names {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    waited.map_err(|_| now())
}

fn version_of(path: &Path) -> String {
    Version::of(&std::fs::read(path).unwrap()).0
}

/// Replaces `path` atomically (write a temporary file, rename it over).
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_a_steady_stream_loses_nothing_and_retries_nothing() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("rewards.wasm");
    std::fs::copy(plugin_path("reward-logger")?, &path)?;
    let (old, new) = (version_of(&path), version_of(&plugin_path("chaos")?));
    let recorder = Recorder::new();
    let config = watching_config(
        &broker,
        dir.path(),
        vec![PluginConfig::new("rewards", &path)],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    const N: u64 = 300;
    let mut published = HashSet::new();
    for i in 0..N {
        if i == N / 3 {
            replace(&path, &std::fs::read(plugin_path("chaos")?)?)?;
        }
        let receipt = publisher.publish(&sample_event("USER_REGISTER", i)).await?;
        published.insert(receipt.message_id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = recorder.wait_until(WAIT, |r| r.handled_by("rewards").len() >= N as usize);
    tokio::time::sleep(mqplug_tests::QUIET_PERIOD).await;
    let status = plugins_json(&host)?;
    host.shutdown().await;
    ensure!(all, "not every event was handled:\n{}", broker.logs());

    let handled = recorder.handled_by("rewards");
    let ids: HashSet<_> = handled.iter().map(|h| h.message_id.clone()).collect();
    assert_eq!(ids, published, "every published message was handled");
    assert_eq!(handled.len(), N as usize, "none twice");
    let mut by_version: HashMap<String, usize> = HashMap::new();
    for h in &handled {
        assert_eq!(h.outcome, DeliveryOutcome::ConsumeSuccess, "{h:?}");
        assert_eq!(
            h.reconsume_times, 0,
            "the swap sent nothing to retry: {h:?}"
        );
        *by_version
            .entry(h.version.clone().context("versioned")?)
            .or_default() += 1;
    }
    assert_eq!(
        by_version.keys().cloned().collect::<HashSet<_>>(),
        HashSet::from([old.clone(), new.clone()]),
        "every message handled by the old or the new build: {by_version:?}"
    );
    println!(
        "handled by old build: {}, by new: {}",
        by_version[&old], by_version[&new]
    );
    let loads = recorder.loads();
    assert_eq!(
        loads,
        vec![
            ("rewards".into(), old, Ok(())),
            ("rewards".into(), new.clone(), Ok(()))
        ]
    );
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["version"], new.as_str(), "{status}");
    assert_eq!(plugin["state"], "serving", "{status}");
    assert_eq!(plugin["messages"]["success"], N, "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_builds_are_refused_and_the_old_build_keeps_serving() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("rewards.wasm");
    std::fs::copy(plugin_path("reward-logger")?, &path)?;
    let serving = version_of(&path);
    let recorder = Recorder::new();
    let mut config = watching_config(
        &broker,
        dir.path(),
        vec![PluginConfig::new("rewards", &path)],
    );
    // Far longer than the pause in the slow write below, even on a loaded
    // machine: the half-written file must not look settled.
    config.reload.settle_ms = 1500;
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let good = std::fs::read(plugin_path("chaos")?)?;

    let broken: [(&str, Vec<u8>, &str); 3] = [
        (
            "corrupt",
            b"\0asm\x0d\0\x01\0 garbage".to_vec(),
            "not a valid wasm component",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "not a valid wasm component",
        ),
        (
            "another world",
            std::fs::read(plugin_path("future-wit")?)?,
            "does not export the mqplug:plugin handler",
        ),
    ];
    for (round, (what, bytes, error)) in broken.into_iter().enumerate() {
        replace(&path, &bytes)?;
        let refused = recorder.wait_until(WAIT, |r| {
            r.loads()
                .iter()
                .filter(|(_, _, result)| result.is_err())
                .count()
                > round
        });
        ensure!(refused, "{what}: no refused reload");
        let status = plugins_json(&host)?;
        let plugin = &status["plugins"][0];
        assert_eq!(plugin["state"], "reload-failed", "{what}: {status}");
        assert_eq!(plugin["version"], serving.as_str(), "{what}: {status}");
        let shown = plugin["error"].as_str().unwrap_or_default();
        assert!(shown.contains(error), "{what}: {shown}");

        // The old build still handles new messages.
        let receipt = publisher.publish(&sample_event("USER_REGISTER", 7)).await?;
        let handled =
            recorder.wait_until(WAIT, |r| r.handled_message("rewards", &receipt.message_id));
        ensure!(handled, "{what}: the old build stopped serving");
        let h = recorder
            .handled_by("rewards")
            .into_iter()
            .find(|h| h.message_id == receipt.message_id)
            .context("handled")?;
        assert_eq!(h.version.as_deref(), Some(serving.as_str()), "{what}");
        assert_eq!(h.outcome, DeliveryOutcome::ConsumeSuccess, "{what}");
    }

    // A good build written slowly, in two halves: the half-written file is
    // never read, the whole one is loaded once.
    let half = good.len() / 2;
    {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&good[..half])?;
        file.flush()?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        file.write_all(&good[half..])?;
    }
    let new = Version::of(&good).0;
    let loaded = recorder.wait_until(WAIT, |r| {
        r.loads()
            .iter()
            .any(|(_, version, result)| *version == new && result.is_ok())
    });
    let loads = recorder.loads();
    host.shutdown().await;
    ensure!(loaded, "the good build was not loaded: {loads:?}");
    assert_eq!(
        loads
            .iter()
            .filter(|(_, _, result)| result.is_err())
            .count(),
        3,
        "only the three broken builds were refused: {loads:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_added_to_and_removed_from_the_config_start_and_stop() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    let write_config = |plugins: &[(&str, &str)]| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        for (name, plugin) in plugins {
            text.push_str(&format!(
                "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nconsume_from = \"first\"\n",
                plugin_path(plugin)?.display()
            ));
        }
        replace(&config_path, text.as_bytes())
    };
    write_config(&[("first", "reward-logger")])?;
    let recorder = Recorder::new();
    let host = Host::start(&HostConfig::from_file(&config_path)?, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    write_config(&[("first", "reward-logger"), ("second", "chaos")])?;
    let started = serving(&host, &["first", "second"]).await;
    ensure!(started.is_ok(), "second plugin not started: {started:?}");
    let receipt = publisher.publish(&sample_event("USER_REGISTER", 1)).await?;
    let both = recorder.wait_until(WAIT, |r| {
        ["first", "second"]
            .iter()
            .all(|p| r.handled_message(p, &receipt.message_id))
    });
    ensure!(both, "both plugins handle a new message");

    write_config(&[("second", "chaos")])?;
    let stopped = serving(&host, &["second"]).await;
    ensure!(stopped.is_ok(), "first plugin not stopped: {stopped:?}");
    let receipt = publisher.publish(&sample_event("USER_REGISTER", 2)).await?;
    let second = recorder.wait_until(WAIT, |r| r.handled_message("second", &receipt.message_id));
    tokio::time::sleep(mqplug_tests::QUIET_PERIOD).await;
    let status = plugins_json(&host)?;
    host.shutdown().await;
    ensure!(second, "the remaining plugin handles a new message");
    assert!(
        !recorder.handled_message("first", &receipt.message_id),
        "a removed plugin handles nothing more"
    );
    assert_eq!(
        status["plugins"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(status["config_error"], serde_json::Value::Null, "{status}");
    Ok(())
}

/// GET `path`'s status code and body.
fn status_and_body(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let response = get(addr, path)?;
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("a status line")?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((code, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_added_whose_load_fails_is_listed_as_failed_and_the_host_is_not_ready_until_fixed()
-> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    let secret = dir.path().join("audit_token");
    let write_config = |with_audit: bool| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        text.push_str(&format!(
            "[[plugin]]\nname = \"rewards\"\npath = \"{}\"\n",
            plugin_path("reward-logger")?.display()
        ));
        if with_audit {
            text.push_str(&format!(
                "[[plugin]]\nname = \"audit\"\npath = \"{}\"\n\
                 [plugin.secrets]\ntoken = {{ file = {:?} }}\n",
                plugin_path("reward-logger")?.display(),
                secret.display().to_string()
            ));
        }
        replace(&config_path, text.as_bytes())
    };
    write_config(false)?;
    let host = Host::start(&HostConfig::from_file(&config_path)?, Default::default()).await?;
    let addr = host.admin_addr().context("admin is on")?;
    let (code, _) = status_and_body(addr, "/readyz")?;
    ensure!(code == 200, "ready with one plugin serving");

    // Added with a secret file that is not there: it cannot load.
    write_config(true)?;
    let deadline = std::time::Instant::now() + WAIT;
    let mut status = plugins_json(&host)?;
    while status["plugins"].as_array().map_or(0, Vec::len) < 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = plugins_json(&host)?;
    }
    let (code, readyz) = status_and_body(addr, "/readyz")?;

    // The secret appears and the config changes again: tried again, serves.
    std::fs::write(&secret, "s3cret")?;
    write_config(true)?;
    let started = serving(&host, &["audit", "rewards"]).await;
    let (code_after, readyz_after) = status_and_body(addr, "/readyz")?;
    let status_after = plugins_json(&host)?;
    host.shutdown().await;

    let audit = status["plugins"]
        .as_array()
        .and_then(|plugins| plugins.iter().find(|p| p["name"] == "audit"))
        .with_context(|| format!("audit is listed: {status}"))?;
    assert_eq!(audit["state"], "failed", "{status}");
    let error = audit["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("audit_token"),
        "the error names the file: {error}"
    );
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(code, 503, "{readyz}");
    assert!(
        readyz.contains("plugin audit: not serving: cannot load"),
        "{readyz}"
    );

    ensure!(
        started.is_ok(),
        "audit serves once its secret is there: {started:?}"
    );
    assert_eq!(code_after, 200, "{readyz_after}");
    assert_eq!(status_after["ready"], true, "{status_after}");
    assert!(
        status_after["plugins"]
            .as_array()
            .is_some_and(|plugins| plugins.iter().all(|p| p["state"] == "serving")),
        "{status_after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_changed_during_a_config_reload_is_loaded_and_a_touch_is_not() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    // Copies, so the test can rewrite them. The watcher checks plugins in
    // name order: "added" before "first".
    let (first_path, added_path) = (dir.path().join("first.wasm"), dir.path().join("added.wasm"));
    let (old_build, new_build) = (plugin_path("reward-logger")?, plugin_path("chaos")?);
    std::fs::copy(&old_build, &first_path)?;
    std::fs::copy(&new_build, &added_path)?;
    let write_config = |with_added: bool| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        if with_added {
            text.push_str(&format!(
                "[[plugin]]\nname = \"added\"\npath = \"{}\"\n",
                added_path.display()
            ));
        }
        text.push_str(&format!(
            "[[plugin]]\nname = \"first\"\npath = \"{}\"\n",
            first_path.display()
        ));
        replace(&config_path, text.as_bytes())
    };
    write_config(false)?;
    let recorder = Recorder::new();
    let host = Host::start(&HostConfig::from_file(&config_path)?, recorder.observers()).await?;
    let first_serves = |build: &Path| {
        let expected = version_of(build);
        let host = &host;
        async move {
            tokio::time::timeout(WAIT, async {
                while !host
                    .plugins()
                    .iter()
                    .any(|p| p.name() == "first" && *p.version() == *expected)
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .is_ok()
        }
    };

    // The config changes, and the first plugin's file right after it: both
    // settle together, and the config is applied first.
    write_config(true)?;
    replace(&first_path, &std::fs::read(&new_build)?)?;
    let changed_during_reload = first_serves(&new_build).await;
    // The added plugin's file touched (same bytes, a new modification
    // time), then the first plugin changed back: once that is served, the
    // watcher has looked at the touched file too.
    replace(&added_path, &std::fs::read(&added_path)?)?;
    replace(&first_path, &std::fs::read(&old_build)?)?;
    let changed_back = first_serves(&old_build).await;
    let loads = |r: &Recorder, plugin: &str| r.loads().iter().filter(|(p, ..)| p == plugin).count();
    // A reload swaps the build in before it reports the load: wait for the
    // report of the change just served.
    recorder.wait_until(WAIT, |r| loads(r, "first") >= 3);
    let (first_loads, added_loads) = (loads(&recorder, "first"), loads(&recorder, "added"));
    host.shutdown().await;
    ensure!(
        changed_during_reload,
        "the file changed during the config reload was never loaded"
    );
    ensure!(changed_back, "the later change was not loaded");
    assert_eq!(first_loads, 3, "at start, and once per change");
    assert_eq!(
        added_loads, 1,
        "the added plugin loaded once: neither the check after the config reload nor the touch \
         reloaded a build with the same content"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_config_values_reach_the_plugin_and_secrets_stay_off_the_admin_pages() -> Result<()>
{
    const TOKEN: &str = "tok-0a9f3c";
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    std::fs::write(dir.path().join("token"), TOKEN)?;
    let write_config = |greeting: &str| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        text.push_str(&format!(
            "[[plugin]]\nname = \"chaos\"\npath = \"{}\"\nconsume_from = \"first\"\n\
             [plugin.config]\ngreeting = \"{greeting}\"\n\
             [plugin.secrets]\ntoken = {{ file = \"token\" }}\n",
            plugin_path("chaos")?.display()
        ));
        replace(&config_path, text.as_bytes())
    };
    write_config("hello")?;
    let recorder = Recorder::new();
    let host = Host::start(&HostConfig::from_file(&config_path)?, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let ask =
        || mqplug_tests::sample_event_with("CONFIG", 1, serde_json::json!({"keys": ["greeting"]}));
    let said = |line: &str| {
        recorder.wait_until(WAIT, |r| {
            r.plugin_logs("chaos").iter().any(|(_, l)| l == line)
        })
    };
    publisher.publish(&ask()).await?;
    let first = said("config greeting=hello");
    let status = plugins_json(&host)?;
    write_config("bonjour")?;
    let reloaded = recorder.wait_until(WAIT, |r| {
        r.loads()
            .iter()
            .filter(|(p, _, ok)| p == "chaos" && ok.is_ok())
            .count()
            == 2
    });
    publisher.publish(&ask()).await?;
    let second = said("config greeting=bonjour");
    host.shutdown().await;
    ensure!(first, "the first value was not read");
    ensure!(reloaded, "the changed entry was not reloaded");
    ensure!(second, "the changed value did not reach the plugin");
    let plugin = &status["plugins"][0];
    assert_eq!(plugin["contract"], "0.2", "{status}");
    assert_eq!(plugin["config_keys"], serde_json::json!(["greeting"]));
    assert_eq!(plugin["secret_keys"], serde_json::json!(["token"]));
    assert!(!status.to_string().contains(TOKEN), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_list_that_outgrows_the_running_pools_is_refused_and_nothing_changes() -> Result<()>
{
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    let write_config = |plugins: &[(&str, u32)]| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        for (name, concurrency) in plugins {
            text.push_str(&format!(
                "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nconcurrency = {concurrency}\n",
                plugin_path("reward-logger")?.display()
            ));
        }
        replace(&config_path, text.as_bytes())
    };
    write_config(&[("first", 4)])?;
    let host = Host::start(&HostConfig::from_file(&config_path)?, Default::default()).await?;
    // 100 more listener threads than the client runtime was sized for at
    // start (4 + 32 spare): valid on its own, but not for this host.
    write_config(&[("first", 4), ("greedy", 100)])?;
    let deadline = std::time::Instant::now() + WAIT;
    let mut status = plugins_json(&host)?;
    while status["config_error"].is_null() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = plugins_json(&host)?;
    }
    host.shutdown().await;
    let error = status["config_error"].as_str().unwrap_or_default();
    ensure!(
        error.contains("104 listener threads, over the 36"),
        "the reload is refused with its reason: {status}"
    );
    let names: Vec<&str> = status["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["first"], "nothing was started: {status}");
    assert_eq!(status["plugins"][0]["state"], "serving", "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_plugins_and_settings_survive_an_edit_of_the_config_file() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    // The file names a wrong name server; the command line the right one.
    let write_config = |plugins: &[&str]| -> Result<()> {
        let mut text = watched_config_text("127.0.0.1:1");
        for name in plugins {
            text.push_str(&format!(
                "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nconsume_from = \"first\"\n",
                plugin_path("reward-logger")?.display()
            ));
        }
        replace(&config_path, text.as_bytes())
    };
    write_config(&["a-file"])?;
    let mut config = HostConfig::from_file(&config_path)?;
    config.apply(mqplug::config::Overrides {
        name_server: Some(broker.name_server.clone()),
        plugins: vec![PluginConfig {
            consume_from: mqplug::mq::ConsumeFrom::First,
            ..PluginConfig::new("c-cli", plugin_path("chaos")?)
        }],
        ..Default::default()
    });
    let recorder = Recorder::new();
    let host = Host::start(&config, recorder.observers()).await?;
    let started = serving(&host, &["a-file", "c-cli"]).await;
    ensure!(started.is_ok(), "not started: {started:?}");

    write_config(&["a-file", "b-file"])?;
    let reloaded = serving(&host, &["a-file", "b-file", "c-cli"]).await;
    let status = plugins_json(&host)?;
    // The command line's name server still holds: the plugins consume.
    let publisher = host.publisher().context("the producer is enabled")?;
    let receipt = publisher.publish(&sample_event("USER_REGISTER", 1)).await?;
    let all = recorder.wait_until(WAIT, |r| {
        ["a-file", "b-file", "c-cli"]
            .iter()
            .all(|p| r.handled_message(p, &receipt.message_id))
    });
    host.shutdown().await;
    ensure!(
        reloaded.is_ok(),
        "the --plugin plugin was forgotten on the edit: {reloaded:?}; {status}"
    );
    ensure!(all, "every plugin handles a new message after the edit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_entry_whose_build_fails_leaves_the_running_one_serving() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"not a component")?;
    let write_config = |path: &Path| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        text.push_str(&format!(
            "[[plugin]]\nname = \"rewards\"\npath = \"{}\"\nconsume_from = \"first\"\n",
            path.display()
        ));
        replace(&config_path, text.as_bytes())
    };
    let good = plugin_path("reward-logger")?;
    write_config(&good)?;
    let recorder = Recorder::new();
    let host = Host::start(&HostConfig::from_file(&config_path)?, recorder.observers()).await?;
    let serving_version = version_of(&good);

    // The entry now names a file that is no component.
    write_config(&broken)?;
    let deadline = std::time::Instant::now() + WAIT;
    let mut status = plugins_json(&host)?;
    while status["plugins"][0]["state"] != "reload-failed" && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = plugins_json(&host)?;
    }
    let ready = get(host.admin_addr().context("admin is on")?, "/readyz")?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let receipt = publisher.publish(&sample_event("USER_REGISTER", 1)).await?;
    let handled = recorder.wait_until(WAIT, |r| {
        r.handled_by("rewards").iter().any(|h| {
            h.message_id == receipt.message_id && h.outcome == DeliveryOutcome::ConsumeSuccess
        })
    });
    host.shutdown().await;
    assert_eq!(status["plugins"][0]["state"], "reload-failed", "{status}");
    assert_eq!(
        status["plugins"][0]["version"],
        serving_version.as_str(),
        "the old build still serves: {status}"
    );
    assert!(
        ready.starts_with("HTTP/1.1 200") && ready.contains("plugin rewards: reload failed"),
        "{ready}"
    );
    ensure!(handled, "the running build handles a new message");
    Ok(())
}

#[test]
fn a_warm_cache_loads_without_compiling_and_a_bad_entry_is_recompiled() -> Result<()> {
    let root = tempfile::tempdir()?;
    // The folder's MAC key lives beside it, in `root`.
    let dir = root.path().join("cache");
    let settings = RuntimeSettings {
        cache_dir: Some(dir.clone()),
        ..RuntimeSettings::default()
    };
    let wasm = std::fs::read(plugin_path("reward-logger")?)?;
    let load = || -> Result<Plugin> {
        // A new runtime each time: as after a restart.
        let runtime: Arc<WasmRuntime> =
            WasmRuntime::new(settings.clone()).map_err(anyhow::Error::msg)?;
        Ok(Plugin::load(
            &runtime,
            PluginSettings::new("rewards"),
            &wasm,
            Default::default(),
        )?)
    };
    assert_eq!(load()?.compiled(), Compiled::Fresh, "a cold cache compiles");
    let entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    assert_eq!(entries.len(), 1);
    let entry = entries[0].path();
    let name = entry.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&Version::of(&wasm).0),
        "keyed by the digest: {name}"
    );
    assert!(name.ends_with(".cwasm"), "{name}");

    let plugin = load()?;
    assert_eq!(
        plugin.compiled(),
        Compiled::FromCache,
        "a warm cache does not compile"
    );
    assert_eq!(plugin.version(), &Version::of(&wasm));
    drop(plugin);

    // Another engine configuration (fuel counting on) finds no entry of its
    // own: it compiles, it does not load the other one, and it is no error.
    let fuel_runtime = WasmRuntime::new(RuntimeSettings {
        fuel: true,
        ..settings.clone()
    })
    .map_err(anyhow::Error::msg)?;
    let fueled = Plugin::load(
        &fuel_runtime,
        PluginSettings::new("rewards"),
        &wasm,
        Default::default(),
    )?;
    assert_eq!(
        fueled.compiled(),
        Compiled::Fresh,
        "another engine config compiles afresh"
    );
    drop(fueled);
    assert_eq!(
        std::fs::read_dir(&dir)?.count(),
        2,
        "one entry per engine config"
    );

    std::fs::write(&entry, b"not a compiled component")?;
    assert_eq!(
        load()?.compiled(),
        Compiled::Fresh,
        "a bad entry is compiled afresh, not an error"
    );
    assert_eq!(load()?.compiled(), Compiled::FromCache, "and rewritten");
    Ok(())
}

/// Loads `plugin` (a plugin of `plugins/`) on a new runtime caching in `dir`,
/// as after a restart.
fn load_cached(dir: &Path, max_bytes: Option<u64>, plugin: &str) -> Result<Plugin> {
    let runtime = WasmRuntime::new(RuntimeSettings {
        cache_dir: Some(dir.to_path_buf()),
        cache_max_bytes: max_bytes.unwrap_or(mqplug::wasm::DEFAULT_CACHE_MAX_BYTES),
        ..RuntimeSettings::default()
    })
    .map_err(anyhow::Error::msg)?;
    let wasm = std::fs::read(plugin_path(plugin)?)?;
    Ok(Plugin::load(
        &runtime,
        PluginSettings::new(plugin),
        &wasm,
        Default::default(),
    )?)
}

/// The one `.cwasm` entry whose name starts with `plugin`'s digest.
fn entry_of(dir: &Path, plugin: &str) -> Result<std::path::PathBuf> {
    let version = Version::of(&std::fs::read(plugin_path(plugin)?)?);
    std::fs::read_dir(dir)?
        .filter_map(|item| item.ok().map(|item| item.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&version.0))
        })
        .with_context(|| format!("no cache entry for {plugin}"))
}

/// A change made to a cache entry's bytes.
type Tampering<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;

#[test]
fn a_swapped_truncated_or_flipped_cache_entry_is_never_run_and_is_recompiled() -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("cache");
    for plugin in ["noop", "chaos"] {
        assert_eq!(load_cached(&dir, None, plugin)?.compiled(), Compiled::Fresh);
        assert_eq!(
            load_cached(&dir, None, plugin)?.compiled(),
            Compiled::FromCache
        );
    }
    let noop = entry_of(&dir, "noop")?;
    let chaos = std::fs::read(entry_of(&dir, "chaos")?)?;
    let tamperings: [(&str, Tampering<'_>); 3] = [
        // Another plugin's valid entry under this plugin's name: running it
        // would run the wrong code, with no sandbox check to stop it.
        (
            "swapped for chaos's entry",
            Box::new(|entry| *entry = chaos.clone()),
        ),
        (
            "truncated",
            Box::new(|entry| entry.truncate(entry.len() / 2)),
        ),
        (
            "one byte flipped",
            Box::new(|entry| {
                let middle = entry.len() / 2;
                entry[middle] ^= 0x01;
            }),
        ),
    ];
    for (what, tamper) in &tamperings {
        let mut bytes = std::fs::read(&noop)?;
        tamper(&mut bytes);
        std::fs::write(&noop, &bytes)?;
        let plugin = load_cached(&dir, None, "noop")?;
        assert_eq!(
            plugin.compiled(),
            Compiled::Fresh,
            "{what}: refused, compiled afresh"
        );
        assert_eq!(
            plugin.version(),
            &Version::of(&std::fs::read(plugin_path("noop")?)?),
            "{what}"
        );
        assert_eq!(
            load_cached(&dir, None, "noop")?.compiled(),
            Compiled::FromCache,
            "{what}: the rewritten entry is used again"
        );
    }
    // The key is outside the folder, readable by this user only.
    let key = root.path().join("cache.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    Ok(())
}

#[test]
fn a_cache_folder_others_can_write_is_not_used() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let root = tempfile::tempdir()?;
    let dir = root.path().join("cache");
    assert_eq!(load_cached(&dir, None, "noop")?.compiled(), Compiled::Fresh);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    assert_eq!(
        load_cached(&dir, None, "noop")?.compiled(),
        Compiled::Fresh,
        "an entry in a world-writable folder is not run"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))?;
    assert_eq!(load_cached(&dir, None, "noop")?.compiled(), Compiled::Fresh);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    assert_eq!(
        load_cached(&dir, None, "noop")?.compiled(),
        Compiled::FromCache
    );
    Ok(())
}

#[test]
fn a_cache_folder_or_key_that_is_a_link_or_another_users_is_not_used() -> Result<()> {
    use std::os::unix::fs::symlink;

    let root = tempfile::tempdir()?;
    let real = root.path().join("real");
    assert_eq!(
        load_cached(&real, None, "noop")?.compiled(),
        Compiled::Fresh
    );
    assert_eq!(
        load_cached(&real, None, "noop")?.compiled(),
        Compiled::FromCache
    );
    // The same folder and key through links: not run from.
    let link = root.path().join("link");
    symlink(&real, &link)?;
    symlink(root.path().join("real.key"), root.path().join("link.key"))?;
    assert_eq!(
        load_cached(&link, None, "noop")?.compiled(),
        Compiled::Fresh,
        "a linked folder is not used"
    );
    // A folder of its own whose key was swapped for a link to another key.
    let other = root.path().join("other");
    load_cached(&other, None, "noop")?;
    std::fs::remove_file(root.path().join("other.key"))?;
    symlink(root.path().join("real.key"), root.path().join("other.key"))?;
    assert_eq!(
        load_cached(&other, None, "noop")?.compiled(),
        Compiled::Fresh,
        "a linked key is not used"
    );
    // A folder another user owns (only root can make one here).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs)?;
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534))?;
        assert_eq!(
            load_cached(&theirs, None, "noop")?.compiled(),
            Compiled::Fresh
        );
        assert_eq!(
            std::fs::read_dir(&theirs)?.count(),
            0,
            "nothing written into a folder another user owns"
        );
    }
    Ok(())
}

#[test]
fn a_temporary_file_a_crashed_writer_left_is_removed_and_a_recent_one_kept() -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("cache");
    load_cached(&dir, None, "noop")?;
    let orphan = dir.join(".orphan.cwasm.1-0.tmp");
    let recent = dir.join(".recent.cwasm.2-0.tmp");
    std::fs::write(&orphan, b"half an entry")?;
    std::fs::write(&recent, b"being written by another host")?;
    std::fs::File::options()
        .write(true)
        .open(&orphan)?
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))?;
    // The next entry written tidies the folder.
    load_cached(&dir, None, "chaos")?;
    assert!(!orphan.exists(), "the two-hour-old temporary file is gone");
    assert!(recent.exists(), "a temporary file being written now stays");
    Ok(())
}

#[test]
fn past_its_size_cap_the_cache_drops_the_least_recently_used_entry() -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("cache");
    load_cached(&dir, None, "noop")?;
    let noop_bytes = std::fs::metadata(entry_of(&dir, "noop")?)?.len();
    // Room for the larger entry alone: adding a second evicts the older.
    let chaos = load_cached(&dir, Some(noop_bytes), "chaos")?;
    drop(chaos);
    let chaos_bytes = std::fs::metadata(entry_of(&dir, "chaos")?)?.len();
    let cap = noop_bytes.max(chaos_bytes);
    assert!(
        entry_of(&dir, "noop").is_err(),
        "noop, the older, was removed"
    );
    assert_eq!(
        load_cached(&dir, Some(cap), "chaos")?.compiled(),
        Compiled::FromCache,
        "the newest stays"
    );
    Ok(())
}

/// Two plugins swap consumer groups in one config change. A host's
/// consumers share one RocketMQ client instance, which holds a group only
/// once: the plugin that restarts first waits until the other has left its
/// new group, and then both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plugins_swapping_groups_in_one_change_both_restart_and_serve() -> Result<()> {
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("mqplug.toml");
    let write_config = |groups: [&str; 2]| -> Result<()> {
        let mut text = watched_config_text(&broker.name_server);
        for (name, group) in ["first", "second"].into_iter().zip(groups) {
            text.push_str(&format!(
                "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\ngroup = \"{group}\"\nconsume_from = \"first\"\n",
                plugin_path("chaos")?.display()
            ));
        }
        replace(&config_path, text.as_bytes())
    };
    write_config(["team-a", "team-b"])?;
    let recorder = Recorder::new();
    let host = Host::start(&HostConfig::from_file(&config_path)?, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    write_config(["team-b", "team-a"])?;
    let groups = || -> Vec<(String, String)> {
        host.plugins()
            .iter()
            .map(|slot| (slot.name().to_string(), slot.status().group))
            .collect()
    };
    let wanted = vec![
        ("first".to_string(), "team-b".to_string()),
        ("second".to_string(), "team-a".to_string()),
    ];
    let swapped = tokio::time::timeout(WAIT, async {
        while groups() != wanted {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let receipt = publisher.publish(&sample_event("USER_REGISTER", 7)).await?;
    let both = recorder.wait_until(WAIT, |r| {
        ["first", "second"]
            .iter()
            .all(|p| r.handled_message(p, &receipt.message_id))
    });
    let serving = groups();
    host.shutdown().await;
    ensure!(
        swapped.is_ok(),
        "both plugins serve in their new groups: {serving:?}"
    );
    ensure!(both, "both plugins handle a new message");
    Ok(())
}
