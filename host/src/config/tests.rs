//! The config file's tests: parsing, defaults, validation, the example.

use super::*;
use crate::store::check_bucket_name;
use crate::wasm::InstanceMode;

/// The keys `examples/mqplug.toml` shows, set or commented out: each
/// `key = ...` line under its `[section]` (or `[[section]]`), and each
/// section header itself.
fn keys_shown(example: &str) -> std::collections::BTreeSet<String> {
    let mut shown = std::collections::BTreeSet::new();
    let mut section = String::new();
    for line in example.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[');
            if let Some(end) = name.find(']') {
                section = name[..end].trim().to_string();
                shown.insert(section.clone());
            }
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                let path = if section.is_empty() {
                    key.to_string()
                } else {
                    format!("{section}.{key}")
                };
                // `{ env = ... }`: the table's own keys are its to say.
                if value.trim_start().starts_with('{') {
                    shown.insert(format!("{path}.*"));
                }
                shown.insert(path);
            }
        }
    }
    shown
}

#[test]
fn the_example_config_shows_every_key_a_config_may_hold() {
    let keys = keys::keys_of::<HostConfig>();
    // The walk found the sections and what is inside them.
    for key in [
        "name_server",
        "plugin.name",
        "plugin.key_value.buckets",
        "store.backend",
    ] {
        assert!(keys.contains(key), "{key} not found in {keys:?}");
    }
    let example = include_str!("../../../examples/mqplug.toml");
    let shown = keys_shown(example);
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| {
            !shown.contains(*key)
                && !key
                    .rsplit_once('.')
                    .is_some_and(|(table, _)| shown.contains(&format!("{table}.*")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "examples/mqplug.toml does not show {missing:?} (it says it lists every key)"
    );
}

#[test]
fn the_example_config_parses_with_every_key_at_its_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mqplug.toml");
    let example = HostConfig::from_file(&path).unwrap();
    example.validate().unwrap();
    let defaults = HostConfig::default();
    assert_eq!(example.name_server, defaults.name_server);
    assert_eq!(
        example.runtime.compile_cache,
        defaults.runtime.compile_cache
    );
    assert_eq!(example.reload.poll_ms, defaults.reload.poll_ms);
    assert_eq!(example.reload.settle_ms, defaults.reload.settle_ms);
    assert_eq!(example.admin.listen, defaults.admin.listen);
    let plugin = &example.plugins[0];
    let default_plugin = PluginConfig::new(&plugin.name, &plugin.path);
    assert_eq!(plugin, &default_plugin);
}

fn parse(text: &str) -> Result<HostConfig, toml::de::Error> {
    toml::from_str(text)
}

#[test]
fn an_empty_file_gives_the_platform_defaults() {
    let config = parse("").unwrap();
    assert_eq!(config.name_server, "127.0.0.1:9876");
    assert_eq!(config.topic().unwrap().wire(), "marketing_task_completed");
    assert!(!config.producer.enabled);
    assert_eq!(config.producer.group, "marketing-producer-group");
    assert_eq!(config.producer.retries, 2);
    assert_eq!(config.on_undecodable, UndecodablePolicy::Retry);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let err = parse("name_servr = 'x'").unwrap_err().to_string();
    assert!(err.contains("unknown field `name_servr`"), "{err}");
    let err = parse("[[plugin]]\nname='a'\npath='a.wasm'\nconcurency=2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `concurency`"), "{err}");
    let err = parse("[producer]\nenable = true").unwrap_err().to_string();
    assert!(err.contains("unknown field `enable`"), "{err}");
}

#[test]
fn prefetch_is_bounded_and_reaches_the_consumer() {
    let with = |prefetch: &str| {
        parse(&format!(
            "[[plugin]]\nname = 'a'\npath = 'a.wasm'\nprefetch = {prefetch}\n"
        ))
        .unwrap()
    };
    let config = with("64");
    config.validate().unwrap();
    let topic = TopicName::new("t").unwrap();
    assert_eq!(
        config.plugins[0].consumer_settings("ns", &topic).prefetch,
        Some(64)
    );
    for bad in ["0", &(MAX_PREFETCH + 1).to_string()] {
        let err = with(bad).validate().unwrap_err().to_string();
        assert!(
            err.contains(&format!("prefetch = {bad} must be between 1 and 6553500")),
            "{err}"
        );
    }
    let unset = PluginConfig::new("a", "a.wasm");
    assert_eq!(unset.consumer_settings("ns", &topic).prefetch, None);
}

