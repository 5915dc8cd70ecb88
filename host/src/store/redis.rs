//! The Redis backend, for hosts on several machines that share a consumer
//! group: the host that takes over a queue sees the keys of the one before.
//!
//! Layout, under a prefix (`mqplug` unless configured):
//! - `<prefix>:kv:<plugin>:<bucket>:<key>`: a value (plugin and bucket
//!   names have no `:`, so no two namespaces meet); expiring keys use
//!   Redis's own expiry (`SET ... PX`);
//! - `<prefix>:usage:<plugin>`: the bytes the plugin's keys and values take;
//! - `<prefix>:ttl:<plugin>` (hash) and `<prefix>:exp:<plugin>` (sorted set
//!   by expiry): the expiring keys and their sizes, so the bytes of a key
//!   Redis expired are given back by the next write's sweep.
//!
//! Every write is one Lua script, so the value, the usage and the quota
//! check change together and a claim is atomic across hosts. The sweep
//! touches keys it does not declare, so the layout is for a single Redis
//! (or a primary with replicas), not Redis Cluster.

use std::sync::Mutex;
use std::time::Duration;

use redis::{Script, Value};

use super::{Backend, Namespace, StoreError, Write, Written};

/// Connections kept open for reuse.
const MAX_IDLE_CONNECTIONS: usize = 16;

/// Sweeps up to 64 expired keys of the plugin; needs `now`, `usage`, `th`,
/// `zs` in scope.
const SWEEP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', zs, '-inf', now, 'LIMIT', 0, 64)
for _, m in ipairs(due) do
  if redis.call('EXISTS', m) == 0 then
    local s = redis.call('HGET', th, m)
    if s then redis.call('DECRBY', usage, s) end
    redis.call('HDEL', th, m)
    redis.call('ZREM', zs, m)
  end
end
"#;

/// KEYS: value, usage, ttl hash, expiry set. Declares `now` and the bytes
/// the key counts now (`old`, expired or not) from ARGV[1], the key's
/// charge (`store::key_charge`): an expiring key counts it three times.
const PRELUDE: &str = r#"
local k, usage, th, zs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

const OLD: &str = r#"
local live = redis.call('GET', k)
local tracked = redis.call('HGET', th, k)
local old = 0
if tracked then old = tonumber(tracked) elseif live then old = tonumber(ARGV[1]) + string.len(live) end
local charge = tonumber(ARGV[1])
local total = tonumber(redis.call('GET', usage) or '0')
"#;

/// ARGV: key charge, value, ttl ms (0: none), quota, `set` or `claim`.
/// Returns {0} stored, {1, value} held, {2, would-be} over quota.
const WRITE: &str = r#"
if ARGV[5] == 'claim' and live then return {1, live} end
local ttl = tonumber(ARGV[3])
local new = charge + string.len(ARGV[2])
if ttl > 0 then new = new + 2 * charge end
local would = total - old + new
if new > old and would > tonumber(ARGV[4]) then return {2, tostring(would)} end
if ttl > 0 then
  redis.call('SET', k, ARGV[2], 'PX', ttl)
  redis.call('HSET', th, k, new)
  redis.call('ZADD', zs, now + ttl, k)
else
  redis.call('SET', k, ARGV[2])
  if tracked then
    redis.call('HDEL', th, k)
    redis.call('ZREM', zs, k)
  end
end
redis.call('INCRBY', usage, would - total)
return {0}
"#;

/// ARGV: key charge.
const DELETE: &str = r#"
redis.call('DEL', k)
if tracked then
  redis.call('HDEL', th, k)
  redis.call('ZREM', zs, k)
end
if old > 0 then redis.call('DECRBY', usage, old) end
return {0}
"#;

/// ARGV: key charge, expected value. Returns {0} deleted, {1} not (the
/// key holds another value, or none).
const DELETE_IF: &str = r#"
if live ~= ARGV[2] then return {1} end
"#;

