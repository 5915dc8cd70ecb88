//! A throwaway Redis on loopback: Debian's `redis-server`
//! (scripts/install-debian-packages.sh installs it) as a child process on a
//! free 127.0.0.1 port, with nothing persisted and its log in a temporary
//! folder. Stopped on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::broker::die_with_parent;

/// How long [`LocalRedis::start`] waits for the server to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one [`LocalRedis::command`] may take to connect, send and read.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// How many times [`LocalRedis::start`] tries again when another process took
/// the free port between picking it and the server binding it.
const PORT_ATTEMPTS: usize = 3;

/// A `redis-server` child process on `127.0.0.1:<port>`, with no persistence
/// (`--save ""`, `--appendonly no`) and its working folder and log in a
/// temporary folder. Dropping it kills the server (also when a test panics),
/// and it also dies with the test process.
pub struct LocalRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// `/usr/bin/redis-server` when it is there, else `redis-server` on `PATH`.
fn redis_server_binary() -> PathBuf {
    let debian = Path::new("/usr/bin/redis-server");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("redis-server")
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of `path`, or nothing when it cannot be read.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether the server on `port` answers a raw `PING` with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(250)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && reply.starts_with(b"+PONG")
}

impl LocalRedis {
    /// Starts `redis-server` on a free 127.0.0.1 port and waits (up to 10 s)
    /// until it answers `PING`. If it exits or does not answer in time, it is
    /// killed and the error carries the end of its log.
    pub fn start() -> Result<LocalRedis> {
        let mut attempt = 1;
        loop {
            match LocalRedis::start_once()? {
                Ok(redis) => return Ok(redis),
                Err(log) if log.contains("Address already in use") && attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                }
                Err(log) => bail!("{log}"),
            }
        }
    }

    /// One try of [`LocalRedis::start`]: the started server, or why it did
    /// not start with the end of its log (`Err` inside), or an error that
    /// trying again would not help with (`Err` outside).
    fn start_once() -> Result<Result<LocalRedis, String>> {
        let dir = tempfile::Builder::new().prefix("mqplug-redis-").tempdir()?;
        let port = free_port()?;
        LocalRedis::start_at(port, dir)
    }

    /// Starts the server again on its port after [`LocalRedis::stop`]
    /// (empty: nothing is persisted), as a Redis that comes back does.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let dir = tempfile::Builder::new().prefix("mqplug-redis-").tempdir()?;
        match LocalRedis::start_at(self.port, dir)? {
            Ok(started) => {
                *self = started;
                Ok(())
            }
            Err(log) => bail!("{log}"),
        }
    }

    fn start_at(port: u16, dir: tempfile::TempDir) -> Result<Result<LocalRedis, String>> {
        let binary = redis_server_binary();
        let mut command = Command::new(&binary);
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "yes"])
            .args(["--loglevel", "warning"])
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .current_dir(dir.path())
            .stdin(Stdio::null());
        // What it says before it opens its log file (a bad option, say).
        let output = File::create(dir.path().join("redis.out"))?;
        command.stdout(output.try_clone()?).stderr(output);
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| {
            format!(
                "cannot start {} (scripts/install-debian-packages.sh installs it)",
                binary.display()
            )
        })?;
        let mut redis = LocalRedis {
            child: Some(child),
            port,
            dir,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = redis
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                redis.child = None;
                return Ok(Err(format!(
                    "redis-server on port {port} exited ({status}):\n{}",
                    redis.logs()
                )));
            }
            if answers_ping(port) {
                return Ok(Ok(redis));
            }
            if Instant::now() > deadline {
                redis.stop();
                return Ok(Err(format!(
                    "redis-server on port {port} did not answer PING within {} s:\n{}",
                    START_TIMEOUT.as_secs(),
                    redis.logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `redis://127.0.0.1:<port>/`, for a client.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The end of the server's log and of what it wrote to stdout and
    /// stderr, for failure messages.
    pub fn logs(&self) -> String {
        let root = self.dir.path();
        format!(
            "--- redis.log ---\n{}\n--- output ---\n{}",
            tail(&root.join("redis.log")),
            tail(&root.join("redis.out"))
        )
    }

    /// Kills the server and waits for it to exit. Doing it again does
    /// nothing.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends one command (`args`, e.g. `["DBSIZE"]`) over a new connection
    /// and returns the reply as text: a simple string or a bulk string as it
    /// is, an integer in decimal, a nil as `(nil)`, an array as its elements
    /// one a line. An error reply is an `Err` with its message.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        if args.is_empty() {
            bail!("a Redis command needs at least its name");
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)
            .with_context(|| format!("connect to redis on {addr}"))?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request)?;
        let mut reader = BufReader::new(stream);
        read_reply(&mut reader).with_context(|| format!("redis {}", args.join(" ")))
    }
}