#[test]
fn the_plugins_concurrency_must_fit_in_the_instance_pool() {
    let config = parse(
        "[runtime]\nmax_instances = 10\n\
         [[plugin]]\nname = 'a'\npath = 'a.wasm'\nconcurrency = 4\n\
         [[plugin]]\nname = 'b'\npath = 'b.wasm'\nconcurrency = 4\n",
    )
    .unwrap();
    config.validate().unwrap();
    let mut config = config;
    config.plugins[1].concurrency = 5;
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("need 11 instances") && err.contains("runtime.max_instances = 10"),
        "{err}"
    );
}

#[test]
fn stdio_is_granted_only_by_the_plugins_own_config() {
    let config = parse(
        "[[plugin]]\nname = 'loud'\npath = 'l.wasm'\ninherit_stdio = true\n\
         [[plugin]]\nname = 'quiet'\npath = 'q.wasm'\n",
    )
    .unwrap();
    let grants: Vec<bool> = config.plugins.iter().map(|p| p.inherit_stdio).collect();
    assert_eq!(grants, [true, false]);
}

#[test]
fn plugins_get_their_own_group_by_default() {
    let config = parse(
        "[[plugin]]\nname = 'reward logger'\npath = 'r.wasm'\n\
         [[plugin]]\nname = 'audit'\npath = 'a.wasm'\ngroup = 'audit-team'\ninstance_mode = 'fresh-per-event'",
    )
    .unwrap();
    config.validate().unwrap();
    assert_eq!(config.plugins[0].group(), "mqplug-reward-logger");
    assert_eq!(config.plugins[1].group(), "audit-team");
    assert_eq!(config.plugins[1].instance_mode, InstanceMode::FreshPerEvent);
}

#[test]
fn validation_names_the_plugin_and_the_problem() {
    let config = parse("[[plugin]]\nname='slow'\npath='s.wasm'\ndeadline_ms=60000").unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.starts_with("plugin slow: deadline_ms = 60000"), "{err}");
    let config = parse("[[plugin]]\nname='a'\npath='a'\n[[plugin]]\nname='a'\npath='b'").unwrap();
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("used by another")
    );
    let config = parse("topic = 'marketing task'").unwrap();
    assert!(config.validate().is_err());
}

#[test]
fn names_that_map_to_one_consumer_group_are_refused() {
    let config =
        parse("[[plugin]]\nname='a.b'\npath='a'\n[[plugin]]\nname='a-b'\npath='b'").unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.starts_with("plugin a-b: consumer group \"mqplug-a-b\" is also plugin \"a.b\"'s"),
        "{err}"
    );
    let config = parse(
        "[[plugin]]\nname='a'\npath='a'\ngroup='team'\n[[plugin]]\nname='b'\npath='b'\ngroup='team'",
    )
    .unwrap();
    assert!(config.validate().is_err(), "an explicit group collides too");
}

#[test]
fn a_plugin_list_that_outgrows_the_running_pools_is_refused_with_the_reason() {
    let config = parse(
        "[[plugin]]\nname='a'\npath='a'\nconcurrency=8\n[[plugin]]\nname='b'\npath='b'\nconcurrency=8",
    )
    .unwrap();
    config.fits_pools(16, 18).unwrap();
    let threads = config.fits_pools(15, 256).unwrap_err().to_string();
    assert!(
        threads.contains("16 listener threads, over the 15"),
        "{threads}"
    );
    let instances = config.fits_pools(64, 17).unwrap_err().to_string();
    assert!(
        instances.contains("18 instances at once, over the 17"),
        "{instances}"
    );
}

#[test]
fn a_deadline_keeps_two_seconds_below_the_listener_timeout() {
    let deadline = |ms: u64| {
        parse(&format!("[[plugin]]\nname='p'\npath='p'\ndeadline_ms={ms}"))
            .unwrap()
            .validate()
    };
    deadline(MAX_DEADLINE_MS).unwrap();
    for ms in [0, MAX_DEADLINE_MS + 1, LISTENER_TIMEOUT_MS - 1] {
        let err = deadline(ms).unwrap_err().to_string();
        assert!(err.contains("must be between 1 and 28000"), "{ms}: {err}");
    }
}

