//! The conformance kit behind `mqplug test`: proves, without a broker, that a
//! component honours mqplug's contract before it is deployed.
//!
//! It checks, in order: the file is a component; it exports the handler of a
//! contract version this host supports; it imports only what the host
//! provides; it links and instantiates within the limits; it survives the
//! built-in events at every field's edges; it answers the same event the same
//! way twice; and it gives the author's fixtures their expected outcomes.
//! Nothing here panics on a bad plugin: every fault is a failed check.

pub mod fixtures;
pub mod report;
pub mod suite;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use crate::delivery::Delivery;
use crate::event::TaskEvent;
use crate::outcome::{Disposition, HandlerOutcome};
use crate::store::{Backend, Embedded, Namespace, StoreError, Write};
use crate::text::inert;
use crate::wasm::{CannedResponse, OutgoingMessage, Responder, SentRequest};
use crate::wasm::{Plugin, PluginSettings, WasmRuntime};
use fixtures::{
    ErrKind, Expect, ExpectedMessage, ExpectedRequest, Fixture, FixtureError, HttpAnswer,
};
pub use report::{Check, Group, Report, Status};

/// The contract this host implements: `mqplug:plugin@0.2.x` and `@0.1.x`.
pub const CONTRACT_PACKAGE: &str = "mqplug:plugin";
pub use crate::wasm::CONTRACT_VERSIONS;
const HANDLER_INTERFACE: &str = "mqplug:plugin/handler";
/// The versions, for messages: "0.2.x and 0.1.x".
const SUPPORTED: &str = "0.2.x and 0.1.x";
/// The standard WASI interfaces a plugin's grants serve, exactly as linked.
const CAPABILITIES: [(&str, &str); 1] = [(
    "wasi:config/store@0.2.0-rc.1",
    "the plugin's config and secrets",
)];

/// How a component's import is served by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportKind {
    /// A host service of the contract (`mqplug:plugin/log`).
    Contract,
    /// A WASI 0.2 interface: linked, but it grants nothing (no files,
    /// network, environment, arguments or stdio).
    WasiGrantingNothing,
    /// A standard WASI interface that serves what the plugin's config entry
    /// grants (its config and secrets); the text says what.
    Capability(&'static str),
    /// Not provided: the plugin cannot be linked. The text says why.
    Denied(String),
}

/// Classifies one import by name (`namespace:package/interface@version`).
pub fn classify_import(name: &str) -> ImportKind {
    let (path, version) = name.split_once('@').unwrap_or((name, ""));
    let major_minor = parse_major_minor(version);
    if let Some(interface) = path.strip_prefix("mqplug:plugin/") {
        if !major_minor.is_some_and(|v| CONTRACT_VERSIONS.contains(&v)) {
            return ImportKind::Denied(format!(
                "contract version {version} is not {SUPPORTED}: rebuild against this host's wit/plugin.wit"
            ));
        }
        return match interface {
            "log" | "types" => ImportKind::Contract,
            "publish" | "dedupe" if major_minor == Some((0, 2)) => ImportKind::Contract,
            _ => ImportKind::Denied(format!(
                "the contract has no interface `{interface}` to import"
            )),
        };
    }
    if let Some((_, what)) = CAPABILITIES.iter().find(|(linked, _)| *linked == name) {
        return ImportKind::Capability(what);
    }
    if matches!(path, "wasi:keyvalue/store" | "wasi:keyvalue/atomics") && version == "0.2.0-draft" {
        return ImportKind::Capability("the buckets its entry grants (key_value)");
    }
    if matches!(path, "wasi:http/outgoing-handler" | "wasi:http/types")
        && major_minor == Some((0, 2))
    {
        return ImportKind::Capability("outbound HTTP to the origins its entry grants");
    }
    const WASI: [&str; 6] = ["cli", "io", "clocks", "random", "filesystem", "sockets"];
    if let Some(rest) = path.strip_prefix("wasi:") {
        let package = rest.split('/').next().unwrap_or_default();
        if WASI.contains(&package) && major_minor == Some((0, 2)) {
            return ImportKind::WasiGrantingNothing;
        }
        if package == "http" {
            return ImportKind::Denied(
                "of wasi:http only outgoing-handler and types 0.2.x are provided (a plugin \
                 handles events, not HTTP requests); a JavaScript plugin must be built with the \
                 `fetch-event` feature disabled, as plugins/js/componentize.mjs does"
                    .into(),
            );
        }
        return ImportKind::Denied(format!(
            "the host provides WASI 0.2 cli, io, clocks, random, filesystem and sockets, \
             {}, wasi:http 0.2 and wasi:keyvalue/store and atomics 0.2.0-draft, not `{path}` \
             at {version}",
            CAPABILITIES.map(|(name, _)| name).join(", ")
        ));
    }
    ImportKind::Denied("mqplug provides no such interface".into())
}

