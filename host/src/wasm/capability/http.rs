//! Outbound HTTP for plugins: `wasi:http/outgoing-handler` is wasmtime's own
//! implementation; mqplug decides, in [`WasiHttpHooks::send_request`], whether
//! and how each request goes out.
//!
//! - Only origins (scheme, host, port) the plugin's entry lists in
//!   `allowed_outbound_hosts` are reached; anything else is
//!   `HTTP-request-denied`, an error the handler sees, never a trap.
//! - The name is resolved by mqplug and the address checked before
//!   connecting to that very address: every address of the IANA
//!   special-purpose registries (loopback, private, link-local with cloud
//!   metadata, shared, multicast, reserved, benchmarking, and the NAT64,
//!   6to4, Teredo and IPv4-compatible prefixes that carry another address)
//!   is refused unless the grant names that address literally or
//!   `allowed_outbound_networks` contains it, so a name that resolves (or
//!   rebinds) to an internal address gets nowhere.
//! - Every wait ends at the request timeout (which the guest may shorten,
//!   not lengthen) and at the event's deadline; a request still waiting at
//!   the deadline makes the event's outcome "deadline".
//! - A response body over `http_max_response_bytes` is an error; at most
//!   `http_max_in_flight` requests per plugin at once.
//!
//! `https://` origins are reached over TLS (rustls), the server's
//! certificate checked against the system's roots and the plugin's
//! `http_ca_file`, for the grant's host name (or address), never a header's.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::config::ConfigValues;
use crate::observe::{HostEvent, Observers, OutboundResult};
use crate::text::{inert, url_without_secrets};
use crate::traces::{HttpSpan, TRACEPARENT, TRACESTATE, TraceContext};
use crate::wasm::deadline::EPOCH_TICK;

/// One origin a plugin may call: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `https`: the connection is TLS, the server's certificate checked
    /// against the system's roots and the plugin's `http_ca_file`.
    tls: bool,
    host: String,
    port: u16,
    /// The host, when the grant names an address rather than a name.
    literal: Option<IpAddr>,
}

impl Origin {
    /// Parses `http://host[:port]` or `https://host[:port]` (no path, query
    /// or user); the error says what is wrong.
    pub fn parse(text: &str) -> Result<Origin, String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(format!(
                "{text:?}: give an origin like http://host:port or https://host:port"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{text:?}: give scheme, host and port only (no path, query or user)"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') && !port.contains(']') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| format!("{text:?}: {port:?} is not a port"))?,
            ),
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        let host = host.to_ascii_lowercase();
        Ok(Origin {
            tls,
            literal: host.parse().ok(),
            host,
            port,
        })
    }
}