#[test]
fn a_dedupe_lease_must_outlast_the_deadline() {
    let lease = |lease: &str| {
        parse(&format!(
            "[[plugin]]\nname='p'\npath='p'\ndeadline_ms=5000\n\
             [plugin.config]\ndedupe_lease_ms='{lease}'"
        ))
        .unwrap()
        .validate()
    };
    lease("5001").unwrap();
    for short in ["5000", "1000"] {
        let err = lease(short).unwrap_err().to_string();
        assert!(
            err.contains("must be above deadline_ms = 5000"),
            "{short}: {err}"
        );
    }
    let err = lease("a minute").unwrap_err().to_string();
    assert!(err.contains("not a whole number"), "{err}");
}

#[test]
fn config_values_and_secret_sources_parse_and_relative_secret_files_follow_the_config() {
    let text = "[[plugin]]\nname = 'r'\npath = 'r.wasm'\n\
        [plugin.config]\nrewards_url = 'http://127.0.0.1:8080'\n\
        [plugin.secrets]\ntoken = { env = 'REWARDS_TOKEN' }\nkey = { file = 'secrets/key' }\n";
    let config = HostConfig::from_text(text, Path::new("/etc/mqplug/mqplug.toml")).unwrap();
    config.validate().unwrap();
    let plugin = &config.plugins[0];
    assert_eq!(plugin.config["rewards_url"], "http://127.0.0.1:8080");
    assert_eq!(
        plugin.secrets["token"].env.as_deref(),
        Some("REWARDS_TOKEN")
    );
    assert_eq!(
        plugin.secrets["key"].file.as_deref(),
        Some(Path::new("/etc/mqplug/secrets/key"))
    );
}

#[test]
fn an_empty_secret_names_where_it_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let source = SecretSource {
        env: None,
        file: Some(empty.clone()),
    };
    assert_eq!(
        source.read().unwrap_err(),
        format!("file {} is empty", empty.display())
    );
}

#[test]
fn a_secret_with_two_sources_or_none_and_a_key_in_both_tables_are_refused() {
    let refused = [
        (
            "[plugin.secrets]\nt = { env = 'A', file = 'b' }\n",
            "exactly one of `env` or `file`",
        ),
        (
            "[plugin.secrets]\nt = {}\n",
            "exactly one of `env` or `file`",
        ),
        (
            "[plugin.config]\nt = 'x'\n[plugin.secrets]\nt = { env = 'A' }\n",
            "both a config value and a secret",
        ),
        ("[plugin.config]\n'' = 'x'\n", "must be 1 to 256 bytes"),
    ];
    for (tables, why) in refused {
        let text = format!("[[plugin]]\nname = 'r'\npath = 'r.wasm'\n{tables}");
        let config = HostConfig::from_text(&text, Path::new("/m.toml")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(why), "{tables}: {err}");
    }
    let err = parse("[[plugin]]\nname = 'r'\npath = 'r.wasm'\n[plugin.secrets]\nt = 'inline'\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected where to read the secret: { env = \"VARIABLE\" } or { file"),
        "a secret's value is never in the file: {err}"
    );
}

#[test]
fn publishing_needs_the_producer_and_valid_topic_names() {
    let entry = |topics: &str, producer: bool| {
        format!(
            "[producer]\nenabled = {producer}\n[[plugin]]\nname = 'r'\npath = 'r.wasm'\n\
             allowed_topics = [{topics}]\n"
        )
    };
    let check = |text: String| {
        HostConfig::from_text(&text, Path::new("/m.toml"))
            .unwrap()
            .validate()
            .map_err(|err| err.to_string())
    };
    check(entry("'marketing.reward.granted'", true)).unwrap();
    let err = check(entry("'marketing.reward.granted'", false)).unwrap_err();
    assert!(err.contains("needs the built-in producer"), "{err}");
    let err = check(entry("'bad topic!'", true)).unwrap_err();
    assert!(err.contains("allowed_topics"), "{err}");
    // RocketMQ's own topics and the one the host consumes.
    for (topic, why) in [
        ("'%DLQ%mqplug-rewards'", "dead-letter queue"),
        ("'%RETRY%mqplug-rewards'", "retry topic"),
        ("'SCHEDULE_TOPIC_XXXX'", "system topics"),
        ("'rmq_sys_wheel_timer'", "system topics"),
        ("'marketing_task_completed'", "the topic this host consumes"),
        ("'marketing.task.completed'", "the topic this host consumes"),
    ] {
        let err = check(entry(topic, true)).unwrap_err();
        assert!(err.contains(why), "{topic}: {err}");
    }
}