fn parse_major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Runs the kit on one component file. Returns an error only when the kit
/// cannot run at all (the file cannot be read); every fault of the plugin is a
/// failed check in the report.
pub fn run(
    runtime: &Arc<WasmRuntime>,
    settings: PluginSettings,
    path: &Path,
    fixtures: &[Result<Fixture, FixtureError>],
) -> std::io::Result<Report> {
    run_with(runtime, settings, path, fixtures, false)
}

/// [`run`], answering every HTTP request from the fixtures when
/// `virtual_http` (as it does anyway when a fixture answers or expects
/// requests): the kit's CLI sets it when the fixture file itself grants
/// origins, so a file can never open the network to its plugin.
pub fn run_with(
    runtime: &Arc<WasmRuntime>,
    settings: PluginSettings,
    path: &Path,
    fixtures: &[Result<Fixture, FixtureError>],
    virtual_http: bool,
) -> std::io::Result<Report> {
    let wasm = std::fs::read(path)?;
    let http = (virtual_http || fixtures.iter().flatten().any(Fixture::virtualises_http))
        .then(|| Arc::new(FixtureHttp::default()));
    let mut settings = settings;
    if let Some(http) = &http {
        settings.outbound = Arc::new(settings.outbound.answered_by(http.clone()));
    }
    // The plugin's buckets live in the kit's own memory, emptied before
    // every event; nothing reaches the host's store.
    let state = (!settings.key_value.buckets().is_empty()).then(|| {
        let store: Arc<dyn Backend> = Arc::new(Embedded::in_memory());
        settings.key_value = Arc::new(settings.key_value.backed_by(store.clone()));
        KitState {
            store,
            plugin: settings.name.clone(),
            buckets: settings.key_value.buckets().iter().cloned().collect(),
        }
    });
    let mut kit = Kit {
        report: Report {
            plugin: path.display().to_string(),
            ..Report::default()
        },
        http,
        state,
    };
    match kit.contract(runtime, settings, &wasm) {
        Ok(plugin) => {
            kit.suite_and_determinism(&plugin);
            kit.fixtures(&plugin, fixtures);
            kit.grants(&plugin);
        }
        Err(why) => {
            let cases = suite::cases().len();
            let skipped = [
                (Group::Suite, format!("{cases} built-in events")),
                (Group::Determinism, format!("{cases} built-in events")),
                (Group::Fixtures, format!("{} fixtures", fixtures.len())),
            ];
            let runs_fixtures = !fixtures.is_empty();
            for (group, name) in skipped {
                if group == Group::Fixtures && !runs_fixtures {
                    continue;
                }
                kit.push(group, &name, Status::Skip(why.clone()), "", Duration::ZERO);
            }
        }
    }
    Ok(kit.report)
}

struct Kit {
    report: Report,
    /// Set when fixtures answer or check HTTP: then no request goes out.
    http: Option<Arc<FixtureHttp>>,
    /// The plugin's buckets, when its grants name some.
    state: Option<KitState>,
}

/// The kit's in-memory store and the plugin's buckets in it.
struct KitState {
    store: Arc<dyn Backend>,
    plugin: String,
    buckets: Vec<String>,
}

