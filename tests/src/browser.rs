//! Headless Chromium driven over WebDriver: Debian's `chromium` and
//! `chromedriver` (scripts/install-debian-packages.sh), on a free loopback
//! port, with a profile in a temporary folder. Stopped on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// A browser session.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub fn start() -> Result<Browser> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "start /usr/bin/chromedriver (scripts/install-debian-packages.sh installs it)",
            )?;
        let profile = tempfile::tempdir()?;
        let started = Instant::now();
        loop {
            if let Ok((_, status)) = request(port, "GET", "/status", None)
                && status["value"]["ready"] == true
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = driver.kill();
                bail!("chromedriver did not get ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // This machine's network is closed: no background traffic.
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,640",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let (code, reply) = match request(port, "POST", "/session", Some(&capabilities)) {
            Ok(answer) => answer,
            Err(err) => {
                let _ = driver.kill();
                return Err(err);
            }
        };
        let Some(session) = reply["value"]["sessionId"].as_str().map(str::to_string) else {
            let _ = driver.kill();
            bail!("no browser session ({code}): {reply}");
        };
        Ok(Browser {
            driver,
            port,
            session,
            _profile: profile,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (code, reply) = request(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )?;
        if code >= 400 {
            bail!("{method} {path}: {code} {reply}");
        }
        Ok(reply["value"].clone())
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(&json!({ "url": url })))?;
        Ok(())
    }

    /// The text of the first element matching `css`, `None` if there is none.
    pub fn text(&self, css: &str) -> Result<Option<String>> {
        self.read(css, "text")
    }

    /// The attribute `name` of the first element matching `css`.
    pub fn attribute(&self, css: &str, name: &str) -> Result<Option<String>> {
        self.read(css, &format!("attribute/{name}"))
    }

    /// Clicks the first element matching `css` (found again if the page
    /// re-rendered it meanwhile); `false` if there is none.
    pub fn click(&self, css: &str) -> Result<bool> {
        for _ in 0..10 {
            let Some(element) = self.find(css)? else {
                return Ok(false);
            };
            match self.call(
                "POST",
                &format!("/element/{element}/click"),
                Some(&json!({})),
            ) {
                Ok(_) => return Ok(true),
                Err(err) if err.to_string().contains("stale element reference") => continue,
                Err(err) => return Err(err),
            }
        }
        bail!("{css}: the element went stale ten times in a row")
    }

    /// `GET /element/<id>/<what>` of the first element matching `css`. The
    /// page re-renders itself every 2 s, so the element found may be gone
    /// by the time it is read ("stale element reference"): then it is
    /// found again.
    fn read(&self, css: &str, what: &str) -> Result<Option<String>> {
        for _ in 0..10 {
            let Some(element) = self.find(css)? else {
                return Ok(None);
            };
            match self.call("GET", &format!("/element/{element}/{what}"), None) {
                Ok(value) => return Ok(value.as_str().map(str::to_string)),
                Err(err) if err.to_string().contains("stale element reference") => continue,
                Err(err) => return Err(err),
            }
        }
        bail!("{css}: the element went stale ten times in a row")
    }

    /// The WebDriver id of the first element matching `css`.
    fn find(&self, css: &str) -> Result<Option<String>> {
        let found = request(
            self.port,
            "POST",
            &format!("/session/{}/element", self.session),
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        let Some(element) = found.1["value"]
            .as_object()
            .and_then(|object| object.values().next())
            .and_then(Value::as_str)
            .filter(|_| found.0 < 400)
        else {
            return Ok(None);
        };
        Ok(Some(element.to_string()))
    }

    /// Waits up to `timeout` for the text at `css` to satisfy `done`; the
    /// last text seen.
    pub fn wait_for_text(
        &self,
        css: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(bool, Option<String>)> {
        let started = Instant::now();
        loop {
            let text = self.text(css)?;
            if text.as_deref().is_some_and(&done) {
                return Ok((true, text));
            }
            if started.elapsed() > timeout {
                return Ok((false, text));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Resizes the window (headless: any size).
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.call(
            "POST",
            "/window/rect",
            Some(&json!({"width": width, "height": height})),
        )?;
        Ok(())
    }

    /// A PNG of the window.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        use base64::Engine as _;
        let data = self.call("GET", "/screenshot", None)?;
        let data = data.as_str().context("a screenshot")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A PNG of `text` as a terminal shows it (a program's own output, for the
/// docs), the window sized to fit it.
pub fn picture_of_text(text: &str) -> Result<Vec<u8>> {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let page = format!(
        "<!doctype html><meta charset=utf-8><body style=\"margin:0;overflow:hidden;background:#1e1e1e\">\
         <pre style=\"margin:0;padding:12px;color:#ddd;font:12px/15px monospace\">{escaped}</pre>"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("text.html");
    std::fs::write(&path, page)?;
    let lines = u32::try_from(text.lines().count()).unwrap_or(u32::MAX);
    let widest = text
        .lines()
        .map(|line| line.chars().count())
        .max()
        .unwrap_or(0);
    let browser = Browser::start()?;
    browser.resize(
        u32::try_from(widest * 8 + 40)
            .unwrap_or(1400)
            .clamp(400, 1600),
        // The window's height holds the page and the browser's own frame.
        lines.saturating_mul(15).saturating_add(160).min(8000),
    )?;
    browser.goto(&format!("file://{}", path.display()))?;
    browser.screenshot()
}

/// One WebDriver request: (status code, JSON reply).
fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open: read the head, then the
    // body by its length (or its chunks).
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(at) = reply.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("the WebDriver connection closed before a reply");
        }
        reply.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&reply[..split]).to_ascii_lowercase();
    let length = head.lines().find_map(|line| {
        line.strip_prefix("content-length:")
            .and_then(|n| n.trim().parse::<usize>().ok())
    });
    let chunked_reply = head.contains("transfer-encoding: chunked");
    loop {
        let body = &reply[split + 4..];
        let complete = match length {
            Some(length) => body.len() >= length,
            None if chunked_reply => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let mut body = reply[split + 4..].to_vec();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("a status code")?;
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    let value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .with_context(|| format!("a JSON reply: {}", String::from_utf8_lossy(&body)))?
    };
    Ok((code, value))
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..end])
            .ok()
            .and_then(|size| usize::from_str_radix(size.trim(), 16).ok());
        let rest = &body[end + 2..];
        match size {
            Some(size) if size > 0 && rest.len() >= size => {
                out.extend_from_slice(&rest[..size]);
                body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
            }
            _ => break,
        }
    }
    out
}