#[test]
fn key_value_grants_and_the_store_are_checked_naming_what_is_wrong() {
    let check = |store: &str, plugin: &str| {
        let text = format!(
            "{store}\n[[plugin]]\nname = {plugin}\npath = 'p.wasm'\n\
             [plugin.key_value]\nbuckets = ['seen']\n"
        );
        let config = parse(&text).map_err(|err| err.to_string())?;
        config.validate().map_err(|err| err.to_string())?;
        Ok::<_, String>(config)
    };
    let config = check("", "'granter'").unwrap();
    assert!(matches!(
        config.store.settings(),
        Ok(StoreSettings::Embedded { .. })
    ));
    let err = check("", "'a:b'").unwrap_err();
    assert!(err.contains("a name a store can keep apart"), "{err}");
    let err = check("[store]\nbackend = 'redis'", "'g'").unwrap_err();
    assert!(err.contains("needs store.url"), "{err}");
    let err = check("[store]\nbackend = 'redis'\nurl = 'http://x'", "'g'").unwrap_err();
    assert!(err.contains("redis://"), "{err}");
    // The error is shown on /plugins and the status page: never the
    // URL's password.
    let err = check(
        "[store]\nbackend = 'redis'\nurl = 'rediss://admin:pa55word@cache:6380/0'",
        "'g'",
    )
    .unwrap_err();
    assert!(err.contains("rediss://***@cache:6380/0"), "{err}");
    assert!(!err.contains("pa55word"), "{err}");
    let err = check(
        "[store]\nbackend = 'redis'\nurl = 'redis://x'\ntimeout_ms = 0",
        "'g'",
    )
    .unwrap_err();
    assert!(err.contains("timeout_ms = 0"), "{err}");
    let bad_bucket =
        parse("[[plugin]]\nname = 'g'\npath = 'p.wasm'\n[plugin.key_value]\nbuckets = ['a b']\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
    assert!(
        bad_bucket.contains("not allowed in a bucket name"),
        "{bad_bucket}"
    );
    let too_big = parse(
        "[[plugin]]\nname = 'g'\npath = 'p.wasm'\n[plugin.key_value]\nbuckets = ['a']\n\
         max_value_bytes = 99999999\n",
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(too_big.contains("key_value.max_value_bytes"), "{too_big}");
    // A relative store path is relative to the config file.
    let config = HostConfig::from_text(
        "[store]\npath = 'state/s.redb'\n",
        Path::new("/etc/mqplug/mqplug.toml"),
    )
    .unwrap();
    assert_eq!(
        config.store.settings(),
        Ok(StoreSettings::Embedded {
            path: PathBuf::from("/etc/mqplug/state/s.redb")
        })
    );
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// A config with every section, the base of the near misses.
    const FULL: &str = "name_server = \"127.0.0.1:9876;127.0.0.2:9876\"\n\
        topic = \"marketing.task.completed\"\non_undecodable = \"drop\"\n\
        max_body_bytes = 1048576\n[runtime]\nmax_instances = 64\nmax_memory_mb = 128\n\
        fuel = true\ncache_max_mb = 64\n[admin]\nlisten = \"127.0.0.1:0\"\n\
        max_connections = 8\n[reload]\npoll_ms = 50\nsettle_ms = 300\n\
        [producer]\nenabled = true\nretries = 2\nsend_timeout_ms = 3000\n\
        [store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nprefix = \"mq\"\n\
        timeout_ms = 500\n\
        [[plugin]]\nname = \"rewards\"\npath = \"rewards.wasm\"\n\
        tags = \"USER_REGISTER || INVITE_FRIEND\"\nconcurrency = 4\n\
        max_reconsume_times = 3\ninstance_mode = \"fresh-per-event\"\ndeadline_ms = 2000\n\
        memory_limit_mb = 32\nlog_lines_per_second = 10\nfuel_per_event = 1000000\n\
        [plugin.key_value]\nbuckets = [\"seen\"]\nmax_value_bytes = 1024\nmax_total_mb = 8\n\
        [[plugin]]\nname = \"a.b\"\npath = \"/abs/a.wasm\"\ngroup = \"g-1\"\n";

    #[test]
    fn the_base_of_the_near_misses_is_valid() {
        let config = HostConfig::from_text(FULL, Path::new("/etc/mqplug/mqplug.toml")).unwrap();
        config.validate().unwrap();
        assert_eq!(config.plugins.len(), 2);
        assert_eq!(
            config.plugins[0].path,
            Path::new("/etc/mqplug/rewards.wasm")
        );
    }

    /// Everything a host does with a config before it connects anywhere.
    fn exercise(text: &str) {
        let Ok(config) = HostConfig::from_text(text, Path::new("/etc/mqplug/mqplug.toml")) else {
            return;
        };
        if config.validate().is_err() {
            return;
        }
        let _ = config.runtime_settings();
        let _ = config.fits_pools(usize::MAX, u32::MAX);
        let topic = config.topic().expect("validated");
        for plugin in &config.plugins {
            let _ = plugin.plugin_settings();
            let _ = plugin.consumer_settings(&config.name_server, &topic);
            // What validation promises.
            assert!((1..=MAX_DEADLINE_MS).contains(&plugin.deadline_ms));
            assert!(check_resource_name(&plugin.group()).is_ok());
            if let Some(key_value) = &plugin.key_value {
                assert!(
                    key_value
                        .buckets
                        .iter()
                        .all(|b| check_bucket_name(b).is_ok())
                );
                assert!(check_bucket_name(&plugin.name).is_ok());
                assert!(config.store.settings().is_ok());
            }
        }
    }

    /// A value of any TOML type, including the edges of the integers.
    fn arb_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            prop_oneof![
                Just(0i128),
                Just(-1),
                Just(u32::MAX as i128 + 1),
                Just(i64::MAX as i128)
            ]
            .prop_map(|n| n.to_string()),
            "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("[]".to_string()),
        ]
    }

    const KEYS: &[&str] = &[
        "name",
        "path",
        "group",
        "tags",
        "concurrency",
        "batch",
        "max_reconsume_times",
        "prefetch",
        "instance_mode",
        "deadline_ms",
        "memory_limit_mb",
        "log_lines_per_second",
        "log_bytes_per_second",
        "consume_from",
        "fuel_per_event",
        "inherit_stdio",
    ];

    const KV_KEYS: &[&str] = &["max_key_bytes", "max_value_bytes", "max_total_mb"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            exercise(&text);
        }

        #[test]
        fn near_misses_of_a_full_config_never_panic(
            position in any::<usize>(), byte in any::<u8>(), cut in any::<bool>(),
        ) {
            exercise(&String::from_utf8_lossy(&crate::mutated(FULL.as_bytes(), position, byte, cut)));
        }

        #[test]
        fn any_value_for_any_plugin_key_is_validated_without_panicking(
            values in proptest::collection::vec((0..KEYS.len(), arb_value()), 0..8),
        ) {
            let mut text = String::from("[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\n");
            let mut seen = std::collections::HashSet::new();
            for (key, value) in values {
                if KEYS[key] != "name" && KEYS[key] != "path" && seen.insert(key) {
                    text.push_str(&format!("{} = {value}\n", KEYS[key]));
                }
            }
            exercise(&text);
        }

        #[test]
        fn any_key_value_grant_is_validated_without_panicking(
            bucket in "[ -~]{0,70}",
            name in "[ -~]{1,20}",
            values in proptest::collection::vec((0..KV_KEYS.len(), arb_value()), 0..4),
        ) {
            let mut text = format!(
                "[store]\npath = \"s.redb\"\n[[plugin]]\nname = {name:?}\npath = \"p.wasm\"\n\
                 [plugin.key_value]\nbuckets = [{bucket:?}]\n"
            );
            let mut seen = std::collections::HashSet::new();
            for (key, value) in values {
                if seen.insert(key) {
                    text.push_str(&format!("{} = {value}\n", KV_KEYS[key]));
                }
            }
            exercise(&text);
        }
    }
}

#[test]
fn a_batch_must_fit_the_listener_timeout_and_keeps_follow_ups_out() {
    let config =
        parse("[[plugin]]\nname = 'a'\npath = 'a.wasm'\nbatch = 16\ndeadline_ms = 1750\n").unwrap();
    config.validate().unwrap();
    let topic = TopicName::new("t").unwrap();
    assert_eq!(config.plugins[0].consumer_settings("ns", &topic).batch, 16);
    assert_eq!(
        parse("[[plugin]]\nname = 'a'\npath = 'a.wasm'\n")
            .unwrap()
            .plugins[0]
            .batch,
        1,
        "one message a listener call unless asked"
    );

    let mut config = config;
    config.plugins[0].deadline_ms = 1751;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("batch = 16 with deadline_ms = 1751"), "{err}");

    config.plugins[0].deadline_ms = 1000;
    config.plugins[0].batch = 33;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("batch must be between 1 and 32"), "{err}");

    config.plugins[0].batch = 2;
    config.producer.enabled = true;
    config.plugins[0].allowed_topics = vec!["marketing.reward.granted".into()];
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("batch > 1 with allowed_topics"), "{err}");
}
