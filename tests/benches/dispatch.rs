//! Cost per event of mqplug's dispatch through a trivial (no-op) plugin,
//! against a direct wasmtime call of the same export.
//!
//!   cargo bench -p mqplug-tests --bench dispatch

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mqplug::delivery::Delivery;
use mqplug::dispatch::Dispatcher;
use mqplug::event::DEFAULT_MAX_BODY_BYTES;
use mqplug::metrics::Metrics;
use mqplug::observe::{HostEvent, Observers};
use mqplug::outcome::{HandlerOutcome, UndecodablePolicy};
use mqplug::wasm::{InstanceMode, Plugin, PluginSettings, RuntimeSettings, WasmRuntime};
use mqplug_tests::{plugins::plugin_path, sample_event};
use std::sync::Arc;

/// The baseline: what a hand-written host does, with wasmtime's defaults
/// (no pooling, no deadline), calling `handle` on one long-lived instance.
mod direct {
    use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
    use wasmtime::{Engine, Store};
    use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::sync::http,
            "wasi:io": wasmtime_wasi::p2::bindings::sync::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        },
    });

    pub use self::mqplug::plugin::types::{Delivery, TaskEvent};

    pub struct State {
        wasi: WasiCtx,
        table: ResourceTable,
    }
    impl WasiView for State {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView {
                ctx: &mut self.wasi,
                table: &mut self.table,
            }
        }
    }
    impl self::mqplug::plugin::types::Host for State {}
    impl self::mqplug::plugin::log::Host for State {
        fn log(&mut self, _level: self::mqplug::plugin::log::Level, _message: String) {}
    }
    impl self::wasi::config::store::Host for State {
        fn get(
            &mut self,
            _key: String,
        ) -> Result<Option<String>, self::wasi::config::store::Error> {
            Ok(None)
        }
        fn get_all(&mut self) -> Result<Vec<(String, String)>, self::wasi::config::store::Error> {
            Ok(Vec::new())
        }
    }

    /// The component pre-linked on wasmtime's default engine.
    pub fn pre(wasm: &[u8]) -> PluginPre<State> {
        pre_on(&Engine::default(), wasm)
    }

    /// An engine with the pool mqplug configures (slots reset in place and
    /// kept resident), and nothing else of mqplug's: no epoch deadline, no
    /// limiter, no grants.
    pub fn pooled_engine() -> Engine {
        let mut pooling = wasmtime::PoolingAllocationConfig::default();
        pooling
            .total_component_instances(16)
            .total_core_instances(128)
            .total_memories(32)
            .total_tables(64)
            .linear_memory_keep_resident(1024 * 1024)
            .table_keep_resident(64 * 1024)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = wasmtime::Config::new();
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling));
        Engine::new(&config).unwrap()
    }

    pub fn pre_on(engine: &Engine, wasm: &[u8]) -> PluginPre<State> {
        let engine = engine.clone();
        let component = Component::new(&engine, wasm).unwrap();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
        // The no-op plugin imports log (and types) only.
        self::mqplug::plugin::types::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .unwrap();
        self::mqplug::plugin::log::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .unwrap();
        PluginPre::new(linker.instantiate_pre(&component).unwrap()).unwrap()
    }

    /// A store and an instance, as a hand-written host makes them.
    pub fn instantiate_pre(pre: &PluginPre<State>) -> (Store<State>, Plugin) {
        let mut store = Store::new(
            pre.engine(),
            State {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
            },
        );
        let plugin = pre.instantiate(&mut store).unwrap();
        (store, plugin)
    }

    pub fn instantiate(wasm: &[u8]) -> (Store<State>, Plugin) {
        instantiate_pre(&pre(wasm))
    }
}

