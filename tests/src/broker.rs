//! A throwaway RocketMQ name server and broker on loopback.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// A name server and a broker, each a child process with its data in a
/// temporary folder. Dropping it kills both (also when a test panics), and
/// both also die with the test process.
pub struct LocalBroker {
    namesrv: Option<Child>,
    broker: Option<Child>,
    /// `127.0.0.1:<port>` of the name server.
    pub name_server: String,
    dir: tempfile::TempDir,
    broker_config: PathBuf,
    health: SocketAddr,
}

/// Ports the broker uses: its listen port, the "fast" port two below it, HA
/// and health. Reserved together so parallel tests do not collide.
struct BrokerPorts {
    listen: u16,
    ha: u16,
    health: u16,
    namesrv: u16,
}

fn free_ports() -> Result<BrokerPorts> {
    for _ in 0..200 {
        let listen = TcpListener::bind("127.0.0.1:0")?;
        let port = listen.local_addr()?.port();
        let Some(fast_port) = port.checked_sub(2) else {
            continue;
        };
        let Ok(_fast) = TcpListener::bind(("127.0.0.1", fast_port)) else {
            continue;
        };
        let ha = TcpListener::bind("127.0.0.1:0")?;
        let health = TcpListener::bind("127.0.0.1:0")?;
        let namesrv = TcpListener::bind("127.0.0.1:0")?;
        return Ok(BrokerPorts {
            listen: port,
            ha: ha.local_addr()?.port(),
            health: health.local_addr()?.port(),
            namesrv: namesrv.local_addr()?.port(),
        });
    }
    bail!("could not find free ports on 127.0.0.1")
}

/// The folder with `rocketmq-namesrv-rust` and `rocketmq-broker-rust`,
/// installed (once per version, cached outside the checkout) by
/// `scripts/install-rocketmq.sh`. `MQPLUG_ROCKETMQ_BIN` overrides it.
pub fn rocketmq_bin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("MQPLUG_ROCKETMQ_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let script = workspace_root().join("scripts/install-rocketmq.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
        if !output.status.success() {
            return Err(format!("{} failed: {}", script.display(), output.status));
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim().to_string(),
        ))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Makes a child die with the test process, even on SIGKILL of the test.
/// The signal comes when the *thread* that spawned the child exits, so start
/// and restart servers from a thread that lives as long as they should.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn spawn_logged(mut command: Command, log: &Path) -> Result<Child> {
    let out = File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .env("RUST_LOG", "warn");
    die_with_parent(&mut command);
    command
        .spawn()
        .with_context(|| format!("cannot start {:?}", command.get_program()))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(250)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

impl LocalBroker {
    /// Starts a name server, then a broker registered with it, and waits
    /// until the broker reports ready.
    pub fn start() -> Result<LocalBroker> {
        let bin = rocketmq_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("mqplug-broker-")
            .tempdir()?;
        let ports = free_ports()?;
        let root = dir.path();

        let namesrv_config = root.join("namesrv.toml");
        std::fs::write(
            &namesrv_config,
            format!(
                "rocketmqHome = \"{home}\"\nkvConfigPath = \"{home}/namesrv/kvConfig.json\"\nconfigStorePath = \"{home}/namesrv/namesrv.properties\"\n",
                home = root.display()
            ),
        )?;
        let mut command = Command::new(bin.join("rocketmq-namesrv-rust"));
        command
            .env("ROCKETMQ_HOME", root)
            .arg("-c")
            .arg(&namesrv_config)
            .arg("--bindAddress")
            .arg("127.0.0.1")
            .arg("--listenPort")
            .arg(ports.namesrv.to_string());
        let namesrv = spawn_logged(command, &root.join("namesrv.log"))?;
        let name_server = format!("127.0.0.1:{}", ports.namesrv);

        let store = root.join("store");
        let broker_config = root.join("broker.toml");
        std::fs::write(
            &broker_config,
            format!(
                r#"[broker]
brokerIp1 = "127.0.0.1"
listenPort = {listen}
namesrvAddr = "{name_server}"
storePathRootDir = "{store}"

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "mqplug-test-broker"
brokerClusterName = "DefaultCluster"
brokerId = 0

[store]
storeType = "LocalFile"
brokerRole = "ASYNC_MASTER"
flushDiskType = "ASYNC_FLUSH"
haListenAddress = "127.0.0.1"
haListenPort = {ha}
storePathRootDir = "{store}"
mappedFileSizeCommitLog = 67108864
"#,
                listen = ports.listen,
                ha = ports.ha,
                store = store.display(),
            ),
        )?;
        let mut local = LocalBroker {
            namesrv: Some(namesrv),
            broker: None,
            name_server,
            health: SocketAddr::from(([127, 0, 0, 1], ports.health)),
            broker_config,
            dir,
        };
        local.wait_for_name_server(ports.namesrv)?;
        local.start_broker()?;
        Ok(local)
    }

    fn wait_for_name_server(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self
                .namesrv
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "name server exited ({status}):\n{}",
                    tail(&self.dir.path().join("namesrv.log"))
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "name server did not listen within 20 s:\n{}",
                    tail(&self.dir.path().join("namesrv.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts (or restarts) the broker with its store kept, and waits until
    /// it is ready. The broker dies when the calling thread ends.
    pub fn start_broker(&mut self) -> Result<()> {
        let bin = rocketmq_bin_dir()?;
        let log = self.dir.path().join("broker.log");
        let mut command = Command::new(bin.join("rocketmq-broker-rust"));
        command
            .env("ROCKETMQ_HOME", self.dir.path())
            .env("ROCKETMQ_SECURITY_PROFILE", "development-insecure-loopback")
            .env("ROCKETMQ_HEALTH_BIND_ADDR", self.health.to_string())
            .env("ROCKETMQ_SHUTDOWN_TIMEOUT_SECONDS", "5")
            .env_remove("NAMESRV_ADDR")
            .arg("-c")
            .arg(&self.broker_config)
            .arg("-n")
            .arg(&self.name_server);
        self.broker = Some(spawn_logged(command, &log)?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .broker
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("broker exited ({status}):\n{}", tail(&log));
            }
            if http_status(self.health, "/readyz") == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("broker was not ready within 60 s:\n{}", tail(&log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 15 s), keeping its store.
    pub fn stop_broker(&mut self) {
        if let Some(child) = self.broker.take() {
            terminate(child);
        }
    }

    /// The broker's and name server's logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- name server ---\n{}\n--- broker ---\n{}",
            tail(&self.dir.path().join("namesrv.log")),
            tail(&self.dir.path().join("broker.log"))
        )
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

fn terminate(mut child: Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        for child in [self.broker.take(), self.namesrv.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
