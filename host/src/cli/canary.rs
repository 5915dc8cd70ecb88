//! `mqplug canary promote|abort`: a running host's canary, through its
//! admin listener.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::Connection;
use crate::admin::ACTION_HEADER;
use crate::config::Overrides;

#[derive(Args)]
pub struct CanaryArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The plugin, by its name in the config file.
    #[arg(long)]
    pub plugin: String,
    /// The running host's admin address [default: the config's
    /// admin.listen, 127.0.0.1:9900].
    #[arg(long, env = "MQPLUG_ADMIN_LISTEN")]
    pub admin: Option<String>,
}

/// How long the host has to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Asks the host to promote (`verb` "promote") or abort its canary; prints
/// what it answered.
pub fn canary(verb: &str, args: CanaryArgs) -> Result<std::process::ExitCode> {
    let config = args.connection.load_with(Overrides {
        admin_listen: args.admin.clone(),
        ..Overrides::default()
    })?;
    if !config.admin.enabled {
        bail!("the admin listener is off in this config: no host to ask");
    }
    let listen = std::net::ToSocketAddrs::to_socket_addrs(config.admin.listen.as_str())
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("admin.listen {:?} is not an address", config.admin.listen))?;
    // A host listening on every interface is reached on loopback.
    let addr = if listen.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let (status, body) = post(
        addr,
        &format!(
            "/plugins/{}/canary/{verb}",
            crate::text::percent_encoded(&args.plugin)
        ),
        verb,
    )
    .with_context(|| format!("cannot reach the host's admin listener at {addr}"))?;
    let answer: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("the host answered {status} with {body:?}"))?;
    if status != 200 {
        bail!(
            "{}",
            answer["error"]
                .as_str()
                .map_or_else(|| body.clone(), str::to_string)
        );
    }
    println!(
        "plugin {}: canary {}; serving {}",
        args.plugin,
        answer["canary"].as_str().unwrap_or(verb),
        answer["serving"].as_str().unwrap_or("?")
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// One `POST path` with the action header; the status and body.
fn post(addr: std::net::SocketAddr, path: &str, verb: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, ANSWER_WITHIN)?;
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{ACTION_HEADER}: {verb}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(1 << 20).read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the answer has no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("the answer has no status")?;
    Ok((status, body.to_string()))
}
