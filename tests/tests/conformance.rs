//! The conformance kit (`mqplug test`) against plugins that honour the
//! contract and plugins that break one rule each on purpose: every break is
//! caught, with a message that names what is wrong.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mqplug::conformance::{self, Group, Report, Status, fixtures};
use mqplug::wasm::{PluginSettings, RuntimeSettings, WasmRuntime};
use mqplug_tests::plugins::{
    Guest, guest_granter_path, guest_plugin_path, guest_tools, plugin_path,
};
use mqplug_tests::workspace_root;

fn runtime() -> Arc<WasmRuntime> {
    WasmRuntime::new(RuntimeSettings::default()).unwrap()
}

/// The kit's deadline in these tests: the "loops" fixture waits it out, and
/// no other fixture comes near it on a slow or busy machine.
const DEADLINE_MS: u64 = 2000;

fn settings() -> PluginSettings {
    PluginSettings {
        deadline: Duration::from_millis(DEADLINE_MS),
        memory_limit_bytes: 32 * 1024 * 1024,
        ..PluginSettings::new("under-test")
    }
}

fn kit(path: &Path, settings: PluginSettings, fixture_text: &str) -> Report {
    let fixtures = fixtures::parse(fixture_text);
    conformance::run(&runtime(), settings, path, &fixtures).unwrap()
}

fn example_fixtures() -> String {
    std::fs::read_to_string(workspace_root().join("plugins/reward-logger/fixtures.jsonl")).unwrap()
}

/// The checks of `group` as (name, status).
fn checks(report: &Report, group: Group) -> Vec<(&str, &Status)> {
    report
        .checks
        .iter()
        .filter(|check| check.group == group)
        .map(|check| (check.name.as_str(), &check.status))
        .collect()
}

fn failure_of<'a>(report: &'a Report, name: &str) -> &'a str {
    match report.checks.iter().find(|check| check.name == name) {
        Some(check) => match &check.status {
            Status::Fail(why) => why,
            other => panic!(
                "{name}: expected a failure, got {other:?}\n{}",
                report.table()
            ),
        },
        None => panic!("no check {name}\n{}", report.table()),
    }
}

fn assert_passes_with_example_fixtures(path: &Path) {
    let report = kit(path, PluginSettings::new("example"), &example_fixtures());
    assert!(report.passed(), "{}", report.table());
    let mut contract: Vec<&str> = checks(&report, Group::Contract)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    contract.sort_unstable();
    assert_eq!(
        contract,
        [
            "exports mqplug:plugin/handler@0.2.x or 0.1.x",
            "imports only what the host provides",
            "is a wasm component",
            "links and instantiates within its limits",
            "opens only the buckets it is granted",
            "publishes only to the topics it is granted",
            "reaches only the origins it is granted",
            "uses only the config keys it is granted",
        ]
    );
    let (cases, fixtures) = (
        mqplug::conformance::suite::cases().len(),
        mqplug::conformance::fixtures::parse(&example_fixtures()).len(),
    );
    assert_eq!(checks(&report, Group::Suite).len(), cases);
    assert_eq!(checks(&report, Group::Determinism).len(), cases);
    assert_eq!(checks(&report, Group::Fixtures).len(), fixtures);
    assert!(report.memory_at_instantiation.unwrap() > 0);
    // Every built-in event ran twice, every fixture once.
    assert_eq!(report.event_times.len(), 2 * cases + fixtures);
}

#[test]
fn the_rust_example_passes_every_check_and_its_fixtures() {
    assert_passes_with_example_fixtures(&plugin_path("reward-logger").unwrap());
}

#[test]
fn the_python_example_passes_every_check_and_the_same_fixtures() {
    assert_passes_with_example_fixtures(&guest_plugin_path(Guest::Python).unwrap());
}

#[test]
fn the_javascript_example_passes_every_check_and_the_same_fixtures() {
    assert_passes_with_example_fixtures(&guest_plugin_path(Guest::JavaScript).unwrap());
}

#[test]
fn the_go_example_passes_every_check_and_the_same_fixtures() {
    assert_passes_with_example_fixtures(&guest_plugin_path(Guest::Go).unwrap());
}