/// ARGV: key charge, delta, quota. Returns {0, value}, {2, would-be} over
/// quota, {3} not a counter, {4} overflow.
const INCREMENT: &str = r#"
if live and not (live == '0' or string.match(live, '^[1-9]%d*$')) then return {3} end
if live and (string.len(live) > 19 or (string.len(live) == 19 and live > '9223372036854775807')) then return {3} end
local ok = pcall(redis.call, 'INCRBY', k, ARGV[2])
if not ok then return {4} end
local new = charge + redis.call('STRLEN', k)
if tracked and live then new = new + 2 * charge end
local would = total - old + new
if new > old and would > tonumber(ARGV[3]) then
  if live then redis.call('SET', k, live, 'KEEPTTL') else redis.call('DEL', k) end
  return {2, tostring(would)}
end
if tracked and not live then
  redis.call('HDEL', th, k)
  redis.call('ZREM', zs, k)
elseif tracked then
  redis.call('HSET', th, k, new)
end
redis.call('INCRBY', usage, would - total)
return {0, redis.call('GET', k)}
"#;

/// A Redis server shared by hosts.
pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    idle: Mutex<Vec<redis::Connection>>,
    write: Script,
    delete: Script,
    delete_if: Script,
    increment: Script,
    health: super::Health,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), checking it answers
    /// within `timeout`; every later command has the same timeout.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let store = Self::unconnected(url, prefix, timeout)?;
        let mut connection = store.connection(timeout)?;
        redis::cmd("PING")
            .query::<String>(&mut connection)
            .map_err(unavailable)?;
        store.give_back(connection);
        Ok(store)
    }

    fn unconnected(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|err| StoreError::Unavailable(format!("redis url: {err}")))?;
        let script = |body: &str| Script::new(&format!("{PRELUDE}{SWEEP}{OLD}{body}"));
        Ok(RedisStore {
            client,
            prefix: prefix.to_string(),
            timeout,
            idle: Mutex::default(),
            write: script(WRITE),
            delete: script(DELETE),
            delete_if: script(&format!("{DELETE_IF}{DELETE}")),
            increment: script(INCREMENT),
            health: Default::default(),
        })
    }

    /// A store for `url` whether or not Redis answers now: the host starts
    /// with its Redis down, each call tries again, and [`Backend::health`]
    /// says what the last one found. Only a malformed URL is an error.
    pub fn lazy(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        match Self::connect(url, prefix, timeout) {
            Err(StoreError::Unavailable(why)) if !why.starts_with("redis url:") => {
                let store = Self::unconnected(url, prefix, timeout)?;
                store
                    .health
                    .saw::<()>(&Err(StoreError::Unavailable(why.clone())));
                tracing::warn!(
                    "the state store (redis) is not answering: {why}; plugins' key-value calls fail until it does"
                );
                Ok(store)
            }
            other => other,
        }
    }

    /// A pooled or new connection whose every wait ends within `timeout`.
    fn connection(&self, timeout: Duration) -> Result<redis::Connection, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let connection = match pooled {
            Some(connection) => connection,
            None => self
                .client
                .get_connection_with_timeout(timeout)
                .map_err(unavailable)?,
        };
        connection
            .set_read_timeout(Some(timeout))
            .and_then(|()| connection.set_write_timeout(Some(timeout)))
            .map_err(unavailable)?;
        Ok(connection)
    }

    fn give_back(&self, connection: redis::Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(connection);
        }
    }

    /// Runs `f` on a pooled connection, every wait ending within the
    /// store's timeout or the event's deadline, whichever is nearer; a
    /// connection that failed is closed.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let result = self.with_once(f);
        self.health.saw(&result);
        result
    }

    fn with_once<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let (timeout, by_deadline) = super::wait_limit(self.timeout)?;
        let mut connection = match self.connection(timeout) {
            Err(_) if by_deadline && super::wait_limit(self.timeout).is_err() => {
                return Err(StoreError::Unavailable(super::DEADLINE_CAME.into()));
            }
            other => other?,
        };
        match f(&mut connection) {
            Ok(value) => {
                self.give_back(connection);
                Ok(value)
            }
            Err(err) if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() => {
                if by_deadline && err.is_timeout() {
                    return Err(StoreError::Unavailable(super::DEADLINE_CAME.into()));
                }
                Err(unavailable(err))
            }
            Err(err) => {
                self.give_back(connection);
                Err(StoreError::Failed(err.to_string()))
            }
        }
    }

    fn value_key(&self, ns: &Namespace, key: &str) -> Vec<u8> {
        let mut full = format!("{}:kv:{}:{}:", self.prefix, ns.plugin, ns.bucket).into_bytes();
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// The keys every script takes: value, usage, ttl hash, expiry set.
    fn script_keys(&self, ns: &Namespace, key: &str) -> [Vec<u8>; 4] {
        let plugin = &ns.plugin;
        let prefix = &self.prefix;
        [
            self.value_key(ns, key),
            format!("{prefix}:usage:{plugin}").into_bytes(),
            format!("{prefix}:ttl:{plugin}").into_bytes(),
            format!("{prefix}:exp:{plugin}").into_bytes(),
        ]
    }

    fn run(
        &self,
        script: &Script,
        ns: &Namespace,
        key: &str,
        args: &[&[u8]],
    ) -> Result<Vec<Value>, StoreError> {
        let keys = self.script_keys(ns, key);
        self.with(|connection| {
            let mut invocation = script.prepare_invoke();
            for k in &keys {
                invocation.key(k.as_slice());
            }
            invocation.arg(super::key_charge(ns, key));
            for arg in args {
                invocation.arg(*arg);
            }
            invocation.invoke(connection)
        })
    }
}