fn bench(c: &mut Criterion) {
    let path = plugin_path("noop").unwrap();
    let wasm = std::fs::read(&path).unwrap();
    let event = sample_event("USER_REGISTER", 123);
    let delivery = Delivery {
        message_id: "C0A8000100002A9F0000000000000001".into(),
        topic: "marketing_task_completed".into(),
        tags: Some("USER_REGISTER".into()),
        keys: vec![event.key()],
        ..Delivery::default()
    };
    let body = event.encode();

    let mut group = c.benchmark_group("per_event");
    group.measurement_time(Duration::from_secs(5));

    let wit_event = || direct::TaskEvent {
        event_type: event.event_type.clone(),
        user_id: event.user_id,
        tenant_id: event.tenant_id.clone(),
        app_id: event.app_id.clone(),
        campaign_id: event.campaign_id.clone(),
        campaign_name: event.campaign_name.clone(),
        event_data: event.event_data_json(),
        timestamp: event.timestamp.clone(),
    };
    let wit_delivery = || direct::Delivery {
        message_id: delivery.message_id.clone(),
        topic: delivery.topic.clone(),
        tags: delivery.tags.clone(),
        keys: delivery.keys.clone(),
        reconsume_times: 0,
        queue_id: 0,
        queue_offset: 0,
        born_timestamp: 0,
    };
    // The baseline of a fresh instance: wasmtime's `instantiate_pre` on its
    // default engine, then the call, then the store dropped.
    let default_pre = direct::pre(&wasm);
    let pooled_pre = direct::pre_on(&direct::pooled_engine(), &wasm);
    for (name, pre) in [
        ("direct_wasmtime_instantiate_pre_and_call", &default_pre),
        (
            "direct_wasmtime_pooled_instantiate_pre_and_call",
            &pooled_pre,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let (mut store, plugin) = direct::instantiate_pre(pre);
                plugin
                    .mqplug_plugin_handler()
                    .call_handle(&mut store, &wit_event(), &wit_delivery())
                    .unwrap()
                    .unwrap()
            })
        });
    }
    let (mut store, plugin) = direct::instantiate(&wasm);
    group.bench_function("direct_wasmtime_call", |b| {
        b.iter(|| {
            // Converted on every call, as mqplug converts them.
            let (wit_event, wit_delivery) = (wit_event(), wit_delivery());
            plugin
                .mqplug_plugin_handler()
                .call_handle(&mut store, &wit_event, &wit_delivery)
                .unwrap()
                .unwrap()
        })
    });

    let runtime = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    for (name, mode) in [
        ("mqplug_reused_instance", InstanceMode::Reuse),
        ("mqplug_fresh_instance", InstanceMode::FreshPerEvent),
    ] {
        let settings = PluginSettings {
            instance_mode: mode,
            ..PluginSettings::new("noop")
        };
        let plugin = Plugin::load(&runtime, settings, &wasm, Observers::default()).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| assert_eq!(plugin.handle(&event, &delivery), HandlerOutcome::Accepted))
        });
    }

    let plugin = Plugin::load(
        &runtime,
        PluginSettings::new("noop"),
        &wasm,
        Observers::default(),
    )
    .unwrap();
    let dispatcher = Dispatcher::new(
        "noop",
        Arc::new(plugin),
        UndecodablePolicy::Retry,
        DEFAULT_MAX_BODY_BYTES,
        Observers::default(),
    );
    group.bench_function("mqplug_decode_and_dispatch_reused", |b| {
        b.iter(|| dispatcher.dispatch(&delivery, &body))
    });
    group.finish();

    // What counting a handled message costs when the listener threads of
    // several plugins count at once (the metrics observer on every message).
    let mut group = c.benchmark_group("metrics");
    group.measurement_time(Duration::from_secs(5));
    let metrics = Metrics::new();
    let observe = metrics.observer();
    const THREADS: u64 = 4;
    group.bench_function("record_handled_4_threads", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for thread in 0..THREADS {
                    let observe = observe.clone();
                    scope.spawn(move || {
                        let event = HostEvent::Handled {
                            plugin: Arc::from(format!("plugin-{}", thread % 2)),
                            message_id: "m".into(),
                            reconsume_times: 0,
                            outcome: mqplug::DeliveryOutcome::ConsumeSuccess,
                            cause: None,
                            version: None,
                            failure: None,
                            duration: Duration::from_micros(40),
                        };
                        for _ in 0..iters.div_ceil(THREADS) {
                            observe(std::hint::black_box(&event));
                        }
                    });
                }
            });
            started.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