/// One line of a reply, without its `\r\n`.
fn read_line(reader: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        bail!("redis closed the connection before it replied");
    }
    let Some(line) = line.strip_suffix("\r\n") else {
        bail!("redis sent a reply line without \\r\\n: {line:?}");
    };
    Ok(line.to_string())
}

/// Reads one RESP2 reply as text (see [`LocalRedis::command`]).
fn read_reply(reader: &mut impl BufRead) -> Result<String> {
    let line = read_line(reader)?;
    let (kind, rest) = line
        .split_at_checked(1)
        .context("redis sent an empty line")?;
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => bail!("redis replied with an error: {rest}"),
        "$" => {
            let len: i64 = rest
                .parse()
                .with_context(|| format!("bad bulk length {rest:?}"))?;
            if len < 0 {
                return Ok("(nil)".to_string());
            }
            let mut bulk = vec![0u8; usize::try_from(len)? + 2];
            reader.read_exact(&mut bulk)?;
            if !bulk.ends_with(b"\r\n") {
                bail!("redis sent a bulk string without \\r\\n after it");
            }
            bulk.truncate(bulk.len() - 2);
            Ok(String::from_utf8_lossy(&bulk).into_owned())
        }
        "*" => {
            let len: i64 = rest
                .parse()
                .with_context(|| format!("bad array length {rest:?}"))?;
            if len < 0 {
                return Ok("(nil)".to_string());
            }
            let items = (0..len)
                .map(|_| read_reply(reader))
                .collect::<Result<Vec<_>>>()?;
            Ok(items.join("\n"))
        }
        _ => bail!("redis sent a reply of unknown kind: {line:?}"),
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_commands_and_stops_on_drop() -> Result<()> {
        let redis = LocalRedis::start()?;
        let port = redis.port();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
        assert_eq!(redis.command(&["SET", "a", "b"])?, "OK");
        assert_eq!(redis.command(&["GET", "a"])?, "b");
        assert_eq!(redis.command(&["GET", "missing"])?, "(nil)");
        assert_eq!(redis.command(&["DBSIZE"])?, "1");
        assert_eq!(redis.command(&["RPUSH", "list", "x", "y z"])?, "2");
        assert_eq!(redis.command(&["LRANGE", "list", "0", "-1"])?, "x\ny z");
        // Nothing is written to disk: saving is off.
        assert_eq!(redis.command(&["CONFIG", "GET", "save"])?, "save\n");
        let error = redis.command(&["NO-SUCH-COMMAND"]).unwrap_err();
        assert!(
            format!("{error:#}").contains("ERR unknown command"),
            "{error:#}"
        );
        drop(redis);
        let refused = TcpStream::connect(("127.0.0.1", port));
        assert!(
            refused.is_err(),
            "port {port} still accepts connections after drop"
        );
        Ok(())
    }

    #[test]
    fn stop_is_idempotent() -> Result<()> {
        let mut redis = LocalRedis::start()?;
        redis.stop();
        redis.stop();
        assert!(redis.command(&["PING"]).is_err());
        Ok(())
    }
}
