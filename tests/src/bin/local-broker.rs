//! Starts a RocketMQ name server and broker on 127.0.0.1 with data in a
//! temporary folder, prints `NAME_SERVER=127.0.0.1:<port>`, and stops both on
//! SIGINT/SIGTERM. Used by scripts/demo.sh; handy for plugin authors.

use std::io::Write;

use anyhow::Result;
use mqplug_tests::LocalBroker;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let broker = LocalBroker::start()?;
    println!("NAME_SERVER={}", broker.name_server);
    std::io::stdout().flush()?;
    mqplug::shutdown::signal().await;
    drop(broker);
    Ok(())
}
