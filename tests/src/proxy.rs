//! A TCP proxy that speaks just enough of RocketMQ's remoting protocol to
//! lose a broker's answer on purpose: it forwards every frame both ways, but
//! drops the broker's reply to the first few send requests. The broker has
//! stored those messages; the producer never hears so, times out and sends
//! again — the fault that turns one event into two stored messages.
//!
//! Frames are `[total length u32][serialize type u8 | header length u24]
//! [header][body]`; the header is JSON or RocketMQ's binary form, and carries
//! the request code and the `opaque` id a reply repeats.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// RocketMQ's send request codes: SEND_MESSAGE, SEND_MESSAGE_V2, SEND_BATCH_MESSAGE.
const SEND_CODES: [i32; 3] = [10, 310, 320];

/// Frames larger than this end the connection (RocketMQ's own cap is 16 MiB).
const MAX_FRAME: usize = 16 << 20;

/// A running proxy; stops accepting when dropped.
pub struct DropSendReplies {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Send replies still to drop, over all connections.
    to_drop: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    /// Send requests passed on to the broker, over all connections.
    forwarded: Arc<AtomicUsize>,
}

impl DropSendReplies {
    /// Listens on `listen`, forwards to `upstream`, and drops the replies to
    /// the first `count` send requests.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, count: usize) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .with_context(|| format!("proxy cannot listen on {listen}"))?;
        listener.set_nonblocking(true)?;
        let proxy = DropSendReplies {
            addr: listener.local_addr()?,
            stop: Arc::new(AtomicBool::new(false)),
            to_drop: Arc::new(AtomicUsize::new(count)),
            dropped: Arc::new(AtomicUsize::new(0)),
            forwarded: Arc::new(AtomicUsize::new(0)),
        };
        let counters = Counters {
            to_drop: proxy.to_drop.clone(),
            dropped: proxy.dropped.clone(),
            forwarded: proxy.forwarded.clone(),
        };
        let stop = proxy.stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(broker) = TcpStream::connect(upstream) {
                            relay(client, broker, counters.clone());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(proxy)
    }

    /// Replies dropped so far.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Send requests passed on to the broker so far: each one a message the
    /// broker stores, whether or not its answer came back in time.
    pub fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for DropSendReplies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One frame's `(code, opaque)`, read from its header.
fn code_and_opaque(frame: &[u8]) -> Option<(i32, i32)> {
    let word = u32::from_be_bytes(frame.get(..4)?.try_into().ok()?);
    let header = frame.get(4..4 + (word & 0x00ff_ffff) as usize)?;
    match word >> 24 {
        0 => {
            let json: serde_json::Value = serde_json::from_slice(header).ok()?;
            Some((
                i32::try_from(json["code"].as_i64()?).ok()?,
                i32::try_from(json["opaque"].as_i64()?).ok()?,
            ))
        }
        // Binary: code i16, language u8, version i16, opaque i32, ...
        1 => Some((
            i32::from(i16::from_be_bytes(header.get(..2)?.try_into().ok()?)),
            i32::from_be_bytes(header.get(5..9)?.try_into().ok()?),
        )),
        _ => None,
    }
}

/// Reads one frame (without its leading total length).
fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    let total = u32::from_be_bytes(length) as usize;
    if total > MAX_FRAME {
        bail!("a frame of {total} bytes");
    }
    let mut frame = vec![0u8; total];
    stream.read_exact(&mut frame)?;
    Ok(frame)
}

fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(frame.len() as u32).to_be_bytes())?;
    stream.write_all(frame)
}

/// The proxy's counters, shared by every connection's relay.
#[derive(Clone)]
struct Counters {
    to_drop: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
}

fn relay(client: TcpStream, broker: TcpStream, counters: Counters) {
    let Counters {
        to_drop,
        dropped,
        forwarded,
    } = counters;
    // Opaque ids of this connection's sends whose replies are to be lost.
    let doomed = Arc::new(Mutex::new(HashSet::new()));
    let (Ok(mut client_in), Ok(mut broker_out)) = (client.try_clone(), broker.try_clone()) else {
        return;
    };
    let requests_doomed = doomed.clone();
    std::thread::spawn(move || {
        while let Ok(frame) = read_frame(&mut client_in) {
            let send = code_and_opaque(&frame).filter(|(code, _)| SEND_CODES.contains(code));
            if let Some((_, opaque)) = send
                && to_drop
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                requests_doomed.lock().unwrap().insert(opaque);
            }
            // Counted before it is written, so the count is up to date
            // before the broker can answer.
            if send.is_some() {
                forwarded.fetch_add(1, Ordering::SeqCst);
            }
            if write_frame(&mut broker_out, &frame).is_err() {
                break;
            }
        }
        let _ = broker_out.shutdown(Shutdown::Both);
    });
    let (mut broker_in, mut client_out) = (broker, client);
    std::thread::spawn(move || {
        while let Ok(frame) = read_frame(&mut broker_in) {
            if let Some((_, opaque)) = code_and_opaque(&frame)
                && doomed.lock().unwrap().remove(&opaque)
            {
                dropped.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if write_frame(&mut client_out, &frame).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(Shutdown::Both);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(serialize_type: u8, header: &[u8]) -> Vec<u8> {
        let mut frame = ((u32::from(serialize_type) << 24) | header.len() as u32)
            .to_be_bytes()
            .to_vec();
        frame.extend_from_slice(header);
        frame.extend_from_slice(b"body");
        frame
    }

    #[test]
    fn codes_and_opaques_are_read_from_json_and_binary_headers() {
        let json = frame(
            0,
            br#"{"code":310,"flag":0,"language":"RUST","opaque":77,"version":0}"#,
        );
        assert_eq!(code_and_opaque(&json), Some((310, 77)));
        let mut binary = Vec::new();
        binary.extend_from_slice(&310i16.to_be_bytes());
        binary.push(12);
        binary.extend_from_slice(&0i16.to_be_bytes());
        binary.extend_from_slice(&77i32.to_be_bytes());
        binary.extend_from_slice(&1i32.to_be_bytes());
        assert_eq!(code_and_opaque(&frame(1, &binary)), Some((310, 77)));
        assert_eq!(code_and_opaque(b"\0\0"), None);
    }
}
