//! Test plugin: built against a future contract, `mqplug:plugin@0.9.0`, whose
//! handler takes other arguments; a 0.1/0.2 host must refuse it and say so.

wit_bindgen::generate!({
    inline: r#"
        package mqplug:plugin@0.9.0;

        interface handler {
            handle: func(event-json: string) -> result<_, string>;
        }

        world plugin {
            export handler;
        }
    "#,
    world: "mqplug:plugin/plugin@0.9.0",
});

use exports::mqplug::plugin::handler::Guest;

struct FutureWit;

impl Guest for FutureWit {
    fn handle(event_json: String) -> Result<(), String> {
        if event_json.is_empty() {
            return Err("empty event".into());
        }
        Ok(())
    }
}

export!(FutureWit);
