//! A deliberately tiny HTTP/1.1 client (one request per connection,
//! `Connection: close`) so tier-2 tests need no HTTP crate. It understands
//! exactly what registries, Envoy and its admin API send back: a status line,
//! headers, and a body delimited by Content-Length, chunked encoding or EOF.

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// In wire order, names as sent (look up with [`HttpResponse::header`]).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header with this name, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `Basic <base64(user:pass)>`, the value for an `Authorization` header.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Sends one request and reads the whole response.
///
/// `addr` is anything printable as `host:port` (a `SocketAddr`, `&str`,
/// `String`). A `Host` header defaults to `addr` unless `headers` has one,
/// which is how tests exercise Envoy's Host-based routing.
pub fn http_request(
    method: &str,
    addr: impl Display,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let addr = addr.to_string();
    let sock =
        addr.to_socket_addrs()?.next().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_write_timeout(Some(Duration::from_secs(15)))?;

    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\nUser-Agent: mirrorfleet-tier2\r\n\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head_request: bool) -> io::Result<HttpResponse> {
    let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, msg.to_string());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut resp = HttpResponse { status, headers, body: Vec::new() };
    let rest = &raw[split + 4..];
    // HEAD, 1xx, 204 and 304 carry no body even when Content-Length is set.
    if head_request || status < 200 || status == 204 || status == 304 {
        return Ok(resp);
    }
    resp.body = if resp.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        decode_chunked(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(len) = resp.header("content-length").and_then(|l| l.parse().ok()) {
        rest[..rest.len().min(len)].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(resp)
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..eol]).ok()?;
        // Chunk extensions (";name=value") are legal and ignored.
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// GET that panics (with the address) on transport errors; HTTP error
/// statuses are returned normally for the test to assert on.
pub fn http_get(addr: impl Display, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let addr = addr.to_string();
    http_request("GET", &addr, path, headers, &[]).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Polls `GET path` until any HTTP response (whatever its status) arrives,
/// i.e. until something is serving HTTP on `addr`. Err carries the last
/// transport error.
pub fn wait_http(addr: impl Display, path: &str, timeout: Duration) -> Result<HttpResponse, String> {
    let addr = addr.to_string();
    let mut last_err = String::from("never tried");
    super::wait_until(timeout, || match http_request("GET", &addr, path, &[], &[]) {
        Ok(r) => Some(r),
        Err(e) => {
            last_err = e.to_string();
            None
        }
    })
    .ok_or_else(|| format!("no HTTP answer from {addr}{path} within {timeout:?}: {last_err}"))
}

/// `GET http://127.0.0.1:{port}{path}`: (status, body), or None when nothing answers (an
/// operator's admin server that is not up yet, or gone).
pub fn get_local(port: u16, path: &str) -> Option<(u16, String)> {
    let r = http_request("GET", format!("127.0.0.1:{port}"), path, &[], &[]).ok()?;
    Some((r.status, r.text()))
}