/// An address range a grant names explicitly: `10.0.0.0/8`, `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Network, String> {
        let (base, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: give a network like 10.0.0.0/8"))?;
        let base: IpAddr = base
            .parse()
            .map_err(|_| format!("{text:?}: {base:?} is not an address"))?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| *prefix <= max)
            .ok_or_else(|| format!("{text:?}: the prefix must be 0 to {max}"))?;
        Ok(Network { base, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((base, width), (ip, ip_width)) = (bits(self.base), bits(unmapped(ip)));
        if width != ip_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (base >> shift) == (ip >> shift)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IANA special-purpose address registries (IPv4 and IPv6, as of
/// 2026), with multicast, the rest of class E and the deprecated IPv6
/// site-local and IPv4-compatible ranges: every range whose addresses are
/// not an ordinary host on the internet. A plugin reaches an address in one
/// of them only when its grant names that address or network. Several of
/// them carry another address inside (NAT64, 6to4, Teredo,
/// IPv4-compatible), which is how a plugin would otherwise reach loopback
/// or a private network through a translator.
const SPECIAL_PURPOSE: &[(IpAddr, u8)] = &[
    (v4(0, 0, 0, 0), 8),                           // "this network"
    (v4(10, 0, 0, 0), 8),                          // private
    (v4(100, 64, 0, 0), 10),                       // shared address space (carrier NAT)
    (v4(127, 0, 0, 0), 8),                         // loopback
    (v4(169, 254, 0, 0), 16),                      // link-local (cloud metadata)
    (v4(172, 16, 0, 0), 12),                       // private
    (v4(192, 0, 0, 0), 24),                        // IETF protocol assignments
    (v4(192, 0, 2, 0), 24),                        // documentation (TEST-NET-1)
    (v4(192, 31, 196, 0), 24),                     // AS112-v4
    (v4(192, 52, 193, 0), 24),                     // AMT
    (v4(192, 88, 99, 0), 24),                      // 6to4 relay anycast
    (v4(192, 168, 0, 0), 16),                      // private
    (v4(192, 175, 48, 0), 24),                     // direct delegation AS112
    (v4(198, 18, 0, 0), 15),                       // benchmarking
    (v4(198, 51, 100, 0), 24),                     // documentation (TEST-NET-2)
    (v4(203, 0, 113, 0), 24),                      // documentation (TEST-NET-3)
    (v4(224, 0, 0, 0), 4),                         // multicast
    (v4(240, 0, 0, 0), 4),                         // reserved, and the broadcast address
    (v6(0, 0, 0, 0, 0, 0, 0, 0), 96), // unspecified, loopback, IPv4-compatible (deprecated)
    (v6(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96), // NAT64, well-known prefix
    (v6(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48), // NAT64, local use
    (v6(0x100, 0, 0, 0, 0, 0, 0, 0), 64), // discard-only
    (v6(0x100, 0, 0, 1, 0, 0, 0, 0), 64), // dummy IPv6 prefix
    (v6(0x2001, 0, 0, 0, 0, 0, 0, 0), 23), // IETF protocol assignments (Teredo, ORCHID, benchmarking, ...)
    (v6(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (v6(0x2002, 0, 0, 0, 0, 0, 0, 0), 16), // 6to4
    (v6(0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0), 48), // direct delegation AS112
    (v6(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20), // documentation
    (v6(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16), // segment routing (SRv6) SIDs
    (v6(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),  // unique-local
    (v6(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
    (v6(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10), // site-local (deprecated)
    (v6(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),  // multicast
];

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
}

#[allow(clippy::too_many_arguments)]
const fn v6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h))
}

/// Whether `ip` is an address a plugin reaches only when named explicitly:
/// any address of a special-purpose range ([`SPECIAL_PURPOSE`]: loopback,
/// private, link-local with cloud metadata at 169.254.169.254, shared,
/// unique-local, multicast, broadcast, documentation, benchmarking,
/// unspecified, reserved, and the translation prefixes that carry another
/// address). An IPv4-mapped address counts as the IPv4 address it is.
pub fn is_internal(ip: IpAddr) -> bool {
    // `contains` reads an IPv4-mapped address as the IPv4 address it is.
    SPECIAL_PURPOSE
        .iter()
        .any(|&(base, prefix)| Network { base, prefix }.contains(ip))
}

/// One request as a plugin sent it (to a [`Responder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRequest {
    pub method: String,
    /// `http://host:port/path?query`, as the plugin wrote it.
    pub url: String,
    /// Names lower-cased; values as text (lossy).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An answer given in place of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CannedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Answers granted requests in place of the network: the conformance kit's
/// fixtures. The grants are checked as always; then no name is resolved
/// and nothing is connected. An `Err` is an error the guest sees
/// (`internal-error` with the text).
pub trait Responder: Send + Sync + 'static {
    fn respond(&self, request: SentRequest) -> Result<CannedResponse, String>;
}

/// Largest request body a [`Responder`] is shown.
const MAX_RESPONDER_REQUEST_BYTES: usize = 1024 * 1024;

/// What one plugin's entry grants for outbound HTTP.
pub struct OutboundGrants {
    plugin: Arc<str>,
    origins: Vec<Origin>,
    networks: Vec<Network>,
    timeout: Duration,
    max_response_bytes: u64,
    in_flight: Arc<Semaphore>,
    /// Origins asked for and refused (at most 32), shared by every copy.
    refused: super::noted::Noted,
    observers: Observers,
    /// Answers in place of the network (the kit), if set.
    responder: Option<Arc<dyn Responder>>,
    /// Certificates trusted for `https` besides the system's roots (the
    /// plugin's `http_ca_file`).
    extra_roots: Vec<CertificateDer<'static>>,
    /// The TLS client, built on the first `https` request.
    tls: Arc<OnceLock<Result<Arc<rustls::ClientConfig>, String>>>,
    /// The plugin's secrets, hidden from the host's lines about its
    /// requests.
    secrets: Arc<ConfigValues>,
}

/// The limits of [`OutboundGrants`] besides the origins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundLimits {
    pub timeout: Duration,
    pub max_response_bytes: u64,
    pub max_in_flight: usize,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        OutboundLimits {
            timeout: Duration::from_secs(5),
            max_response_bytes: 1024 * 1024,
            max_in_flight: 4,
        }
    }
}

impl std::fmt::Debug for OutboundGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundGrants")
            .field("origins", &self.origins)
            .field("networks", &self.networks)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OutboundGrants {
    /// Nothing granted: every request is refused.
    pub fn none(plugin: &str) -> Self {
        OutboundGrants::new(
            plugin,
            Vec::new(),
            Vec::new(),
            OutboundLimits::default(),
            Observers::default(),
        )
    }

    pub fn new(
        plugin: &str,
        origins: Vec<Origin>,
        networks: Vec<Network>,
        limits: OutboundLimits,
        observers: Observers,
    ) -> Self {
        OutboundGrants {
            plugin: Arc::from(plugin),
            origins,
            networks,
            timeout: limits.timeout,
            max_response_bytes: limits.max_response_bytes,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            refused: Default::default(),
            observers,
            responder: None,
            extra_roots: Vec::new(),
            tls: Arc::default(),
            secrets: Arc::default(),
        }
    }

    /// The same grants, hiding `secrets` wherever the host writes about
    /// the plugin's requests.
    pub fn redacting(mut self, secrets: Arc<ConfigValues>) -> Self {
        self.secrets = secrets;
        self
    }

    /// The same grants, trusting `roots` for `https` besides the system's.
    pub fn trusting(mut self, roots: Vec<CertificateDer<'static>>) -> Self {
        self.extra_roots = roots;
        self.tls = Arc::default();
        self
    }

    /// The TLS client for `https` origins: the system's roots and the
    /// plugin's own.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.tls
            .get_or_init(|| {
                let mut roots = system_roots().clone();
                roots.add_parsable_certificates(self.extra_roots.iter().cloned());
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|err| format!("TLS: {err}"))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(Arc::new(config))
            })
            .clone()
    }

    /// A copy answered by `responder` instead of the network.
    pub fn answered_by(&self, responder: Arc<dyn Responder>) -> Self {
        OutboundGrants {
            responder: Some(responder),
            ..self.reporting_to(&self.plugin, self.observers.clone())
        }
    }

    /// A copy for plugin `plugin` reporting to `observers` (made when the
    /// plugin loads); it shares the in-flight cap.
    pub fn reporting_to(&self, plugin: &Arc<str>, observers: Observers) -> Self {
        OutboundGrants {
            plugin: plugin.clone(),
            origins: self.origins.clone(),
            networks: self.networks.clone(),
            timeout: self.timeout,
            max_response_bytes: self.max_response_bytes,
            in_flight: self.in_flight.clone(),
            refused: self.refused.clone(),
            observers,
            responder: self.responder.clone(),
            extra_roots: self.extra_roots.clone(),
            tls: self.tls.clone(),
            secrets: self.secrets.clone(),
        }
    }

    pub fn origins(&self) -> &[Origin] {
        &self.origins
    }

    /// Origins the plugin asked for that its grants refused, so far.
    pub fn refused(&self) -> Vec<String> {
        self.refused.list()
    }

    fn address_allowed(&self, origin: &Origin, ip: IpAddr) -> bool {
        origin.literal == Some(ip)
            || !is_internal(ip)
            || self.networks.iter().any(|network| network.contains(ip))
    }

    async fn send(
        self: Arc<Self>,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        deadline: Option<Instant>,
        cut: Arc<AtomicBool>,
        trace: TraceContext,
    ) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
        let started = Instant::now();
        // Kept to name the request if it fails (cheap clones: shared bytes).
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let span = self.trace(&trace, &mut request);
        let result = self.send_checked(request, options, deadline, cut).await;
        if let Some(span) = span {
            match &result {
                Ok((response, _)) => span.end(Ok(response.status().as_u16())),
                Err(err) => span.end(Err(&self.secrets.redact(err.to_string()))),
            }
        }
        let outcome = match &result {
            Ok((response, _)) => OutboundResult::Response(response.status().as_u16()),
            Err(Error::HttpRequestDenied | Error::DestinationIpProhibited) => {
                OutboundResult::Refused
            }
            Err(_) => OutboundResult::Failed,
        };
        if let Err(err) = &result {
            // What the host writes about the request: never its userinfo,
            // its query values or the plugin's secrets.
            let shown = |text: &str, max_bytes: usize| {
                inert(&self.secrets.redact(text.to_string()), max_bytes).into_owned()
            };
            if outcome == OutboundResult::Refused {
                let host = uri.host().unwrap_or("?");
                let host_port = uri
                    .port_u16()
                    .map_or_else(|| host.to_string(), |port| format!("{host}:{port}"));
                self.refused.note(&format!(
                    "{}://{}",
                    uri.scheme_str().unwrap_or("?"),
                    shown(&host_port, 256)
                ));
            }
            let target = shown(&url_without_secrets(&uri.to_string()), 512);
            let err = shown(&err.to_string(), 1024);
            warn!(plugin = %self.plugin, "outbound {method} {target}: {err}");
        }
        self.observers.emit(|| HostEvent::Outbound {
            plugin: self.plugin.clone(),
            result: outcome,
            took: started.elapsed(),
        });
        result
    }

    /// The client span of `request`, under the handled message's `trace`,
    /// and its context in the request's `traceparent` and `tracestate`
    /// headers (which replace the plugin's own). None when the message has
    /// no context and no tracer is configured.
    fn trace(
        &self,
        trace: &TraceContext,
        request: &mut http::Request<WasiBody>,
    ) -> Option<HttpSpan> {
        trace.parent.as_ref()?;
        let uri = request.uri();
        let url = inert(
            &self
                .secrets
                .redact(url_without_secrets(&uri.to_string()).into_owned()),
            512,
        )
        .into_owned();
        let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let span = HttpSpan::start(
            trace,
            &self.plugin,
            request.method().as_str(),
            &url,
            uri.host().unwrap_or(""),
            port,
        );
        let headers = request.headers_mut();
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
        for (name, value) in span.headers().pairs() {
            // Written from the parsed context (trace state: printable ASCII).
            if let Ok(value) = http::HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        Some(span)
    }

    async fn send_checked(
        &self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        deadline: Option<Instant>,
        cut: Arc<AtomicBool>,
    ) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
        let uri = request.uri();
        let tls = match uri.scheme() {
            Some(scheme) if *scheme == http::uri::Scheme::HTTP => false,
            Some(scheme) if *scheme == http::uri::Scheme::HTTPS => true,
            _ => return Err(Error::HttpRequestDenied),
        };
        let authority = uri.authority().ok_or(Error::HttpRequestUriInvalid)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let origin = self
            .origins
            .iter()
            .find(|origin| origin.tls == tls && origin.host == host && origin.port == port)
            .ok_or(Error::HttpRequestDenied)?
            .clone();
        let permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::ConnectionLimitReached)?;

        // The request's time: the grant's timeout, shortened by the guest's
        // own, and never past the event's deadline.
        let now = Instant::now();
        let mut limit = self.timeout;
        if let Some(options) = options {
            for own in [
                options.connect_timeout,
                options.first_byte_timeout,
                options.between_bytes_timeout,
            ]
            .into_iter()
            .flatten()
            {
                limit = limit.min(own);
            }
        }
        let mut end = now + limit;
        let mut at_deadline = false;
        if let Some(deadline) = deadline.map(|d| d + 2 * EPOCH_TICK)
            && deadline <= end
        {
            end = deadline;
            at_deadline = true;
        }
        let expired = |error: Error| {
            if at_deadline {
                cut.store(true, Ordering::Release);
            }
            error
        };
        let end_tokio = tokio::time::Instant::from_std(end);

        if let Some(responder) = &self.responder {
            return self
                .answer(responder.as_ref(), request, end_tokio, permit)
                .await
                .map_err(expired_if(at_deadline, cut));
        }

        // An address granted literally needs no resolution (nor a trip to
        // the resolver's blocking thread).
        let addresses: Vec<SocketAddr> = match origin.literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => tokio::time::timeout_at(
                end_tokio,
                tokio::net::lookup_host((origin.host.as_str(), port)),
            )
            .await
            .map_err(|_| expired(Error::DnsTimeout))?
            .map_err(|_| Error::DestinationNotFound)?
            .collect(),
        };
        let address: SocketAddr = addresses
            .into_iter()
            .find(|address| self.address_allowed(&origin, address.ip()))
            .ok_or(Error::DestinationIpProhibited)?;

        let stream = tokio::time::timeout_at(end_tokio, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| expired(Error::ConnectionTimeout))?
            .map_err(|err| match err.kind() {
                std::io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
                _ => Error::Connect(err),
            })?;
        let (mut sender, io) = if origin.tls {
            let config = self
                .tls_config()
                .map_err(|why| Error::InternalError(Some(why)))?;
            // The name the certificate must carry is the grant's, never a header's.
            let name = match origin.literal {
                Some(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
                None => rustls::pki_types::ServerName::try_from(origin.host.clone())
                    .map_err(|_| Error::HttpRequestUriInvalid)?,
            };
            let stream = tokio::time::timeout_at(
                end_tokio,
                tokio_rustls::TlsConnector::from(config).connect(name, stream),
            )
            .await
            .map_err(|_| expired(Error::ConnectionTimeout))?
            .map_err(tls_error)?;
            handshake(stream, end_tokio).await
        } else {
            handshake(stream, end_tokio).await
        }
        .map_err(|error| match error {
            None => expired(Error::ConnectionTimeout),
            Some(error) => error,
        })?;

        // The origin-form target; the authority stays the granted one.
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|_| Error::HttpRequestUriInvalid)?;
        let request = request.map(settled);
        let response = tokio::time::timeout_at(end_tokio, sender.send_request(request))
            .await
            .map_err(|_| expired(Error::HttpResponseTimeout))?
            .map_err(Error::from)?;
        let (parts, incoming) = response.into_parts();
        let body = Bounded {
            inner: incoming,
            left: self.max_response_bytes,
            end: Box::pin(tokio::time::sleep_until(end_tokio)),
            at_deadline,
            cut,
            _permit: permit,
        };
        let io: IoFuture = Box::new(async move {
            let _ = io.await;
            Ok(())
        });
        Ok((http::Response::from_parts(parts, body.boxed_unsync()), io))
    }
}

impl OutboundGrants {
    /// A [`Responder`]'s answer to a granted request.
    async fn answer(
        &self,
        responder: &dyn Responder,
        request: http::Request<WasiBody>,
        end: tokio::time::Instant,
        permit: OwnedSemaphorePermit,
    ) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
        let (parts, body) = request.into_parts();
        let body = tokio::time::timeout_at(
            end,
            http_body_util::Limited::new(body, MAX_RESPONDER_REQUEST_BYTES).collect(),
        )
        .await
        .map_err(|_| Error::HttpResponseTimeout)?
        .map_err(|_| Error::HttpRequestBodySize(None))?
        .to_bytes();
        let sent = SentRequest {
            method: parts.method.to_string(),
            url: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_string(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        };
        let canned = responder
            .respond(sent)
            .map_err(|why| Error::InternalError(Some(why)))?;
        if canned.body.len() as u64 > self.max_response_bytes {
            return Err(Error::HttpResponseBodySize(Some(self.max_response_bytes)));
        }
        let mut response = http::Response::builder().status(canned.status);
        for (name, value) in &canned.headers {
            response = response.header(name, value);
        }
        let body = http_body_util::Full::new(Bytes::from(canned.body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let response = response
            .body(body)
            .map_err(|err| Error::InternalError(Some(format!("fixture answer: {err}"))))?;
        drop(permit);
        Ok((response, Box::new(async { Ok(()) })))
    }
}

/// An HTTP/1 connection over `stream`, its driver spawned to live no longer
/// than `end`; `None` when the handshake did not finish by then.
async fn handshake<S>(
    stream: S,
    end: tokio::time::Instant,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<WasiBody>,
        tokio::task::JoinHandle<Result<Result<(), hyper::Error>, tokio::time::error::Elapsed>>,
    ),
    Option<Error>,
>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = tokio::time::timeout_at(
        end,
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)),
    )
    .await
    .map_err(|_| None)?
    .map_err(|err| Some(Error::from(err)))?;
    Ok((
        sender,
        tokio::spawn(tokio::time::timeout_at(end, connection)),
    ))
}

/// What a failed TLS handshake is to the guest.
fn tls_error(error: std::io::Error) -> Error {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => Error::TlsCertificateError,
        Some(rustls::Error::AlertReceived(alert)) => Error::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        Some(_) => Error::TlsProtocolError,
        None => Error::Tls(error),
    }
}