impl KitState {
    fn namespace(&self, bucket: &str) -> Namespace {
        Namespace::new(self.plugin.as_str(), bucket)
    }

    /// Empties every bucket, so each event starts from the same state.
    fn clear(&self) -> Result<(), StoreError> {
        for bucket in &self.buckets {
            let ns = self.namespace(bucket);
            loop {
                let (keys, _) = self.store.list_keys(&ns, None)?;
                if keys.is_empty() {
                    break;
                }
                for key in keys {
                    self.store.delete(&ns, &key)?;
                }
            }
        }
        Ok(())
    }

    /// Sets a fixture's `kv` keys; the error names what could not be set.
    fn preset(&self, keys: &[(String, String, Vec<u8>)]) -> Result<(), String> {
        for (bucket, key, value) in keys {
            if !self.buckets.contains(bucket) {
                return Err(not_granted(bucket));
            }
            self.store
                .write(
                    &self.namespace(bucket),
                    key,
                    value,
                    None,
                    Write::Set,
                    u64::MAX,
                )
                .map_err(|err| format!("kv: cannot set {bucket}/{key}: {err}"))?;
        }
        Ok(())
    }

    /// How the keys differ from a fixture's `expect_kv`.
    fn faults(
        &self,
        expected: &[(String, String, Option<Regex>)],
        shown: &dyn Fn(&str) -> String,
    ) -> Vec<String> {
        let mut faults = Vec::new();
        for (bucket, key, want) in expected {
            if !self.buckets.contains(bucket) {
                faults.push(not_granted(bucket));
                continue;
            }
            let got = match self.store.get(&self.namespace(bucket), key) {
                Ok(got) => got.map(|value| String::from_utf8_lossy(&value).into_owned()),
                Err(err) => {
                    faults.push(format!("kv {bucket}/{key}: {err}"));
                    continue;
                }
            };
            match (want, got) {
                (None, None) => {}
                (None, Some(got)) => faults.push(format!(
                    "kv {bucket}/{key}: expected absent, it holds {}",
                    shown(&got)
                )),
                (Some(want), None) => faults.push(format!(
                    "kv {bucket}/{key}: expected a value matching /{want}/, it is absent"
                )),
                (Some(want), Some(got)) if !want.is_match(&got) => faults.push(format!(
                    "kv {bucket}/{key}: expected a value matching /{want}/, it holds {}",
                    shown(&got)
                )),
                _ => {}
            }
        }
        faults
    }
}

/// A fixture uses buckets, and the plugin is granted none.
const NO_BUCKETS: &str = "kv: the plugin is granted no bucket; grant them in the grants line's \
                          key_value.buckets (here: --bucket NAME)";

fn not_granted(bucket: &str) -> String {
    format!(
        "kv: bucket {bucket:?} is not granted; grant it in the grants line's key_value.buckets \
         (here: --bucket {bucket})"
    )
}

impl Kit {
    fn push(
        &mut self,
        group: Group,
        name: &str,
        status: Status,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        self.report.checks.push(Check {
            group,
            name: name.to_string(),
            status,
            detail: detail.into(),
            duration,
        });
    }

