//! Runs the demo's rewards service (`mqplug_tests::rewards`) on 127.0.0.1,
//! prints `REWARDS_URL=http://127.0.0.1:<port>`, and on SIGINT/SIGTERM
//! prints every grant and the request counts, then stops. The bearer token
//! it accepts is read from the environment variable `REWARDS_TOKEN`.
//! Used by scripts/demo.sh.
//!
//!     REWARDS_TOKEN=t rewards-service [--port N]

use std::io::Write;

use anyhow::{Context, Result, bail};
use mqplug_tests::rewards::RewardsService;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let port = match (args.next().as_deref(), args.next()) {
        (None, _) => 0,
        (Some("--port"), Some(port)) => port.parse().context("--port takes a number")?,
        _ => bail!("usage: REWARDS_TOKEN=t rewards-service [--port N]"),
    };
    let token = std::env::var("REWARDS_TOKEN").context("set REWARDS_TOKEN")?;
    let service = RewardsService::start_on(port, &token)?;
    println!("REWARDS_URL={}", service.url());
    std::io::stdout().flush()?;
    mqplug::shutdown::signal().await;
    for grant in service.grants() {
        println!(
            "grant {}: {} points to user {} in {} (idempotency key {})",
            grant.id, grant.points, grant.user_id, grant.campaign_id, grant.idempotency_key
        );
    }
    let stats = service.stats();
    println!(
        "rewards service: {} requests, {} grants, {} repeated requests answered with their first grant",
        stats.requests, stats.grants, stats.repeated_requests
    );
    Ok(())
}
