//! A throwaway RocketMQ name server and broker on loopback.
//!
//! Two kinds, chosen by `MQPLUG_BROKER`: `java` (the default), Apache
//! RocketMQ from Maven Central as the platform runs it in production, and
//! `rust`, the Rust 1.0.0 servers. Both run as child processes with their data
//! in a temporary folder, on free loopback ports.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// Which RocketMQ servers a [`LocalBroker`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// Apache RocketMQ (Java), `ROCKETMQ_JAVA_VERSION` or 5.5.0.
    Java,
    /// The Rust `rocketmq-namesrv` and `rocketmq-broker` 1.0.0.
    Rust,
}

impl BrokerKind {
    /// `MQPLUG_BROKER` (`java` or `rust`), Java when unset.
    pub fn from_env() -> Result<BrokerKind> {
        match std::env::var("MQPLUG_BROKER").as_deref() {
            Err(_) | Ok("") | Ok("java") => Ok(BrokerKind::Java),
            Ok("rust") => Ok(BrokerKind::Rust),
            Ok(other) => bail!("MQPLUG_BROKER must be java or rust, not {other:?}"),
        }
    }
}

/// A name server and a broker, each a child process with its data in a
/// temporary folder. Dropping it kills both (also when a test panics), and
/// both also die with the test process.
pub struct LocalBroker {
    kind: BrokerKind,
    namesrv: Option<Child>,
    broker: Option<Child>,
    /// `127.0.0.1:<port>` of the name server.
    pub name_server: String,
    /// `<address>:<port>` of the broker, as clients are told to reach it.
    pub broker_addr: String,
    listen_port: u16,
    dir: tempfile::TempDir,
    broker_config: PathBuf,
    health: SocketAddr,
}

/// The broker's name in the cluster.
pub const BROKER_NAME: &str = "mqplug-test-broker";

/// The super user (name, password) of a [`LocalBroker::start_secured`]
/// broker.
pub const ADMIN_USER: (&str, &str) = ("mqplug-admin", "admin-secret-0");

/// Ports the broker uses: its listen port, the "fast" port two below it, HA
/// and health. Reserved together so parallel tests do not collide.
struct BrokerPorts {
    listen: u16,
    ha: u16,
    health: u16,
    namesrv: u16,
}

fn free_ports() -> Result<BrokerPorts> {
    // Below the kernel's ephemeral range: a port there is never handed to
    // an outgoing connection, so a broker stopped mid-test finds its ports
    // free when it starts again (a client of any test could otherwise be
    // given one meanwhile: "Address already in use").
    let (first, last) = unassigned_range();
    let mut next = spread_start(first, last);
    let mut take = || -> Option<(u16, TcpListener)> {
        for _ in first..=last {
            next = if next >= last { first } else { next + 1 };
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", next)) {
                return Some((next, listener));
            }
        }
        None
    };
    for _ in 0..200 {
        let Some((port, _listen)) = take() else { break };
        let Ok(_fast) = TcpListener::bind(("127.0.0.1", port - 2)) else {
            continue;
        };
        let (Some((ha, _ha)), Some((health, _health)), Some((namesrv, _namesrv))) =
            (take(), take(), take())
        else {
            break;
        };
        return Ok(BrokerPorts {
            listen: port,
            ha,
            health,
            namesrv,
        });
    }
    bail!("could not find free ports on 127.0.0.1 between {first} and {last}")
}

/// Ports outside the kernel's ephemeral range (`ip_local_port_range`),
/// from 10000: the lower part when the range leaves room there, else the
/// upper part.
fn unassigned_range() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    match range {
        (low, _) if low > 12_000 => (10_002, low - 2),
        (_, high) if high < 63_000 => (high + 3, 65_000),
        // The ephemeral range is (nearly) everything: no better choice.
        _ => (10_002, 65_000),
    }
}