    /// The contract checks. Returns the loaded plugin, or why the rest of the
    /// kit cannot run.
    fn contract(
        &mut self,
        runtime: &Arc<WasmRuntime>,
        settings: PluginSettings,
        wasm: &[u8],
    ) -> Result<Plugin, String> {
        let started = Instant::now();
        let component = match Component::new(&runtime.engine, wasm) {
            Ok(component) => component,
            Err(err) => {
                let why = format!("not a valid wasm component: {err:#}");
                self.push(
                    Group::Contract,
                    "is a wasm component",
                    Status::Fail(why),
                    "",
                    started.elapsed(),
                );
                return Err("the file is not a wasm component".into());
            }
        };
        let compiled_in = started.elapsed();
        self.push(
            Group::Contract,
            "is a wasm component",
            Status::Pass,
            format!(
                "{}, compiled in {} ms",
                report::Bytes(wasm.len()),
                compiled_in.as_millis()
            ),
            compiled_in,
        );

        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&runtime.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let exports_ok = self.check_exports(&exports);
        let imports: Vec<(String, bool)> = ty
            .imports(&runtime.engine)
            .map(|(name, item)| {
                (
                    name.to_string(),
                    matches!(item.ty, ComponentItem::ComponentInstance(_)),
                )
            })
            .collect();
        let imports_ok = self.check_imports(&imports);

        let started = Instant::now();
        let limits = format!(
            "memory limit {}, deadline {} ms",
            report::Bytes(settings.memory_limit_bytes),
            settings.deadline.as_millis()
        );
        match Plugin::from_component(runtime, settings, &component, Default::default()) {
            Ok(plugin) => {
                let memory = plugin.memory_at_instantiation();
                self.report.memory_at_instantiation = Some(memory);
                self.push(
                    Group::Contract,
                    "links and instantiates within its limits",
                    Status::Pass,
                    format!(
                        "memory at instantiation {} ({limits})",
                        report::Bytes(memory)
                    ),
                    started.elapsed(),
                );
                if exports_ok && imports_ok {
                    Ok(plugin)
                } else {
                    Err("the component does not match the contract".into())
                }
            }
            Err(err) => {
                self.push(
                    Group::Contract,
                    "links and instantiates within its limits",
                    Status::Fail(err.to_string()),
                    limits,
                    started.elapsed(),
                );
                Err("the plugin could not be instantiated".into())
            }
        }
    }

    fn check_exports(&mut self, exports: &[String]) -> bool {
        const NAME: &str = "exports mqplug:plugin/handler@0.2.x or 0.1.x";
        let handler = exports.iter().find(|name| {
            name.split_once('@')
                .is_some_and(|(path, _)| path == HANDLER_INTERFACE)
        });
        let status = match handler {
            Some(name) => {
                let version = name.split_once('@').map(|(_, v)| v).unwrap_or_default();
                if parse_major_minor(version).is_some_and(|v| CONTRACT_VERSIONS.contains(&v)) {
                    Status::Pass
                } else {
                    Status::Fail(format!(
                        "exports {name}, but this host supports {CONTRACT_PACKAGE} {SUPPORTED}: \
                         rebuild against this host's wit/plugin.wit"
                    ))
                }
            }
            None => Status::Fail(format!(
                "does not export {HANDLER_INTERFACE} {SUPPORTED} (exports: {}); build it against wit/plugin.wit's world `plugin`",
                if exports.is_empty() {
                    "nothing".to_string()
                } else {
                    exports.join(", ")
                }
            )),
        };
        let passed = status == Status::Pass;
        self.push(
            Group::Contract,
            NAME,
            status,
            handler.cloned().unwrap_or_default(),
            Duration::ZERO,
        );
        passed
    }

    fn check_imports(&mut self, imports: &[(String, bool)]) -> bool {
        let mut contract = Vec::new();
        let mut wasi = 0;
        let mut capabilities = Vec::new();
        let mut denied = Vec::new();
        for (name, is_instance) in imports {
            let kind = if *is_instance {
                classify_import(name)
            } else {
                ImportKind::Denied(
                    "only interfaces can be imported, not bare functions or types".into(),
                )
            };
            match kind {
                ImportKind::Contract => contract.push(name.as_str()),
                ImportKind::WasiGrantingNothing => wasi += 1,
                ImportKind::Capability(what) => capabilities.push(format!("{name} ({what})")),
                ImportKind::Denied(why) => denied.push(format!("{name}: {why}")),
            }
        }
        let mut detail = format!(
            "{}{}{wasi} WASI interfaces (granted nothing)",
            contract.join(", "),
            if contract.is_empty() { "" } else { " + " },
        );
        for capability in capabilities {
            detail.push_str(" + ");
            detail.push_str(&capability);
        }
        let status = if denied.is_empty() {
            Status::Pass
        } else {
            Status::Fail(format!(
                "imports what mqplug does not provide: {}",
                denied.join("; ")
            ))
        };
        let passed = status == Status::Pass;
        self.push(
            Group::Contract,
            "imports only what the host provides",
            status,
            detail,
            Duration::ZERO,
        );
        passed
    }

