//! A real S3-compatible server on 127.0.0.1: moto's (`pip install 'moto[server]'`,
//! `moto_server`), for proxies whose `spec.proxy.storage` is `s3`.
//!
//! moto keeps buckets in memory and accepts any credentials (it does not check signatures), so
//! what it proves is Distribution's S3 driver speaking S3 to an endpoint as the rendered config
//! sets it up (region, bucket, root directory, endpoint, path-style requests), not IAM.
//! Path-style only: `BUCKET.127.0.0.1` does not resolve, exactly as `BUCKET.minio.NS.svc`
//! does not in a cluster.

use super::{free_addr, http_request, tempdir, tool, wait_until, Proc};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub struct MotoS3 {
    // Field order: the process dies before its dir is removed.
    proc: Proc,
    addr: String,
    _dir: TempDir,
}

impl MotoS3 {
    /// Same contract as [`tool`]: a SKIP line locally, a panic under `CI=true`.
    pub fn available() -> bool {
        tool("moto_server").is_some()
    }

    /// `moto_server -H 127.0.0.1 -p PORT`, waiting (up to 30 s: a python start) until it lists
    /// buckets.
    pub fn start() -> MotoS3 {
        let bin = tool("moto_server").expect("moto_server: check MotoS3::available() first");
        let addr = free_addr();
        let (host, port) = addr.rsplit_once(':').unwrap();
        let dir = tempdir();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", host, "-p", port]);
        let mut proc = Proc::spawn(&format!("moto@{addr}"), cmd, &dir.path().join("moto.log"));
        proc.wait_ready("GET / lists buckets", Duration::from_secs(30), || {
            http_request("GET", &addr, "/", &[], &[]).ok().filter(|r| r.status == 200)
        });
        MotoS3 { proc, addr, _dir: dir }
    }

    /// `http://127.0.0.1:PORT`: `spec.proxy.storage.s3.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `PUT /BUCKET` (us-east-1: no location constraint). moto takes unsigned requests.
    pub fn create_bucket(&self, bucket: &str) {
        let r = http_request("PUT", &self.addr, &format!("/{bucket}"), &[], &[])
            .unwrap_or_else(|e| panic!("PUT /{bucket} on moto: {e}"));
        assert_eq!(r.status, 200, "create bucket {bucket}: {}", r.text());
    }

    /// Object keys under `prefix` (no leading slash; Distribution's `rootdirectory` without its
    /// first `/`), following ListObjectsV2's continuation tokens.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{bucket}?list-type=2&max-keys=1000&prefix={}", encode(prefix));
            if let Some(t) = &token {
                path.push_str(&format!("&continuation-token={}", encode(t)));
            }
            let r = http_request("GET", &self.addr, &path, &[], &[])
                .unwrap_or_else(|e| panic!("list {bucket} on moto: {e}"));
            assert_eq!(r.status, 200, "list {bucket}: {}", r.text());
            let xml = r.text();
            keys.extend(elements(&xml, "Key"));
            token = elements(&xml, "NextContinuationToken").into_iter().next();
            if token.is_none() {
                return keys;
            }
        }
    }

    /// Waits until `prefix` holds at least `min` keys that contain `part` (blob writes land a
    /// moment after the response that triggered them).
    pub fn wait_keys(&self, bucket: &str, prefix: &str, part: &str, min: usize, timeout: Duration) -> Vec<String> {
        let started = Instant::now();
        wait_until(timeout, || {
            let keys: Vec<String> = self.keys(bucket, prefix).into_iter().filter(|k| k.contains(part)).collect();
            (keys.len() >= min).then_some(keys)
        })
        .unwrap_or_else(|| {
            panic!(
                "s3://{bucket}/{prefix}: fewer than {min} keys with {part:?} after {:?}: {:?}",
                started.elapsed(),
                self.keys(bucket, prefix)
            )
        })
    }

    /// moto's own log (one line per S3 request).
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// The text of every `<name>...</name>` element (no nesting, no attributes: ListObjectsV2).
fn elements(xml: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(unescape(&after[..end]));
        rest = &after[end + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