/// Where this process starts looking: spread by process id and time, so
/// test binaries running side by side look in different places.
fn spread_start(first: u16, last: u16) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = u64::from(std::process::id()).wrapping_mul(2_654_435_761) ^ u64::from(nanos);
    first + (seed % u64::from(last - first + 1)) as u16
}

/// Where the servers of `kind` are installed: for Java the folder of jars, for
/// Rust the folder with `rocketmq-namesrv-rust` and `rocketmq-broker-rust`.
/// `scripts/install-rocketmq.sh` installs them once per version, cached
/// outside the checkout; `MQPLUG_ROCKETMQ_HOME` overrides it.
pub fn rocketmq_install_dir(kind: BrokerKind) -> Result<PathBuf> {
    static JAVA: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static RUST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let (cell, name) = match kind {
        BrokerKind::Java => (&JAVA, "java"),
        BrokerKind::Rust => (&RUST, "rust"),
    };
    cell.get_or_init(|| {
        if let Ok(dir) = std::env::var("MQPLUG_ROCKETMQ_HOME") {
            return Ok(PathBuf::from(dir));
        }
        let script = workspace_root().join("scripts/install-rocketmq.sh");
        let output = Command::new("bash")
            .arg(&script)
            .env("MQPLUG_BROKER", name)
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
pub(crate) fn die_with_parent(command: &mut Command) {
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

/// A fresh directory for a name server's and brokers' stores and logs.
///
/// The Java broker refuses every send while the disk under its store is
/// more than 90 % used (`diskSpaceWarningLevelRatio`, which its config may
/// lower but not raise; "used" as `df` counts it). A build host's disk
/// can cross that line while the suite runs: a debug target directory is
/// many gigabytes. So the store goes to memory (`/dev/shm`) when that has
/// room to spare, as the tests write a few megabytes each; to the system's
/// temporary directory otherwise. `MQPLUG_TEST_BROKER_DIR` names another.
fn store_dir(prefix: &str) -> Result<tempfile::TempDir> {
    /// What `/dev/shm` must have free before a store goes there (a
    /// container's default is 64 MiB).
    const ENOUGH: u64 = 4 << 30;
    let parent = match std::env::var_os("MQPLUG_TEST_BROKER_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            let shm = Path::new("/dev/shm");
            (available_bytes(shm).unwrap_or(0) >= ENOUGH).then(|| shm.to_path_buf())
        }
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    match parent {
        Some(parent) => builder
            .tempdir_in(&parent)
            .with_context(|| format!("cannot make a broker directory in {}", parent.display())),
        None => Ok(builder.tempdir()?),
    }
}

/// The bytes an unprivileged process may still write under `path`.
fn available_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a statvfs the call fills in.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        // logback's own start-up chatter says nothing about why a server failed.
        .filter(|line| !line.contains("|-INFO in ") && !line.contains("|-WARN in "))
        .collect();
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

/// RocketMQ's `GET_BROKER_CLUSTER_INFO` request code.
const GET_BROKER_CLUSTER_INFO: i32 = 106;
/// RocketMQ's `GET_CONSUMER_CONNECTION_LIST` request code.
const GET_CONSUMER_CONNECTION_LIST: i32 = 203;
/// The broker's answer when a group has no client connected.
const CONSUMER_NOT_ONLINE: i64 = 206;

/// Asks the name server at `name_server` for its cluster table over
/// RocketMQ's remoting protocol and returns the response body as text.
pub fn cluster_info(name_server: &str) -> Result<String> {
    remoting_call(name_server, GET_BROKER_CLUSTER_INFO, &[])?.body("cluster info")
}

/// The distinct client ids the broker at `broker` lists as connected in
/// consumer group `group`, sorted (one per connection, so two clients
/// under one id count once); none while the group has no client online.
pub fn consumer_client_ids(broker: &str, group: &str) -> Result<Vec<String>> {
    let answer = remoting_call(
        broker,
        GET_CONSUMER_CONNECTION_LIST,
        &[("consumerGroup", group)],
    )?;
    if answer.code == CONSUMER_NOT_ONLINE {
        return Ok(Vec::new());
    }
    let body = answer.body(&format!("consumer connections of {group}"))?;
    let mut ids: Vec<String> = body
        .split("\"clientId\":\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// One request over RocketMQ's remoting protocol (a length-prefixed frame
/// with a JSON header) to the server at `addr`; returns the response body as
/// text with the response's code.
fn remoting_call(addr: &str, code: i32, fields: &[(&str, &str)]) -> Result<Answer> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    let fields: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(key, value)| (key.to_string(), serde_json::Value::from(*value)))
        .collect();
    let header = serde_json::json!({
        "code": code, "flag": 0, "language": "JAVA", "opaque": 1,
        "serializeTypeCurrentRPC": "JSON", "version": 0, "extFields": fields,
    })
    .to_string();
    let header_len = u32::try_from(header.len())?;
    let mut frame = Vec::with_capacity(8 + header.len());
    frame.extend_from_slice(&(4 + header_len).to_be_bytes());
    // The high byte is the serialisation type: 0 is JSON.
    frame.extend_from_slice(&header_len.to_be_bytes());
    frame.extend_from_slice(header.as_bytes());
    stream.write_all(&frame)?;

    let mut word = [0u8; 4];
    stream.read_exact(&mut word)?;
    let total = u32::from_be_bytes(word) as usize;
    if !(4..=16 << 20).contains(&total) {
        bail!("{addr} sent a frame of {total} bytes");
    }
    let mut rest = vec![0u8; total];
    stream.read_exact(&mut rest)?;
    let header_len = (u32::from_be_bytes(rest[..4].try_into()?) & 0x00ff_ffff) as usize;
    let header: serde_json::Value = rest
        .get(4..4 + header_len)
        .context("a header longer than its frame")
        .and_then(|header| Ok(serde_json::from_slice(header)?))
        .with_context(|| format!("{addr} answered request {code} with a bad header"))?;
    let body = rest.get(4 + header_len..).unwrap_or_default();
    Ok(Answer {
        code: header["code"].as_i64().unwrap_or(-1),
        remark: header["remark"].to_string(),
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// A remoting response: its code (0 is success), remark and body.
struct Answer {
    code: i64,
    remark: String,
    body: String,
}

impl Answer {
    fn body(self, what: &str) -> Result<String> {
        if self.code != 0 {
            bail!("{what}: code {}, {}", self.code, self.remark);
        }
        Ok(self.body)
    }
}

/// RocketMQ 4.9.x reads its logging set-up from `$ROCKETMQ_HOME/conf`, which
/// only its distribution archive ships (5.x carries its own in the jars):
/// a plain one, each server logging to `<root>/logs/rocketmqlogs/`.
fn write_logback_configs(root: &Path) -> Result<()> {
    let conf = root.join("conf");
    std::fs::create_dir_all(&conf)?;
    for server in ["namesrv", "broker", "tools"] {
        std::fs::write(
            conf.join(format!("logback_{server}.xml")),
            format!(
                r#"<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{logs}/{server}.log</file>
    <encoder><pattern>%d{{yyy-MM-dd HH:mm:ss,SSS}} %-5p %c{{0}} - %m%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
"#,
                logs = root.join("logs/rocketmqlogs").display(),
            ),
        )?;
    }
    Ok(())
}

/// The JVM options both Java servers share: a heap that suits a 2-core
/// machine shared with builds (the stock scripts ask for gigabytes), and the
/// module opens RocketMQ needs on Java 17.
const JAVA_OPTIONS: &[&str] = &[
    "-XX:+UseSerialGC",
    "-XX:-UsePerfData",
    "-Xss512k",
    "-Djava.net.preferIPv4Stack=true",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
];

/// The Java name server on 127.0.0.1:`port`, its config and logs in `root`.
fn java_namesrv_command(install: &Path, root: &Path, port: u16) -> Result<Command> {
    let config = root.join("namesrv.properties");
    std::fs::write(
        &config,
        format!("listenPort={port}\nbindAddress=127.0.0.1\n"),
    )?;
    let mut command = java_command(
        install,
        root,
        "128m",
        "org.apache.rocketmq.namesrv.NamesrvStartup",
    );
    command.arg("-c").arg(&config);
    Ok(command)
}

/// A Java broker's `broker.conf`: broker set `name`, a master, on `ports`,
/// registered with `name_server`, its data in `store`.
fn java_broker_conf(
    name: &str,
    advertised: Ipv4Addr,
    ports: &BrokerPorts,
    name_server: &str,
    store: &Path,
) -> String {
    format!(
        "brokerClusterName=DefaultCluster
brokerName={name}
brokerId=0
brokerIP1={advertised}
bindAddress=127.0.0.1
listenPort={listen}
haListenPort={ha}
namesrvAddr={name_server}
storePathRootDir={store}
storePathCommitLog={store}/commitlog
mappedFileSizeCommitLog=67108864
mappedFileSizeConsumeQueue=300000
brokerRole=ASYNC_MASTER
flushDiskType=ASYNC_FLUSH
autoCreateTopicEnable=true
autoCreateSubscriptionGroup=true
defaultTopicQueueNums=4
waitTimeMillsInSendQueue=3000
osPageCacheBusyTimeOutMills=5000
diskMaxUsedSpaceRatio=95
# Past 85% disk use the broker deletes its oldest commit log files at once,
# consumed or not: a test would see messages vanish (a drain that stops
# short). Without it only files older than fileReservedTime (72 h) go, and
# past 90% the broker refuses sends, which a test reports.
cleanFileForciblyEnable=false
",
        listen = ports.listen,
        ha = ports.ha,
        store = store.display(),
    )
}

/// A `java` command for `main_class` from the jars in `lib`, with its home,
/// logs (`<root>/logs`) and everything else it writes under `root`.
/// `heap` sizes the heap and the direct memory alike.
fn java_command(lib: &Path, root: &Path, heap: &str, main_class: &str) -> Command {
    let java = std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|java| java.exists())
        .unwrap_or_else(|| PathBuf::from("java"));
    let mut command = Command::new(java);
    command
        .env("ROCKETMQ_HOME", root)
        .env_remove("NAMESRV_ADDR")
        .args(JAVA_OPTIONS)
        .arg(format!("-Xms{heap}"))
        .arg(format!("-Xmx{heap}"))
        .arg(format!("-XX:MaxDirectMemorySize={heap}"))
        .arg(format!("-Duser.home={}", root.display()))
        .arg(format!("-Drocketmq.home.dir={}", root.display()))
        // RocksDB extracts its 13 MB JNI library to the temp folder on every
        // start and never removes it: inside `root`, it goes with the broker.
        .arg(format!("-Djava.io.tmpdir={}", root.display()))
        .arg("-cp")
        .arg(lib.join("*"))
        .arg(main_class);
    command
}

impl LocalBroker {
    /// Starts a name server, then a broker registered with it, of the kind
    /// `MQPLUG_BROKER` names (Java unless it says `rust`), and waits until the
    /// broker is ready.
    pub fn start() -> Result<LocalBroker> {
        LocalBroker::start_kind(BrokerKind::from_env()?)
    }

    /// Starts a name server and a broker of `kind`.
    pub fn start_kind(kind: BrokerKind) -> Result<LocalBroker> {
        LocalBroker::start_with(kind, Ipv4Addr::LOCALHOST)
    }

    /// Starts a name server and a broker of `kind` that listens on
    /// 127.0.0.1 but tells the name server (and so every client) that it is
    /// at `advertised` (another loopback address), where a test can put a
    /// proxy in front of it: see [`LocalBroker::listen_addr`].
    pub fn start_with(kind: BrokerKind, advertised: Ipv4Addr) -> Result<LocalBroker> {
        LocalBroker::start_configured(kind, advertised, "")
    }

    /// A Java name server and broker with ACL 2.0 on: every request must be
    /// signed by a user the broker knows and allowed by its ACLs. The broker
    /// starts with one super user, [`ADMIN_USER`], which [`LocalBroker::mqadmin`]
    /// signs as; make the others with `mqadmin createUser` and `createAcl`.
    pub fn start_secured() -> Result<LocalBroker> {
        let (user, password) = ADMIN_USER;
        let broker = LocalBroker::start_configured(
            BrokerKind::Java,
            Ipv4Addr::LOCALHOST,
            &format!(
                "authenticationEnabled=true
authorizationEnabled=true
authenticationMetadataProvider=org.apache.rocketmq.auth.authentication.provider.LocalAuthenticationMetadataProvider
authorizationMetadataProvider=org.apache.rocketmq.auth.authorization.provider.LocalAuthorizationMetadataProvider
initAuthenticationUser={{\"username\":\"{user}\",\"password\":\"{password}\"}}
innerClientAuthenticationCredentials={{\"accessKey\":\"{user}\",\"secretKey\":\"{password}\"}}
"
            ),
        )?;
        // mqadmin reads the credentials it signs with from here.
        std::fs::write(
            broker.dir.path().join("conf/tools.yml"),
            format!("accessKey: {user}\nsecretKey: {password}\n"),
        )?;
        Ok(broker)
    }

    /// Runs `mqadmin SUBCOMMAND -n <name server> ARGS...` (Apache RocketMQ's
    /// admin tool, from the same jars as the broker), signed as
    /// [`ADMIN_USER`] on a secured broker; its output. Fails when the tool
    /// exits non-zero or reports an exception.
    pub fn mqadmin(&self, subcommand: &str, args: &[&str]) -> Result<String> {
        let install = rocketmq_install_dir(BrokerKind::Java)?;
        let root = self.dir.path();
        std::fs::create_dir_all(root.join("conf"))?;
        let mut command = java_command(
            &install,
            root,
            "96m",
            "org.apache.rocketmq.tools.command.MQAdminStartup",
        );
        command
            .arg(subcommand)
            .arg("-n")
            .arg(&self.name_server)
            .args(args)
            .stdin(Stdio::null());
        let output = command
            .output()
            .with_context(|| format!("run mqadmin {subcommand}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() || text.contains("Exception") {
            bail!(
                "mqadmin {subcommand} {args:?} failed ({}):\n{text}",
                output.status
            );
        }
        Ok(text)
    }

    fn start_configured(
        kind: BrokerKind,
        advertised: Ipv4Addr,
        extra_config: &str,
    ) -> Result<LocalBroker> {
        let install = rocketmq_install_dir(kind)?;
        let dir = store_dir("mqplug-broker-")?;
        let ports = free_ports()?;
        let root = dir.path();
        let name_server = format!("127.0.0.1:{}", ports.namesrv);
        let store = root.join("store");

        let (namesrv, broker_config) = match kind {
            BrokerKind::Java => {
                write_logback_configs(root)?;
                let command = java_namesrv_command(&install, root, ports.namesrv)?;
                let broker_config = root.join("broker.conf");
                std::fs::write(
                    &broker_config,
                    java_broker_conf(BROKER_NAME, advertised, &ports, &name_server, &store)
                        + extra_config,
                )?;
                (command, broker_config)
            }
            BrokerKind::Rust => {
                let namesrv_config = root.join("namesrv.toml");
                std::fs::write(
                    &namesrv_config,
                    format!(
                        "rocketmqHome = \"{home}\"\nkvConfigPath = \"{home}/namesrv/kvConfig.json\"\nconfigStorePath = \"{home}/namesrv/namesrv.properties\"\n",
                        home = root.display()
                    ),
                )?;
                let mut command = Command::new(install.join("rocketmq-namesrv-rust"));
                command
                    .env("ROCKETMQ_HOME", root)
                    .arg("-c")
                    .arg(&namesrv_config)
                    .arg("--bindAddress")
                    .arg("127.0.0.1")
                    .arg("--listenPort")
                    .arg(ports.namesrv.to_string());
                let broker_config = root.join("broker.toml");
                std::fs::write(
                    &broker_config,
                    format!(
                        r#"[broker]
brokerIp1 = "{advertised}"
listenPort = {listen}
namesrvAddr = "{name_server}"
storePathRootDir = "{store}"

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "{BROKER_NAME}"
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
                (command, broker_config)
            }
        };
        let namesrv = spawn_logged(namesrv, &root.join("namesrv.log"))?;
        let mut local = LocalBroker {
            kind,
            namesrv: Some(namesrv),
            broker: None,
            name_server,
            broker_addr: format!("{advertised}:{}", ports.listen),
            listen_port: ports.listen,
            health: SocketAddr::from(([127, 0, 0, 1], ports.health)),
            broker_config,
            dir,
        };
        local.wait_for_name_server(ports.namesrv)?;
        local.start_broker()?;
        Ok(local)
    }

    /// Where the broker really listens: its port, and the "fast" port two
    /// below it, on 127.0.0.1.
    pub fn listen_addr(&self) -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.listen_port)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.listen_port - 2)),
        )
    }

    /// Which servers this is.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    fn wait_for_name_server(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
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
                    "name server did not listen within 30 s:\n{}",
                    tail(&self.dir.path().join("namesrv.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Whether the broker is ready: the Rust broker says so on its health
    /// port; the Java one once the name server lists it in its cluster table.
    fn broker_ready(&self) -> bool {
        match self.kind {
            BrokerKind::Rust => http_status(self.health, "/readyz") == Some(200),
            BrokerKind::Java => {
                cluster_info(&self.name_server).is_ok_and(|table| table.contains(&self.broker_addr))
            }
        }
    }

    /// Starts (or restarts) the broker with its store kept, and waits until
    /// it has registered with the name server. The broker dies when the
    /// calling thread ends.
    pub fn start_broker(&mut self) -> Result<()> {
        let install = rocketmq_install_dir(self.kind)?;
        let root = self.dir.path();
        let log = root.join("broker.log");
        let command = match self.kind {
            BrokerKind::Java => {
                let mut command = java_command(
                    &install,
                    root,
                    "256m",
                    "org.apache.rocketmq.broker.BrokerStartup",
                );
                // 256 MiB: the timer wheel alone takes about 40 MB of direct
                // memory at start.
                command
                    .arg("-c")
                    .arg(&self.broker_config)
                    .arg("-n")
                    .arg(&self.name_server);
                command
            }
            BrokerKind::Rust => {
                let mut command = Command::new(install.join("rocketmq-broker-rust"));
                command
                    .env("ROCKETMQ_HOME", root)
                    .env("ROCKETMQ_SECURITY_PROFILE", "development-insecure-loopback")
                    .env("ROCKETMQ_HEALTH_BIND_ADDR", self.health.to_string())
                    .env("ROCKETMQ_SHUTDOWN_TIMEOUT_SECONDS", "5")
                    .env_remove("NAMESRV_ADDR")
                    .arg("-c")
                    .arg(&self.broker_config)
                    .arg("-n")
                    .arg(&self.name_server);
                command
            }
        };
        self.broker = Some(spawn_logged(command, &log)?);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self
                .broker
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("broker exited ({status}):\n{}", self.logs());
            }
            if self.broker_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("broker was not ready within 90 s:\n{}", self.logs());
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

    /// The broker's and name server's logs, for failure messages: their
    /// output, and for Java the broker's own log file.
    pub fn logs(&self) -> String {
        let root = self.dir.path();
        let mut logs = format!(
            "--- name server ---\n{}\n--- broker ---\n{}",
            tail(&root.join("namesrv.log")),
            tail(&root.join("broker.log"))
        );
        let java_log = root.join("logs/rocketmqlogs/broker.log");
        if java_log.exists() {
            logs.push_str(&format!("\n--- broker log ---\n{}", tail(&java_log)));
        }
        logs
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

/// A name server and several Java brokers, each the master of its own
/// broker set (`broker-0`, `broker-1`, ...) in one cluster, as a production
/// cluster with two or more masters runs: a topic created through the
/// producer (`create_topic`) gets queues on every one. A broker can be
/// killed (SIGKILL, as a crash) and started again with its store.
pub struct LocalCluster {
    namesrv: Option<Child>,
    brokers: Vec<ClusterBroker>,
    /// `127.0.0.1:<port>` of the name server.
    pub name_server: String,
    dir: tempfile::TempDir,
}

struct ClusterBroker {
    name: String,
    /// As clients are told to reach it.
    addr: String,
    root: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl LocalCluster {
    /// Starts a name server and `brokers` brokers, and waits until every
    /// broker has registered.
    pub fn start(brokers: usize) -> Result<LocalCluster> {
        let install = rocketmq_install_dir(BrokerKind::Java)?;
        let dir = store_dir("mqplug-cluster-")?;
        let root = dir.path();
        write_logback_configs(root)?;
        let namesrv_port = free_ports()?.namesrv;
        let name_server = format!("127.0.0.1:{namesrv_port}");
        let command = java_namesrv_command(&install, root, namesrv_port)?;
        let mut cluster = LocalCluster {
            namesrv: Some(spawn_logged(command, &root.join("namesrv.log"))?),
            brokers: Vec::new(),
            name_server,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", namesrv_port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "name server did not listen within 30 s:\n{}",
                    cluster.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for index in 0..brokers {
            let name = format!("broker-{index}");
            let broker_root = cluster.dir.path().join(&name);
            std::fs::create_dir_all(&broker_root)?;
            write_logback_configs(&broker_root)?;
            let ports = free_ports()?;
            let config = broker_root.join("broker.conf");
            std::fs::write(
                &config,
                java_broker_conf(
                    &name,
                    Ipv4Addr::LOCALHOST,
                    &ports,
                    &cluster.name_server,
                    &broker_root.join("store"),
                ),
            )?;
            cluster.brokers.push(ClusterBroker {
                name,
                addr: format!("127.0.0.1:{}", ports.listen),
                root: broker_root,
                config,
                child: None,
            });
            cluster.start_broker(index)?;
        }
        Ok(cluster)
    }

    /// The broker sets' names, in order.
    pub fn broker_names(&self) -> Vec<String> {
        self.brokers.iter().map(|b| b.name.clone()).collect()
    }

    /// Kills broker `index` at once (SIGKILL), keeping its store.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.brokers[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts broker `index` (again), and waits until it has registered.
    pub fn start_broker(&mut self, index: usize) -> Result<()> {
        let install = rocketmq_install_dir(BrokerKind::Java)?;
        let broker = &mut self.brokers[index];
        let mut command = java_command(
            &install,
            &broker.root,
            "256m",
            "org.apache.rocketmq.broker.BrokerStartup",
        );
        command
            .arg("-c")
            .arg(&broker.config)
            .arg("-n")
            .arg(&self.name_server);
        broker.child = Some(spawn_logged(command, &broker.root.join("broker.log"))?);
        let addr = broker.addr.clone();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.brokers[index]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("broker {index} exited ({status}):\n{}", self.logs());
            }
            if cluster_info(&self.name_server).is_ok_and(|table| table.contains(&addr)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("broker {index} was not ready within 90 s:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every server's log tail, for failure messages.
    pub fn logs(&self) -> String {
        let mut logs = format!(
            "--- name server ---\n{}",
            tail(&self.dir.path().join("namesrv.log"))
        );
        for broker in &self.brokers {
            logs.push_str(&format!(
                "\n--- {} ---\n{}\n{}",
                broker.name,
                tail(&broker.root.join("broker.log")),
                tail(&broker.root.join("logs/rocketmqlogs/broker.log"))
            ));
        }
        logs
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let children = self
            .brokers
            .iter_mut()
            .filter_map(|broker| broker.child.take())
            .chain(self.namesrv.take());
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