    fn call(
        &mut self,
        plugin: &Plugin,
        event: &TaskEvent,
        delivery: &Delivery,
    ) -> (HandlerOutcome, Duration) {
        let (outcome, _, elapsed) = self.call_with_outbox(plugin, event, delivery);
        (outcome, elapsed)
    }

    /// One event, with the follow-up messages it would publish; the
    /// plugin's buckets are emptied first (a fixture's `kv` is set after).
    fn call_with_outbox(
        &mut self,
        plugin: &Plugin,
        event: &TaskEvent,
        delivery: &Delivery,
    ) -> (HandlerOutcome, Vec<OutgoingMessage>, Duration) {
        self.prepare(&[])
            .expect("an in-memory store with nothing preset always empties");
        self.run_event(plugin, event, delivery)
    }

    /// Empties the plugin's buckets and sets `keys`.
    fn prepare(&self, keys: &[(String, String, Vec<u8>)]) -> Result<(), String> {
        match &self.state {
            Some(state) => {
                state
                    .clear()
                    .map_err(|err| format!("kv: cannot empty the buckets: {err}"))?;
                state.preset(keys)
            }
            None if keys.is_empty() => Ok(()),
            None => Err(NO_BUCKETS.into()),
        }
    }

    fn run_event(
        &mut self,
        plugin: &Plugin,
        event: &TaskEvent,
        delivery: &Delivery,
    ) -> (HandlerOutcome, Vec<OutgoingMessage>, Duration) {
        let started = Instant::now();
        let (outcome, outbox) = plugin.handle_with_outbox(event, delivery);
        let elapsed = started.elapsed();
        self.report.event_times.push(elapsed);
        (outcome, outbox, elapsed)
    }

    fn suite_and_determinism(&mut self, plugin: &Plugin) {
        for case in suite::cases() {
            let (first, elapsed) = self.call(plugin, &case.event, &case.delivery);
            let status = match &first {
                HandlerOutcome::Failed(failure) => Status::Fail(failure.to_string()),
                _ => Status::Pass,
            };
            self.push(Group::Suite, case.name, status, describe(&first), elapsed);

            if let HandlerOutcome::Failed(_) = first {
                self.push(
                    Group::Determinism,
                    case.name,
                    Status::Skip("the first run did not finish".into()),
                    "",
                    Duration::ZERO,
                );
                continue;
            }
            let (second, elapsed) = self.call(plugin, &case.event, &case.delivery);
            let status = if second == first {
                Status::Pass
            } else {
                Status::Fail(format!(
                    "not deterministic: the same event gave {} and then {}",
                    describe(&first),
                    describe(&second)
                ))
            };
            self.push(
                Group::Determinism,
                case.name,
                status,
                describe(&second),
                elapsed,
            );
        }
    }