#[test]
fn a_nondeterministic_plugin_is_caught() {
    let report = kit(&plugin_path("flaky").unwrap(), settings(), "");
    assert!(!report.passed());
    let suite = checks(&report, Group::Suite);
    assert!(
        suite.iter().all(|(_, status)| **status == Status::Pass),
        "{}",
        report.table()
    );
    let determinism = checks(&report, Group::Determinism);
    assert_eq!(determinism.len(), 10);
    for (name, status) in determinism {
        match status {
            Status::Fail(why) => assert!(
                why.starts_with("not deterministic: the same event gave ok and then err: flaky"),
                "{name}: {why}"
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn a_plugin_importing_what_the_host_lacks_is_caught_naming_the_import() {
    let report = kit(&plugin_path("bad-import").unwrap(), settings(), "");
    let why = failure_of(&report, "imports only what the host provides");
    assert!(
        why.contains("test:bad-import/vault: mqplug provides no such interface"),
        "{why}"
    );
    let why = failure_of(&report, "links and instantiates within its limits");
    assert!(why.contains("test:bad-import/vault"), "{why}");
    // Nothing ran: the rest is skipped, not passed.
    for group in [Group::Suite, Group::Determinism] {
        let rows = checks(&report, group);
        assert_eq!(rows.len(), 1, "{}", report.table());
        assert!(matches!(rows[0].1, Status::Skip(_)), "{}", report.table());
    }
    assert!(report.event_times.is_empty());
}

#[test]
fn a_plugin_built_for_another_contract_version_is_caught_naming_the_export() {
    let report = kit(&plugin_path("future-wit").unwrap(), settings(), "");
    let why = failure_of(&report, "exports mqplug:plugin/handler@0.2.x or 0.1.x");
    assert!(
        why.starts_with(
            "exports mqplug:plugin/handler@0.9.0, but this host supports mqplug:plugin 0.2.x and 0.1.x"
        ),
        "{why}"
    );
    assert!(!report.passed());
}

#[test]
fn a_component_of_another_world_and_a_junk_file_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00]).unwrap();
    let report = kit(&empty, settings(), "");
    let why = failure_of(&report, "exports mqplug:plugin/handler@0.2.x or 0.1.x");
    assert!(
        why.starts_with("does not export mqplug:plugin/handler 0.2.x and 0.1.x (exports: nothing)"),
        "{why}"
    );

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm but not really").unwrap();
    let report = kit(&junk, settings(), "");
    let why = failure_of(&report, "is a wasm component");
    assert!(why.starts_with("not a valid wasm component"), "{why}");
    assert_eq!(report.checks.len(), 3, "{}", report.table());
}

#[test]
fn a_plugin_over_its_memory_limit_at_instantiation_is_caught() {
    let path = plugin_path("reward-logger").unwrap();
    let tight = PluginSettings {
        memory_limit_bytes: 512 * 1024,
        ..settings()
    };
    let report = kit(&path, tight, "");
    let why = failure_of(&report, "links and instantiates within its limits");
    assert!(why.contains("memory limit"), "{why}");
}

#[test]
fn traps_loops_and_wrong_outcomes_in_fixtures_are_caught() {
    let fixture = |name: &str, event_type: &str, expect: &str| {
        format!(
            r#"{{"name":"{name}","event":{{"event_type":"{event_type}","user_id":1,"tenant_id":"t",
            "app_id":"a","campaign_id":"c","campaign_name":"n","timestamp":"2026-11-25T14:19:15+08:00"}},{expect}}}"#
        )
        .replace('\n', "")
    };
    let text = [
        fixture("handled", "USER_REGISTER", r#""expect":"ok""#),
        fixture(
            "fails as told",
            "FAIL",
            r#""expect":"err","reason":"asked to fail$""#,
        ),
        fixture("panics", "PANIC", r#""expect":"ok""#),
        fixture("loops", "LOOP", r#""expect":"ok""#),
        fixture("hoards memory", "OOM", r#""expect":"ok""#),
        fixture(
            "wrong reason",
            "FAIL",
            r#""expect":"err","reason":"^out of stock""#,
        ),
        fixture("unexpected ok", "USER_REGISTER", r#""expect":"err""#),
        r#"{"name":"broken","expect":"ok"}"#.to_string(),
    ]
    .join("\n");
    let report = kit(&plugin_path("chaos").unwrap(), settings(), &text);
    let fixtures = checks(&report, Group::Fixtures);
    assert_eq!(fixtures.len(), 8, "{}", report.table());
    assert_eq!(*fixtures[0].1, Status::Pass, "{}", report.table());
    assert_eq!(*fixtures[1].1, Status::Pass, "{}", report.table());
    let loops = format!("expected ok, got deadline: interrupted after {DEADLINE_MS} ms");
    let expected = [
        (
            "line 3: panics",
            "expected ok, got trap: unreachable instruction executed",
        ),
        ("line 4: loops", loops.as_str()),
        ("line 5: hoards memory", "expected ok, got memory limit"),
        (
            "line 6: wrong reason",
            "expected err matching /^out of stock/, got err: chaos: asked to fail",
        ),
        ("line 7: unexpected ok", "expected err, got ok"),
        ("line 8", "not a fixture: missing field `event`"),
    ];
    for (name, start) in expected {
        let why = failure_of(&report, name);
        assert!(why.starts_with(start), "{name}: {why}");
    }
    // The built-in events are ordinary for chaos: they pass.
    assert!(
        checks(&report, Group::Suite)
            .iter()
            .all(|(_, status)| **status == Status::Pass),
        "{}",
        report.table()
    );
}

/// The code block that follows `heading` in `file`, a page of the docs
/// relative to the workspace root (e.g. `docs/plugins/python.md`).
fn doc_snippet(file: &str, heading: &str) -> String {
    let contents = std::fs::read_to_string(workspace_root().join(file))
        .unwrap_or_else(|err| panic!("cannot read {file}: {err}"));
    contents
        .split(heading)
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("{file} has no snippet after {heading:?}"))
        .to_string()
}

/// The docs' "write your first plugin" promise: `ok`, except `err: no
/// tenant` for an empty tenant.
fn assert_readme_plugin_passes(component: &Path) {
    let event = |tenant: &str| {
        format!(
            r#"{{"event_type":"USER_REGISTER","user_id":123,"tenant_id":"{tenant}","app_id":"app1","campaign_id":"campaign-1","campaign_name":"测试活动","timestamp":"2026-11-25T14:19:15+08:00"}}"#
        )
    };
    let fixtures = format!(
        "{{\"event\":{},\"expect\":\"ok\"}}\n{{\"event\":{},\"expect\":\"err\",\"reason\":\"^no tenant$\"}}\n",
        event("tenant1"),
        event("")
    );
    let report = kit(component, PluginSettings::new("readme"), &fixtures);
    assert!(report.passed(), "{}", report.table());
    assert_eq!(checks(&report, Group::Fixtures).len(), 2);
}

fn run(command: &mut std::process::Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_readme_python_plugin_builds_and_passes_the_kit() {
    let (componentize_py, _) = guest_tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.py"),
        doc_snippet("docs/plugins/python.md", "`app.py`:\n\n```python\n"),
    )
    .unwrap();
    let component = dir.path().join("my_plugin.wasm");
    run(std::process::Command::new(componentize_py)
        .arg("-d")
        .arg(workspace_root().join("wit"))
        .args(["-w", "plugin", "componentize", "--stub-wasi", "app", "-o"])
        .arg(&component)
        .current_dir(dir.path()));
    assert_readme_plugin_passes(&component);
}

#[test]
fn the_readme_javascript_plugin_builds_and_passes_the_kit() {
    let (_, node_modules) = guest_tools().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("my-plugin.js");
    std::fs::write(
        &source,
        doc_snippet("docs/plugins/javascript.md", "`my-plugin.js`:\n\n```js\n"),
    )
    .unwrap();
    let component = dir.path().join("my_plugin.wasm");
    run(std::process::Command::new("node")
        .arg(workspace_root().join("plugins/js/componentize.mjs"))
        .arg(&source)
        .arg(&component)
        .env("NODE_PATH", node_modules)
        .current_dir(dir.path()));
    assert_readme_plugin_passes(&component);
}

#[test]
fn a_config_key_the_plugin_needs_and_is_not_granted_is_named() {
    const NEEDS: &str = r#"{"name": "reads its url", "expect": "ok", "event": {"event_type": "CONFIG", "user_id": 1, "tenant_id": "t", "app_id": "a", "campaign_id": "c", "campaign_name": "n", "event_data": {"keys": ["rewards_url"]}, "timestamp": "2026-11-25T14:19:15+08:00"}}"#;
    const CHECK: &str = "uses only the config keys it is granted";
    let chaos = plugin_path("chaos").unwrap();
    let report = kit(&chaos, settings(), NEEDS);
    let why = failure_of(&report, CHECK);
    assert!(
        why.contains("not granted: rewards_url") && why.contains("--config KEY=VALUE"),
        "{why}"
    );
    assert!(!report.passed());

    let granted = PluginSettings {
        config: std::sync::Arc::new(mqplug::wasm::ConfigValues::new(
            &[("rewards_url".to_string(), "http://127.0.0.1:1".to_string())]
                .into_iter()
                .collect(),
            Default::default(),
        )),
        ..settings()
    };
    let report = kit(&chaos, granted, NEEDS);
    assert!(report.passed(), "{}", report.table());
}

#[test]
fn an_http_request_to_an_origin_not_granted_is_named() {
    const CALLS: &str = r#"{"name": "calls rewards", "expect": "err", "event": {"event_type": "HTTP", "user_id": 1, "tenant_id": "t", "app_id": "a", "campaign_id": "c", "campaign_name": "n", "event_data": {"url": "http://127.0.0.1:9/grants"}, "timestamp": "2026-11-25T14:19:15+08:00"}}"#;
    let report = kit(&plugin_path("chaos").unwrap(), settings(), CALLS);
    let why = failure_of(&report, "reaches only the origins it is granted");
    assert!(
        why.contains("http://127.0.0.1:9") && why.contains("--allow-outbound ORIGIN"),
        "{why}"
    );
}

fn granter_fixtures() -> String {
    std::fs::read_to_string(workspace_root().join("plugins/reward-granter/fixtures.jsonl")).unwrap()
}

/// What the reward-granter's entry would grant, with the kit's fake origin.
fn granter_settings(topics: &[&str]) -> PluginSettings {
    use mqplug::topic::TopicName;
    use mqplug::wasm::{ConfigValues, Origin, OutboundGrants, PublishGrants};
    PluginSettings {
        config: Arc::new(ConfigValues::new(
            &[
                // Only what docs/plugins.md grants: dedupe_bucket is optional
                // (unset: dedupe off) and must not fail the kit.
                ("rewards_url".to_string(), "http://rewards.test".to_string()),
            ]
            .into_iter()
            .collect(),
            [("rewards_token".to_string(), "test-token".to_string())]
                .into_iter()
                .collect(),
        )),
        outbound: Arc::new(OutboundGrants::new(
            "reward-granter",
            vec![Origin::parse("http://rewards.test").unwrap()],
            Vec::new(),
            Default::default(),
            Default::default(),
        )),
        publish: Arc::new(PublishGrants::new(
            topics.iter().map(|t| TopicName::new(t).unwrap()).collect(),
        )),
        ..PluginSettings::new("reward-granter")
    }
}

fn assert_granter_passes_its_fixtures(path: &Path) {
    let report = kit(
        path,
        granter_settings(&["marketing.reward.granted"]),
        &granter_fixtures(),
    );
    assert!(report.passed(), "{}", report.table());
    let fixtures = checks(&report, Group::Fixtures);
    assert_eq!(
        fixtures.len(),
        fixtures::parse(&granter_fixtures()).len(),
        "{}",
        report.table()
    );
}

#[test]
fn the_reward_granter_passes_its_fixtures_with_http_and_publishing_virtualised() {
    assert_granter_passes_its_fixtures(&plugin_path("reward-granter").unwrap());
}

#[test]
fn the_python_reward_granter_passes_the_same_fixtures() {
    assert_granter_passes_its_fixtures(&guest_granter_path(Guest::Python).unwrap());
}

#[test]
fn the_javascript_reward_granter_passes_the_same_fixtures() {
    assert_granter_passes_its_fixtures(&guest_granter_path(Guest::JavaScript).unwrap());
}

#[test]
fn the_go_reward_granter_passes_the_same_fixtures() {
    assert_granter_passes_its_fixtures(&guest_granter_path(Guest::Go).unwrap());
}

#[test]
fn a_refused_request_fails_the_same_way_every_time_in_every_language() {
    // The origin is not granted: the host refuses every request. Writing the
    // body then fails too, sometimes first; the SDKs report the response's
    // error (the refusal) either way, so the kit's determinism checks pass.
    let refused = || {
        let settings = granter_settings(&["marketing.reward.granted"]);
        PluginSettings {
            outbound: Arc::new(mqplug::wasm::OutboundGrants::none("reward-granter")),
            ..settings
        }
    };
    for path in [
        plugin_path("reward-granter").unwrap(),
        guest_granter_path(Guest::Python).unwrap(),
        guest_granter_path(Guest::JavaScript).unwrap(),
        guest_granter_path(Guest::Go).unwrap(),
    ] {
        let report = kit(&path, refused(), "");
        let determinism = checks(&report, Group::Determinism);
        assert!(
            determinism
                .iter()
                .all(|(_, status)| **status == Status::Pass),
            "{}: {}",
            path.display(),
            report.table()
        );
        assert!(
            checks(&report, Group::Suite)
                .iter()
                .all(|(_, status)| **status == Status::Pass),
            "{}",
            report.table()
        );
        let why = failure_of(&report, "reaches only the origins it is granted");
        assert!(why.contains("http://rewards.test"), "{why}");
    }
}

#[test]
fn a_wrong_request_a_wrong_message_and_a_missing_topic_grant_are_named() {
    let granter = plugin_path("reward-granter").unwrap();
    let first = granter_fixtures()
        .lines()
        .find(|line| line.starts_with("{\"name\""))
        .unwrap()
        .to_string();

    // The fixture wants another idempotency key and another tag.
    let wrong = first
        .replacen(
            r#""idempotency-key": "7F000001000000000000000000000001""#,
            r#""idempotency-key": "another-key""#,
            1,
        )
        .replacen(
            r#""tag": "REWARD_GRANTED""#,
            r#""tag": "REWARD_REVOKED""#,
            1,
        );
    let report = kit(
        &granter,
        granter_settings(&["marketing.reward.granted"]),
        &wrong,
    );
    let why = failure_of(&report, "line 1: grants 10 points and announces the grant");
    assert!(
        why.contains(
            "expected header idempotency-key: another-key, got 7F000001000000000000000000000001"
        ),
        "{why}"
    );
    assert!(
        why.contains("expected tag Some(\"REWARD_REVOKED\")"),
        "{why}"
    );

    // No answer for the request the handler makes: it sees an error, and
    // the fixture expecting ok fails.
    let unanswered = first.replacen(
        "http://rewards.test/grants\", \"status\"",
        "http://rewards.test/other\", \"status\"",
        1,
    );
    let report = kit(
        &granter,
        granter_settings(&["marketing.reward.granted"]),
        &unanswered,
    );
    let why = failure_of(&report, "line 1: grants 10 points and announces the grant");
    assert!(
        why.contains("the fixture has no answer for POST http://rewards.test/grants"),
        "{why}"
    );

    // Without the topic grant, publishing fails and the grant is named.
    let report = kit(&granter, granter_settings(&[]), &first);
    let why = failure_of(&report, "publishes only to the topics it is granted");
    assert!(
        why.contains("marketing.reward.granted") && why.contains("--allow-topic TOPIC"),
        "{why}"
    );
}

#[test]
fn a_long_secret_is_redacted_whole_from_the_kits_failures() {
    // Longer than the 256 bytes a failure text keeps of a value: redacted
    // before it is cut, or a cut copy would no longer match.
    let token = "tok".repeat(120);
    let settings = granter_settings(&["marketing.reward.granted"]);
    let settings = PluginSettings {
        config: Arc::new(mqplug::wasm::ConfigValues::new(
            &[
                // Only what docs/plugins.md grants: dedupe_bucket is optional
                // (unset: dedupe off) and must not fail the kit.
                ("rewards_url".to_string(), "http://rewards.test".to_string()),
            ]
            .into_iter()
            .collect(),
            [("rewards_token".to_string(), token.clone())]
                .into_iter()
                .collect(),
        )),
        ..settings
    };
    let first = granter_fixtures()
        .lines()
        .find(|line| line.starts_with("{\"name\""))
        .unwrap()
        .to_string();
    let report = kit(&plugin_path("reward-granter").unwrap(), settings, &first);
    let why = failure_of(&report, "line 1: grants 10 points and announces the grant");
    assert!(why.contains("expected header authorization"), "{why}");
    assert!(!why.contains(&token[..30]), "{why}");
}