/// The system's trusted roots, read once (`rustls-native-certs`); none when
/// the system has none.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        roots
    })
}

/// The certificates of a PEM file (a CA a plugin's `https` origins are
/// signed by); the error names the file.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{}: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// Marks the event's wait as cut when an error ended a wait at its deadline.
fn expired_if(at_deadline: bool, cut: Arc<AtomicBool>) -> impl FnOnce(Error) -> Error {
    move |error| {
        if at_deadline && matches!(error, Error::HttpResponseTimeout) {
            cut.store(true, Ordering::Release);
        }
        error
    }
}

/// The future wasmtime drives alongside a response.
type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// A response body that ends in an error past its size cap or its end.
struct Bounded {
    inner: Incoming,
    left: u64,
    end: Pin<Box<tokio::time::Sleep>>,
    at_deadline: bool,
    cut: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
}

impl Body for Bounded {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.left {
                        return Poll::Ready(Some(Err(Error::HttpResponseBodySize(None))));
                    }
                    self.left -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(Error::from(err)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.end.as_mut().poll(cx).is_ready() {
                    if self.at_deadline {
                        self.cut.store(true, Ordering::Release);
                    }
                    return Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `wasi:http` hooks of one store: its plugin's grants, and the
/// current event's deadline.
pub(crate) struct HttpHooks {
    pub(crate) grants: Arc<OutboundGrants>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) cut: Arc<AtomicBool>,
    /// The handled message's trace context, carried on as headers.
    pub(crate) trace: crate::traces::TraceContext,
    /// Each exchange of the current event, when the plugin records failures.
    pub(crate) tape: super::recording::Tape,
}

impl WasiHttpHooks for HttpHooks {
    fn is_supported_scheme(&mut self, scheme: &http::uri::Scheme) -> bool {
        *scheme == http::uri::Scheme::HTTP || *scheme == http::uri::Scheme::HTTPS
    }

    fn default_scheme(&mut self) -> Option<http::uri::Scheme> {
        Some(http::uri::Scheme::HTTP)
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_error: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), Error>> + Send> {
        let (grants, deadline, cut) = (self.grants.clone(), self.deadline, self.cut.clone());
        let tape = self.tape.clone();
        let slot = tape.request(request.method().as_str(), &request.uri().to_string());
        let sent = grants.send(request, options, deadline, cut, self.trace.clone());
        let Some(slot) = slot else {
            return Box::new(sent);
        };
        Box::new(async move {
            match sent.await {
                Ok((response, io)) => {
                    let headers = response
                        .headers()
                        .iter()
                        .map(|(name, value)| {
                            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                            (name.as_str().to_string(), value)
                        })
                        .collect();
                    tape.answer(slot, Ok((response.status().as_u16(), headers)));
                    let (parts, body) = response.into_parts();
                    let body = Taped {
                        inner: body,
                        tape,
                        slot,
                    }
                    .boxed_unsync();
                    Ok((http::Response::from_parts(parts, body), io))
                }
                Err(err) => {
                    tape.answer(slot, Err(err.to_string()));
                    Err(err)
                }
            }
        })
    }
}

/// A request body as it stands when the request goes out. One the guest
/// finished before sending, empty, becomes no body at all, so hyper writes
/// a DELETE or an empty POST whole, without an empty chunked body and the
/// write of its end (for a GET it assumes none anyway); a body still being
/// written streams as it comes.
fn settled(mut body: WasiBody) -> WasiBody {
    if body.is_end_stream() {
        return body;
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut body).poll_frame(&mut cx) {
        // Polled again, with hyper's waker, when it wants the frame.
        Poll::Pending => body,
        Poll::Ready(None) => http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
        Poll::Ready(Some(first)) => Settled {
            first: Some(first),
            rest: body,
        }
        .boxed_unsync(),
    }
}

/// A body whose first frame was taken by [`settled`].
struct Settled {
    first: Option<Result<Frame<Bytes>, Error>>,
    rest: WasiBody,
}

impl Body for Settled {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// A response body whose data, as the plugin reads it, goes on the tape too.
struct Taped {
    inner: WasiBody,
    tape: super::recording::Tape,
    slot: super::recording::Slot,
}

impl Body for Taped {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.tape.body(self.slot, data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_with_their_default_port_and_anything_else_is_refused() {
        let origin = Origin::parse("http://Rewards.Internal:8080").unwrap();
        assert_eq!(
            (origin.host.as_str(), origin.port),
            ("rewards.internal", 8080)
        );
        assert_eq!(Origin::parse("http://127.0.0.1").unwrap().port, 80);
        assert_eq!(
            Origin::parse("http://127.0.0.1:9/").unwrap().literal,
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            Origin::parse("http://[::1]:8080").unwrap().literal,
            Some("::1".parse().unwrap())
        );
        let secure = Origin::parse("https://rewards.internal").unwrap();
        assert_eq!((secure.tls, secure.port), (true, 443));
        assert_eq!(Origin::parse("https://a:8443").unwrap().port, 8443);
        assert!(!origin.tls);
        for (bad, why) in [
            ("ftp://a", "origin like"),
            ("http://a/path", "no path"),
            ("http://user@a", "no path, query or user"),
            ("http://a:99999", "not a port"),
            ("http://", "no path"),
        ] {
            let err = Origin::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn internal_addresses_are_recognised_in_both_families() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            // Translation prefixes carrying an internal IPv4 address.
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "::127.0.0.1",
            "2002:7f00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            // The rest of the special-purpose registries.
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "192.88.99.1",
            "224.0.0.1",
            "100::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:200::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn networks_contain_what_their_prefix_says() {
        let ten = Network::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains("10.200.1.1".parse().unwrap()));
        assert!(ten.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!ten.contains("11.0.0.1".parse().unwrap()));
        assert!(!ten.contains("fd00::1".parse().unwrap()));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("127.0.0.1".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("10.0.0.0").is_err());
    }

    #[test]
    fn a_name_resolving_inside_is_refused_unless_named_or_its_network_granted() {
        let grants = OutboundGrants::new(
            "p",
            vec![],
            vec![Network::parse("10.0.0.0/8").unwrap()],
            OutboundLimits::default(),
            Observers::default(),
        );
        let by_name = Origin::parse("http://rewards.internal:80").unwrap();
        let literal = Origin::parse("http://127.0.0.1:80").unwrap();
        let loopback = "127.0.0.1".parse().unwrap();
        assert!(!grants.address_allowed(&by_name, loopback));
        assert!(grants.address_allowed(&literal, loopback));
        assert!(grants.address_allowed(&by_name, "10.9.9.9".parse().unwrap()));
        assert!(!grants.address_allowed(&by_name, "169.254.169.254".parse().unwrap()));
        assert!(grants.address_allowed(&by_name, "8.8.8.8".parse().unwrap()));
    }
}