    /// Whether every config key the plugin asked for while handling the
    /// events was granted (`--config`, `--secret`): a key it needs and its
    /// entry lacks is named here rather than found in production.
    fn grants(&mut self, plugin: &Plugin) {
        let missing = plugin.settings().config.missing();
        let (config, secrets) = plugin.settings().config.keys();
        let status = if missing.is_empty() {
            Status::Pass
        } else {
            Status::Fail(format!(
                "asked for config keys that are not granted: {}; grant them in the plugin's \
                 [plugin.config] or [plugin.secrets] (here: --config KEY=VALUE or --secret KEY=VALUE)",
                missing.join(", ")
            ))
        };
        self.push(
            Group::Contract,
            "uses only the config keys it is granted",
            status,
            format!(
                "granted: {} config, {} secrets",
                config.len(),
                secrets.len()
            ),
            Duration::ZERO,
        );
        let refused = plugin.settings().outbound.refused();
        let status = if refused.is_empty() {
            Status::Pass
        } else {
            Status::Fail(format!(
                "sent HTTP requests its grants refuse, to: {}; grant the origin in the plugin's \
                 allowed_outbound_hosts (here: --allow-outbound ORIGIN)",
                refused.join(", ")
            ))
        };
        self.push(
            Group::Contract,
            "reaches only the origins it is granted",
            status,
            format!(
                "granted: {} origins",
                plugin.settings().outbound.origins().len()
            ),
            Duration::ZERO,
        );
        let refused = plugin.settings().key_value.refused();
        let status = if refused.is_empty() {
            Status::Pass
        } else {
            Status::Fail(format!(
                "opened buckets it is not granted: {}; grant them in the plugin's \
                 key_value.buckets (here: --bucket NAME)",
                refused.join(", ")
            ))
        };
        self.push(
            Group::Contract,
            "opens only the buckets it is granted",
            status,
            format!(
                "granted: {} buckets",
                plugin.settings().key_value.buckets().len()
            ),
            Duration::ZERO,
        );
        let refused = plugin.settings().publish.refused();
        let status = if refused.is_empty() {
            Status::Pass
        } else {
            Status::Fail(format!(
                "published to topics its grants refuse: {}; grant the topic in the plugin's \
                 allowed_topics (here: --allow-topic TOPIC)",
                refused.join(", ")
            ))
        };
        self.push(
            Group::Contract,
            "publishes only to the topics it is granted",
            status,
            format!(
                "granted: {} topics",
                plugin.settings().publish.topics().len()
            ),
            Duration::ZERO,
        );
    }

    fn fixtures(&mut self, plugin: &Plugin, fixtures: &[Result<Fixture, FixtureError>]) {
        for fixture in fixtures {
            let fixture = match fixture {
                Ok(fixture) => fixture,
                Err(error) => {
                    self.push(
                        Group::Fixtures,
                        &error.name,
                        Status::Fail(error.reason.clone()),
                        "",
                        Duration::ZERO,
                    );
                    continue;
                }
            };
            if let Some(http) = &self.http {
                http.begin(&fixture.http);
            }
            if let Err(why) = self.prepare(&fixture.kv) {
                self.push(
                    Group::Fixtures,
                    &fixture.name,
                    Status::Fail(why),
                    "",
                    Duration::ZERO,
                );
                continue;
            }
            let (outcome, outbox, elapsed) =
                self.run_event(plugin, &fixture.event, &fixture.delivery);
            let mut faults = Vec::new();
            if let Some(fault) = outcome_fault(&fixture.expect, &outcome) {
                faults.push(fault);
            }
            // What the plugin sent may carry its secrets: compared as sent,
            // shown redacted whole, before any of it is cut or escaped.
            let redact = |text: &str| plugin.settings().config.redact(text.to_string());
            if let (Some(expected), Some(http)) = (&fixture.requests, &self.http) {
                faults.extend(request_faults(expected, &http.take(), &redact));
            }
            if let Some(expected) = &fixture.published {
                faults.extend(message_faults(expected, &outbox, &redact));
            }
            if !fixture.expect_kv.is_empty() {
                let shown = |text: &str| inert(&redact(text), 256).into_owned();
                match &self.state {
                    Some(state) => faults.extend(state.faults(&fixture.expect_kv, &shown)),
                    None => faults.push(NO_BUCKETS.into()),
                }
            }
            // What the plugin sent may carry its secrets: not in the report.
            let status = if faults.is_empty() {
                Status::Pass
            } else {
                Status::Fail(plugin.settings().config.redact(faults.join("; ")))
            };
            self.push(
                Group::Fixtures,
                &fixture.name,
                status,
                describe(&outcome),
                elapsed,
            );
        }
    }
}