fn unavailable(err: redis::RedisError) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn unexpected(reply: &[Value]) -> StoreError {
    StoreError::Failed(format!(
        "unexpected reply from the store's script: {reply:?}"
    ))
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes.clone()),
        Value::SimpleString(text) => Some(text.clone().into_bytes()),
        _ => None,
    }
}

/// `{2, would-be}`: over the quota.
fn quota(reply: &[Value], limit: u64) -> StoreError {
    let would_be = reply
        .get(1)
        .and_then(bytes)
        .and_then(|text| String::from_utf8(text).ok())
        .and_then(|text| text.parse().ok())
        .unwrap_or(0);
    StoreError::Quota { limit, would_be }
}

impl Backend for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.value_key(ns, key);
        self.with(|connection| redis::cmd("GET").arg(full).query(connection))
    }

    fn exists(&self, ns: &Namespace, key: &str) -> Result<bool, StoreError> {
        let full = self.value_key(ns, key);
        self.with(|connection| redis::cmd("EXISTS").arg(full).query(connection))
    }

    fn write(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        how: Write,
        limit: u64,
    ) -> Result<Written, StoreError> {
        let ttl = ttl
            .map_or(0, |ttl| (ttl.as_millis() as u64).max(1))
            .to_string();
        let how = match how {
            Write::Set => "set",
            Write::Claim => "claim",
        };
        let limit_text = limit.to_string();
        let reply = self.run(
            &self.write,
            ns,
            key,
            &[value, ttl.as_bytes(), limit_text.as_bytes(), how.as_bytes()],
        )?;
        match reply.first() {
            Some(Value::Int(0)) => Ok(Written::Stored),
            Some(Value::Int(1)) => reply
                .get(1)
                .and_then(bytes)
                .map(Written::Held)
                .ok_or_else(|| unexpected(&reply)),
            Some(Value::Int(2)) => Err(quota(&reply, limit)),
            _ => Err(unexpected(&reply)),
        }
    }

    fn delete(&self, ns: &Namespace, key: &str) -> Result<(), StoreError> {
        let reply = self.run(&self.delete, ns, key, &[])?;
        match reply.first() {
            Some(Value::Int(0)) => Ok(()),
            _ => Err(unexpected(&reply)),
        }
    }

    fn delete_if(&self, ns: &Namespace, key: &str, expected: &[u8]) -> Result<bool, StoreError> {
        let reply = self.run(&self.delete_if, ns, key, &[expected])?;
        match reply.first() {
            Some(Value::Int(0)) => Ok(true),
            Some(Value::Int(1)) => Ok(false),
            _ => Err(unexpected(&reply)),
        }
    }

    fn health(&self) -> Result<(), String> {
        self.health.get()
    }

    fn list_keys(
        &self,
        ns: &Namespace,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), StoreError> {
        let prefix = self.value_key(ns, "");
        let mut pattern = prefix.clone();
        pattern.push(b'*');
        let (next, keys): (u64, Vec<Vec<u8>>) = self.with(|connection| {
            redis::cmd("SCAN")
                .arg(cursor.unwrap_or(0))
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(super::LIST_PAGE)
                .query(connection)
        })?;
        let keys = keys
            .into_iter()
            .filter_map(|key| {
                key.strip_prefix(prefix.as_slice())
                    .map(|key| String::from_utf8_lossy(key).into_owned())
            })
            .collect();
        Ok((keys, (next != 0).then_some(next)))
    }

    fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        limit: u64,
    ) -> Result<u64, StoreError> {
        if delta > i64::MAX as u64 {
            return Err(StoreError::Overflow);
        }
        let delta = delta.to_string();
        let limit_text = limit.to_string();
        let reply = self.run(
            &self.increment,
            ns,
            key,
            &[delta.as_bytes(), limit_text.as_bytes()],
        )?;
        match reply.first() {
            Some(Value::Int(0)) => reply
                .get(1)
                .and_then(bytes)
                .and_then(|text| String::from_utf8(text).ok())
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| unexpected(&reply)),
            Some(Value::Int(2)) => Err(quota(&reply, limit)),
            Some(Value::Int(3)) => Err(StoreError::NotACounter),
            Some(Value::Int(4)) => Err(StoreError::Overflow),
            _ => Err(unexpected(&reply)),
        }
    }

    fn usage(&self, plugin: &str) -> Result<u64, StoreError> {
        let key = format!("{}:usage:{plugin}", self.prefix);
        self.with(|connection| redis::cmd("GET").arg(key).query::<Option<i64>>(connection))
            .map(|usage| usage.unwrap_or(0).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqplug_tests::LocalRedis;

    #[test]
    fn redis_keeps_the_contract() {
        let server = LocalRedis::start().unwrap();
        let store = RedisStore::connect(&server.url(), "mqplug", Duration::from_secs(2)).unwrap();
        super::super::contract::check_all(&store, &std::thread::sleep);
        // Nothing left behind: no values, no tracked expiries, no usage.
        assert_eq!(server.command(&["KEYS", "mqplug:kv:*"]).unwrap(), "");
        assert_eq!(
            server
                .command(&["EXISTS", "mqplug:ttl:plugin-a", "mqplug:exp:plugin-a"])
                .unwrap(),
            "0"
        );
        assert_eq!(
            server.command(&["GET", "mqplug:usage:plugin-a"]).unwrap(),
            "0"
        );
    }

    #[test]
    fn two_hosts_claiming_the_same_key_get_it_once() {
        let server = LocalRedis::start().unwrap();
        let ns = Namespace::new("granter", "seen");
        let winners: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|host| {
                    let url = server.url();
                    let ns = ns.clone();
                    scope.spawn(move || {
                        let store =
                            RedisStore::connect(&url, "mqplug", Duration::from_secs(2)).unwrap();
                        (0..50)
                            .filter(|i| {
                                store
                                    .write(
                                        &ns,
                                        &format!("m{i}"),
                                        format!("host-{host}").as_bytes(),
                                        Some(Duration::from_secs(60)),
                                        Write::Claim,
                                        1 << 20,
                                    )
                                    .unwrap()
                                    == Written::Stored
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 50);
    }

    #[test]
    fn a_store_that_does_not_answer_is_unavailable_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        // Accepts (the kernel does) but never answers.
        let err = RedisStore::connect(&url, "mqplug", Duration::from_millis(200))
            .err()
            .expect("connected to a silent server");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        drop(listener);
        let err = RedisStore::connect(&url, "mqplug", Duration::from_millis(200))
            .err()
            .expect("connected to a closed port");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
