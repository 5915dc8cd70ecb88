//! `mqplug test`: the conformance kit on a plugin file, no broker.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::{key_value, plugin_name};
use crate::conformance;
use crate::observe::Observers;
use crate::topic::TopicName;
use crate::wasm::{
    ConfigValues, KeyValueGrants, KeyValueLimits, Origin, OutboundGrants, OutboundLimits,
    PluginSettings, PublishGrants, RuntimeSettings, WasmRuntime,
};

#[derive(Args)]
pub struct TestArgs {
    /// The plugin component (.wasm).
    pub plugin: PathBuf,
    /// Your fixtures: JSON Lines of {"event": {...}, "expect": "ok"|"err",
    /// "reason": REGEX, "delivery": {...}, "name": TEXT}.
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Also write the results as JUnit XML here.
    #[arg(long)]
    pub junit: Option<PathBuf>,
    /// Handler deadline in milliseconds, as in the plugin's config.
    #[arg(long, default_value_t = 5000)]
    pub deadline_ms: u64,
    /// Linear memory limit in MiB, as in the plugin's config.
    #[arg(long, default_value_t = 64)]
    pub memory_limit_mib: usize,
    /// A config value the plugin reads through wasi:config/store, as in its
    /// `[plugin.config]`; repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = key_value)]
    pub config: Vec<(String, String)>,
    /// A secret the plugin reads through wasi:config/store (a test value;
    /// redacted from its log lines like a real one); repeatable.
    #[arg(long = "secret", value_name = "KEY=VALUE", value_parser = key_value)]
    pub secrets: Vec<(String, String)>,
    /// An origin the plugin may send HTTP requests to, as in its
    /// `allowed_outbound_hosts` (`http://127.0.0.1:8080`); repeatable. The
    /// requests really go out, unless the fixtures answer them (`http`).
    #[arg(long = "allow-outbound", value_name = "ORIGIN")]
    pub allow_outbound: Vec<String>,
    /// A topic the plugin may publish follow-up messages to, as in its
    /// `allowed_topics`; repeatable. Nothing is sent: fixtures check the
    /// messages (`published`).
    #[arg(long = "allow-topic", value_name = "TOPIC")]
    pub allow_topics: Vec<String>,
    /// A bucket the plugin may open through wasi:keyvalue, as in its
    /// `key_value.buckets`; repeatable. The kit keeps it in memory, empty
    /// before every event; fixtures preset and check keys (`kv`,
    /// `expect_kv`).
    #[arg(long = "bucket", value_name = "NAME")]
    pub buckets: Vec<String>,
}

pub fn conformance_test(args: TestArgs) -> Result<std::process::ExitCode> {
    let text = match &args.fixtures {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read fixtures {}", path.display()))?,
        None => String::new(),
    };
    let fixtures = conformance::fixtures::parse(&text);
    // The fixture file's grants, then the flags on top.
    let mut grants = conformance::fixtures::grants(&text)
        .map_err(|err| anyhow::anyhow!("fixtures, {}: {}", err.name, err.reason))?
        .unwrap_or_default();
    // Origins a fixture file grants are answered by its fixtures, never
    // reached: a file cannot open the network (or an internal address) to
    // the plugin it tests. Only --allow-outbound does.
    let virtual_http = !grants.allowed_outbound_hosts.is_empty();
    grants.config.extend(args.config);
    grants.secrets.extend(args.secrets);
    grants.allowed_outbound_hosts.extend(args.allow_outbound);
    grants.allowed_topics.extend(args.allow_topics);
    let mut buckets = grants.key_value.take().unwrap_or_default().buckets;
    buckets.extend(args.buckets);
    for bucket in &buckets {
        crate::store::check_bucket_name(bucket)
            .map_err(|why| anyhow::anyhow!("bucket {bucket:?}: {why}"))?;
    }
    let runtime = WasmRuntime::new(RuntimeSettings::default())
        .map_err(|err| anyhow::anyhow!("cannot start the wasm engine: {err:#}"))?;
    let settings = PluginSettings {
        deadline: Duration::from_millis(args.deadline_ms),
        memory_limit_bytes: args.memory_limit_mib.saturating_mul(1024 * 1024),
        config: Arc::new(ConfigValues::new(&grants.config, grants.secrets)),
        outbound: Arc::new(OutboundGrants::new(
            &plugin_name(&args.plugin),
            grants
                .allowed_outbound_hosts
                .iter()
                .map(|origin| Origin::parse(origin).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?,
            Vec::new(),
            OutboundLimits::default(),
            Observers::default(),
        )),
        publish: Arc::new(PublishGrants::new(
            grants
                .allowed_topics
                .iter()
                .map(|topic| TopicName::new(topic).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?,
        )),
        key_value: Arc::new(KeyValueGrants::new(buckets, KeyValueLimits::default())),
        ..PluginSettings::new(plugin_name(&args.plugin))
    };
    let report = conformance::run_with(&runtime, settings, &args.plugin, &fixtures, virtual_http)
        .with_context(|| format!("cannot read {}", args.plugin.display()))?;
    print!("{}", report.table());
    if let Some(path) = &args.junit {
        std::fs::write(path, report.junit())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