/// Why an outcome is not the one a fixture expects, if it is not.
fn outcome_fault(expect: &Expect, outcome: &HandlerOutcome) -> Option<String> {
    let (kind, pattern) = match (expect, outcome) {
        (Expect::Ok, HandlerOutcome::Accepted) => return None,
        (Expect::Ok, other) => return Some(format!("expected ok, got {}", describe(other))),
        (Expect::Err { kind, reason }, _) => (*kind, reason),
    };
    let HandlerOutcome::Rejected {
        reason,
        disposition,
    } = outcome
    else {
        return Some(format!(
            "expected {}, got {}",
            kind_name(kind),
            describe(outcome)
        ));
    };
    let kind_matches = match kind {
        ErrKind::Any => true,
        ErrKind::Retry => *disposition == Disposition::Retry,
        ErrKind::RetryAfter => matches!(disposition, Disposition::RetryAfter(_)),
        ErrKind::DeadLetter => *disposition == Disposition::DeadLetter,
    };
    if !kind_matches {
        return Some(format!(
            "expected {}, got {}",
            kind_name(kind),
            describe(outcome)
        ));
    }
    match pattern {
        Some(pattern) if !pattern.is_match(reason) => Some(format!(
            "expected {} matching /{pattern}/, got err: {reason}",
            kind_name(kind)
        )),
        _ => None,
    }
}

fn kind_name(kind: ErrKind) -> &'static str {
    match kind {
        ErrKind::Any => "err",
        ErrKind::Retry => "err retry",
        ErrKind::RetryAfter => "err retry-after",
        ErrKind::DeadLetter => "err dead-letter",
    }
}

