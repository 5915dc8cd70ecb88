//! A small HTTP server on 127.0.0.1 for plugins' outbound requests: it
//! records each request and answers as a test asks (or never, or slowly).

use std::sync::Arc;

/// How the loopback server answers.
#[derive(Clone, Copy)]
pub enum Answer {
    /// 200 with this body.
    Ok(&'static str),
    /// 200 with a body of this many bytes.
    Large(usize),
    /// Accepts, reads the request, never answers.
    Never,
    /// Sends a head promising 1 MB, then a byte every 100 ms.
    Trickle,
}

/// A loopback HTTP server recording each request's head and body.
pub struct Server {
    pub addr: std::net::SocketAddr,
    /// Over TLS ([`Server::start_tls`]).
    secure: bool,
    requests: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    /// Its own runtime, so a server serves plain and async tests alike.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn start(answer: Answer) -> Server {
        Self::serve(answer, None)
    }

    /// The same server over TLS, its certificate (for `127.0.0.1` and
    /// `localhost`) signed by a CA made for it; returns the CA's PEM too.
    pub fn start_tls(answer: Answer) -> (Server, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mqplug test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (Self::serve(answer, Some(acceptor)), ca.pem())
    }

    fn serve(answer: Answer, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Bound here, without entering the runtime: a test may already be
        // running in one.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let secure = tls.is_some();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, tls) = (seen.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => answer_one(stream, answer, seen).await,
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                answer_one(stream, answer, seen).await;
                            }
                        }
                    }
                });
            }
        });
        Server {
            addr,
            secure,
            requests,
            runtime: Some(runtime),
        }
    }

    pub fn origin(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stops the server's tasks with its runtime, also when a test fails
        // (and from inside an async test, where a blocking drop would panic).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Reads one request (head and body) from `stream`, records it, and
/// answers as told.
async fn answer_one<S>(
    mut stream: S,
    answer: Answer,
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body) = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let chunked = head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked");
            if body.len() >= length && (!chunked || body.ends_with("0\r\n\r\n")) {
                break (head.to_string(), body.to_string());
            }
        }
    };
    seen.lock().unwrap().push((head, body));
    match answer {
        Answer::Ok(text) => {
            let _ = stream
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
        Answer::Large(n) => {
            let _ = stream
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").as_bytes())
                .await;
            let _ = stream.write_all(&vec![b'x'; n]).await;
        }
        Answer::Never => {
            std::future::pending::<()>().await;
        }
        Answer::Trickle => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                .await;
            loop {
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
