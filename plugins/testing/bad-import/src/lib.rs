//! Test plugin: imports an interface mqplug does not provide
//! (`test:bad-import/vault`), so the host must refuse it by that name.

wit_bindgen::generate!({
    path: "../../../wit",
    inline: r#"
        package test:bad-import;

        interface vault {
            secret: func(key: string) -> string;
        }

        world plugin-with-vault {
            import vault;
            export mqplug:plugin/handler@0.2.0;
        }
    "#,
    world: "test:bad-import/plugin-with-vault",
    generate_all,
});

use exports::mqplug::plugin::handler::Guest;
use mqplug::plugin::types::{Delivery, HandlerError, TaskEvent};

struct BadImport;

impl Guest for BadImport {
    fn handle(event: TaskEvent, _delivery: Delivery) -> Result<(), HandlerError> {
        if test::bad_import::vault::secret(&event.tenant_id).is_empty() {
            return Err(HandlerError::Retry("no secret".into()));
        }
        Ok(())
    }
}

export!(BadImport);