/// How the requests a handler made differ from the expected ones.
fn request_faults(
    expected: &[ExpectedRequest],
    sent: &[SentRequest],
    redact: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let shown = |text: &str| inert(&redact(text), 256).into_owned();
    let mut faults = Vec::new();
    if expected.len() != sent.len() {
        faults.push(format!(
            "expected {} HTTP requests, it made {}: [{}]",
            expected.len(),
            sent.len(),
            sent.iter()
                .map(|r| format!("{} {}", r.method, shown(&r.url)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (index, (want, got)) in expected.iter().zip(sent).enumerate() {
        if !want.method.eq_ignore_ascii_case(&got.method) || want.url != got.url {
            faults.push(format!(
                "request {}: expected {} {}, it sent {} {}",
                index + 1,
                want.method,
                want.url,
                got.method,
                shown(&got.url)
            ));
            continue;
        }
        for (name, value) in &want.headers {
            let found = got
                .headers
                .iter()
                .find(|(got_name, _)| got_name.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            if found != Some(value.as_str()) {
                faults.push(format!(
                    "request {}: expected header {name}: {value}, got {}",
                    index + 1,
                    found.map_or("none".to_string(), shown)
                ));
            }
        }
        faults.extend(body_fault(
            &format!("request {}", index + 1),
            want.body.as_ref(),
            &got.body,
            &shown,
        ));
    }
    faults
}

/// Why `body` does not match the fixture's `pattern`, if one is given and
/// it does not; the body as `shown` (redacted, escaped, cut).
fn body_fault(
    what: &str,
    pattern: Option<&Regex>,
    body: &[u8],
    shown: &dyn Fn(&str) -> String,
) -> Option<String> {
    let pattern = pattern?;
    let body = String::from_utf8_lossy(body);
    (!pattern.is_match(&body))
        .then(|| format!("{what}: body does not match /{pattern}/: {}", shown(&body)))
}

/// How the messages a handler published differ from the expected ones.
fn message_faults(
    expected: &[ExpectedMessage],
    published: &[OutgoingMessage],
    redact: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let shown = |text: &str| inert(&redact(text), 256).into_owned();
    let mut faults = Vec::new();
    if expected.len() != published.len() {
        faults.push(format!(
            "expected {} published messages, it published {}",
            expected.len(),
            published.len()
        ));
    }
    for (index, (want, got)) in expected.iter().zip(published).enumerate() {
        let n = index + 1;
        if want.topic != got.topic.configured() && want.topic != got.topic.wire() {
            faults.push(format!(
                "message {n}: expected topic {}, got {}",
                want.topic,
                got.topic.configured()
            ));
        }
        if want.tag.is_some() && want.tag != got.tag {
            faults.push(format!(
                "message {n}: expected tag {:?}, got {}",
                want.tag,
                got.tag.as_deref().map_or("none".to_string(), shown)
            ));
        }
        if let Some(keys) = &want.keys
            && *keys != got.keys
        {
            faults.push(format!(
                "message {n}: expected keys {keys:?}, got [{}]",
                got.keys
                    .iter()
                    .map(|key| shown(key))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        faults.extend(body_fault(
            &format!("message {n}"),
            want.body.as_ref(),
            &got.body,
            &shown,
        ));
    }
    faults
}

/// The kit's HTTP in place of the network: each fixture's answers, and the
/// requests the handler made.
#[derive(Default)]
struct FixtureHttp {
    state: std::sync::Mutex<(Vec<HttpAnswer>, Vec<SentRequest>)>,
}

impl FixtureHttp {
    /// Starts a fixture: its answers, no requests yet.
    fn begin(&self, answers: &[HttpAnswer]) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (answers.to_vec(), Vec::new());
    }

    /// The requests made since [`FixtureHttp::begin`].
    fn take(&self) -> Vec<SentRequest> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).1)
    }
}

impl Responder for FixtureHttp {
    fn respond(&self, request: SentRequest) -> Result<CannedResponse, String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let answer = state
            .0
            .iter()
            .find(|answer| {
                answer.url == request.url
                    && answer
                        .method
                        .as_ref()
                        .is_none_or(|method| method.eq_ignore_ascii_case(&request.method))
            })
            .cloned();
        let what = format!("{} {}", request.method, inert(&request.url, 256));
        state.1.push(request);
        let answer = answer.ok_or_else(|| format!("the fixture has no answer for {what}"))?;
        Ok(CannedResponse {
            status: answer.status,
            headers: answer.headers,
            body: answer.body,
        })
    }
}

/// An outcome as the table shows it.
fn describe(outcome: &HandlerOutcome) -> String {
    match outcome {
        HandlerOutcome::Accepted => "ok".into(),
        HandlerOutcome::Rejected {
            reason,
            disposition,
        } => match disposition {
            Disposition::Retry => format!("err: {reason}"),
            Disposition::RetryAfter(delay) => {
                format!("err, retry after {} ms: {reason}", delay.as_millis())
            }
            Disposition::DeadLetter => format!("err, dead letter: {reason}"),
        },
        HandlerOutcome::Failed(failure) => failure.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_classified_by_package_and_version() {
        assert_eq!(
            classify_import("mqplug:plugin/log@0.1.0"),
            ImportKind::Contract
        );
        assert_eq!(
            classify_import("mqplug:plugin/types@0.1.7"),
            ImportKind::Contract
        );
        assert_eq!(
            classify_import("mqplug:plugin/log@0.2.0"),
            ImportKind::Contract
        );
        assert_eq!(
            classify_import("wasi:config/store@0.2.0-rc.1"),
            ImportKind::Capability("the plugin's config and secrets")
        );
        assert_eq!(
            classify_import("wasi:http/outgoing-handler@0.2.12"),
            ImportKind::Capability("outbound HTTP to the origins its entry grants")
        );
        assert_eq!(
            classify_import("wasi:cli/environment@0.2.3"),
            ImportKind::WasiGrantingNothing
        );
        assert_eq!(
            classify_import("wasi:filesystem/preopens@0.2.6"),
            ImportKind::WasiGrantingNothing
        );
        let denied = [
            ("mqplug:plugin/log@0.3.0", "0.2.x and 0.1.x"),
            (
                "wasi:config/store@0.2.0-draft",
                "not `wasi:config/store` at 0.2.0-draft",
            ),
            ("mqplug:plugin/secrets@0.1.0", "no interface `secrets`"),
            ("mqplug:plugin/publish@0.1.0", "no interface `publish`"),
            (
                "wasi:http/incoming-handler@0.2.3",
                "only outgoing-handler and types",
            ),
            ("wasi:http/types@0.3.0", "only outgoing-handler and types"),
            (
                "wasi:cli/environment@0.3.0",
                "not `wasi:cli/environment` at 0.3.0",
            ),
            ("acme:vault/keys", "no such interface"),
        ];
        for (name, why) in denied {
            match classify_import(name) {
                ImportKind::Denied(text) => assert!(text.contains(why), "{name}: {text}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
