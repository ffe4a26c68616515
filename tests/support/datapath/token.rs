//! A private upstream registry the way Docker Hub is one: Distribution with `auth: token`, and a
//! tiny Bearer-token service (std only, plus `ring` for the ES256 signature) that hands out JWTs
//! only for valid Basic credentials.
//!
//! Why a token service at all: Distribution 2.8 in proxy mode sends its upstream credentials
//! (`REGISTRY_PROXY_USERNAME`/`PASSWORD`) only to Bearer-token realms it saw at start-up; a
//! Basic-auth upstream never gets them. Docker Hub, GHCR and Harbor all use token auth.
//!
//! What Distribution 2.8's `auth.token` checks (registry/auth/token/token.go), and so what
//! [`TokenServer`] emits:
//! * header `alg: ES256` and `x5c: [leaf DER]`; the leaf must verify against `rootcertbundle`
//!   (here the self-signed issuer certificate itself);
//! * claims `iss` == `issuer`, `aud` == `service`, `nbf` <= now < `exp`, and `access` listing the
//!   repository and actions the request needs.
//!
//! Every token request is recorded (user, scope, granted), so tests can prove *whose*
//! credentials reached the upstream.

use crate::support::{free_addr, free_addr_on, registry_config, require, run_ok, tempdir, Registry};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;

pub const TOKEN_SERVICE: &str = "mirrorfleet-test-upstream";
pub const TOKEN_ISSUER: &str = "mirrorfleet-test-token-issuer";

/// One request to the token endpoint, as the server judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic user, `None` when the request carried no credentials.
    pub user: Option<String>,
    /// The `scope` parameters, as sent (`repository:library/x:pull`).
    pub scopes: Vec<String>,
    /// Whether a token was issued (401 otherwise).
    pub granted: bool,
}

struct Shared {
    users: Vec<(String, String)>,
    key: EcdsaKeyPair,
    x5c: String,
    log: Mutex<Vec<TokenRequest>>,
    stop: AtomicBool,
    next_id: AtomicU64,
}

pub struct TokenServer {
    addr: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    cert_path: PathBuf,
    _dir: TempDir,
}

impl TokenServer {
    /// Starts the token service on a free port of 127.0.0.1; only `users` get tokens.
    pub fn start(users: &[(&str, &str)]) -> TokenServer {
        TokenServer::start_on("127.0.0.1", users)
    }

    /// [`TokenServer::start`] on `ip` (the real node's address, so pods reach the realm).
    pub fn start_on(ip: &str, users: &[(&str, &str)]) -> TokenServer {
        let openssl = require("openssl");
        let dir = tempdir();
        let (key_pem, key_der, cert_pem) =
            (dir.path().join("key.pem"), dir.path().join("key.p8"), dir.path().join("issuer.crt"));
        let t = Duration::from_secs(30);
        run_ok(
            Command::new(&openssl).args(["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out"]).arg(&key_pem),
            t,
        );
        // ring reads PKCS#8 (with the public key, which openssl includes).
        run_ok(
            Command::new(&openssl)
                .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
                .arg(&key_pem)
                .arg("-out")
                .arg(&key_der),
            t,
        );
        run_ok(
            Command::new(&openssl)
                .args(["req", "-x509", "-days", "2", "-subj", "/CN=mirrorfleet test token issuer", "-key"])
                .arg(&key_pem)
                .arg("-out")
                .arg(&cert_pem),
            t,
        );
        let cert_der = run_ok(Command::new(&openssl).args(["x509", "-outform", "DER", "-in"]).arg(&cert_pem), t).stdout;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &fs::read(&key_der).unwrap(),
            &SystemRandom::new(),
        )
        .expect("ring reads the openssl PKCS#8 key");
        let shared = Arc::new(Shared {
            users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            key,
            x5c: base64::engine::general_purpose::STANDARD.encode(cert_der),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        let listener = TcpListener::bind((ip, 0)).expect("bind token server");
        let addr = listener.local_addr().unwrap().to_string();
        let worker = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if worker.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let w = worker.clone();
                std::thread::spawn(move || {
                    let _ = serve(&w, stream);
                });
            }
        });
        eprintln!("token server on {addr}");
        TokenServer { addr, shared, thread: Some(thread), cert_path: cert_pem, _dir: dir }
    }

    /// `http://127.0.0.1:PORT/token`: the realm in the upstream's `WWW-Authenticate`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The issuer certificate (PEM): the upstream's `rootcertbundle`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Every token request so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The `auth:` section for a Distribution config that trusts this service.
    pub fn registry_auth_section(&self) -> String {
        self.registry_auth_section_with_realm(&self.realm())
    }

    /// [`TokenServer::registry_auth_section`] announcing `realm` (a [`Front`]'s `/token`).
    pub fn registry_auth_section_with_realm(&self, realm: &str) -> String {
        format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {cert}\n",
            cert = self.cert_path.display()
        )
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(shared: &Shared, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> =
        query.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), percent_decode(v))).collect();
    let scopes: Vec<String> = params.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.clone()).collect();
    let user = authorization.as_deref().and_then(basic_credentials);
    let valid = user.as_ref().is_some_and(|(u, p)| shared.users.iter().any(|(uu, pp)| uu == u && pp == p));
    shared.log.lock().unwrap().push(TokenRequest {
        user: user.as_ref().map(|(u, _)| u.clone()),
        scopes: scopes.clone(),
        granted: valid && path == "/token",
    });
    let mut stream = stream;
    if path != "/token" {
        return respond(&mut stream, "404 Not Found", "{}");
    }
    if !valid {
        return respond(&mut stream, "401 Unauthorized", r#"{"details":"credentials required"}"#);
    }
    let token = sign_token(shared, &user.unwrap().0, &scopes);
    let body = format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#);
    respond(&mut stream, "200 OK", &body)
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn basic_credentials(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An ES256 JWT granting every requested action on every requested scope.
fn sign_token(shared: &Shared, user: &str, scopes: &[String]) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            // type:name:actions, where the name may not contain ':' but the list is comma-separated.
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [shared.x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user,
        "aud": TOKEN_SERVICE,
        "exp": now + 300,
        "nbf": now - 30,
        "iat": now,
        "jti": shared.next_id.fetch_add(1, Ordering::Relaxed).to_string(),
        "access": access,
    });
    let signing_input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let signature = shared.key.sign(&SystemRandom::new(), signing_input.as_bytes()).expect("ES256 signing");
    format!("{signing_input}.{}", b64(signature.as_ref()))
}

/// Distribution with token auth in front of its own storage: the stand-in for a private
/// (credentials-required) upstream. Derefs to [`Registry`]; owns its [`TokenServer`].
pub struct AuthUpstream {
    registry: Registry,
    token: TokenServer,
    storage: TempDir,
    user: (String, String),
    front: Option<Front>,
}

/// One host:port for a registry and its token service: `/token...` goes to the token service,
/// everything else to the registry, one request per connection (the front answers
/// `Connection: close`), and every request is recorded with the client's IP, which the registry
/// behind it no longer sees. Requests with a body are not supported (push to the registry).
pub struct Front {
    addr: String,
    log: Arc<Mutex<Vec<(String, String)>>>,
    /// Set: registry requests are answered with this status (and a rate limit's headers)
    /// instead of forwarded; token requests still go through.
    fault: Arc<Mutex<Option<u16>>>,
}

impl Front {
    pub fn start(public: &str, registry: &str, token: &str) -> Front {
        let listener = TcpListener::bind(public).expect("bind the front");
        let log: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let fault: Arc<Mutex<Option<u16>>> = Arc::default();
        let (registry, token, record, faulty) = (registry.to_string(), token.to_string(), log.clone(), fault.clone());
        eprintln!("front for {registry} and {token} on {public}");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (registry, token, record, fault) =
                    (registry.clone(), token.clone(), record.clone(), faulty.clone());
                std::thread::spawn(move || {
                    let fault = *fault.lock().unwrap();
                    let _ = forward(stream, &registry, &token, &record, fault);
                });
            }
        });
        Front { addr: public.to_string(), log, fault }
    }
}

fn forward(
    client: TcpStream,
    registry: &str,
    token: &str,
    log: &Mutex<Vec<(String, String)>>,
    fault: Option<u16>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let peer = client.peer_addr()?.ip().to_string();
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut head = request_line.clone();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if !line.to_ascii_lowercase().starts_with("connection:") {
            head.push_str(&line);
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    let path = request_line.split_whitespace().nth(1).unwrap_or_default();
    log.lock().unwrap().push((peer, request_line.trim_end().to_string()));
    if let Some(status) = fault.filter(|_| !path.starts_with("/token")) {
        let body = format!("{{\"errors\":[{{\"code\":\"TOOMANYREQUESTS\",\"message\":\"status {status}\"}}]}}");
        let mut client = client;
        write!(
            client,
            "HTTP/1.1 {status} Fault\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             RateLimit-Limit: 100;w=21600\r\nRateLimit-Remaining: 0;w=21600\r\nRetry-After: 60\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return client.shutdown(std::net::Shutdown::Both);
    }
    let mut backend = TcpStream::connect(if path.starts_with("/token") { token } else { registry })?;
    backend.write_all(head.as_bytes())?;
    let mut client = client;
    std::io::copy(&mut backend, &mut client)?;
    client.shutdown(std::net::Shutdown::Both)
}

impl AuthUpstream {
    /// `user`/`password` are the only credentials that get tokens.
    pub fn start(user: &str, password: &str) -> AuthUpstream {
        let token = TokenServer::start(&[(user, password)]);
        let storage = tempdir();
        let config = format!("{}{}", registry_config(&free_addr(), storage.path()), token.registry_auth_section());
        let registry = Registry::start(&config);
        AuthUpstream { registry, token, storage, user: (user.into(), password.into()), front: None }
    }

    /// [`AuthUpstream::start`] behind a [`Front`] on `ip` (the real node's address, which pods
    /// reach): the registry and its token realm on one host:port, as Docker Hub's, GHCR's and
    /// Harbor's are. Distribution 3.1 proxies send upstream credentials to no other realm when
    /// the upstream is an IP literal.
    pub fn start_on(ip: &str, user: &str, password: &str) -> AuthUpstream {
        let token = TokenServer::start(&[(user, password)]);
        let storage = tempdir();
        let public = free_addr_on(ip);
        let realm = format!("http://{public}/token");
        let config = format!(
            "{}{}",
            registry_config(&free_addr(), storage.path()),
            token.registry_auth_section_with_realm(&realm)
        );
        let registry = Registry::start(&config);
        let front = Front::start(&public, registry.addr(), token.addr());
        AuthUpstream { registry, token, storage, user: (user.into(), password.into()), front: Some(front) }
    }

    /// Registry requests through the [`Front`] answered with `status` (and Docker Hub's rate-limit
    /// headers: limit 100 per 6 h, none left, retry after 60 s) until set to None.
    pub fn answer_with(&self, status: Option<u16>) {
        *self.front.as_ref().expect("an upstream with a front").fault.lock().unwrap() = status;
    }

    /// The address clients use: the [`Front`]'s when there is one, else the registry's.
    pub fn public_addr(&self) -> &str {
        self.front.as_ref().map_or(self.registry.addr(), |f| f.addr.as_str())
    }

    /// Requests that came through the [`Front`]: (client IP, request line), in order.
    pub fn front_requests(&self) -> Vec<(String, String)> {
        self.front.as_ref().map(|f| f.log.lock().unwrap().clone()).unwrap_or_default()
    }

    pub fn token_server(&self) -> &TokenServer {
        &self.token
    }

    pub fn storage(&self) -> &Path {
        self.storage.path()
    }

    /// Pushes an OCI layout as `library/<name>:<tag>` with the upstream's credentials.
    pub fn push(&self, oci_layout: &Path, tag: &str) {
        crate::support::push_image(oci_layout, tag, self.addr(), Some((&self.user.0, &self.user.1)));
    }

    /// Starts the registry again on the same address, storage and token service (after
    /// [`Registry::stop`]), for "the upstream comes back" scenarios.
    pub fn restart(&mut self) {
        let config = fs::read_to_string(self.registry.config_path()).unwrap();
        self.registry = Registry::start(&config);
    }
}

impl Deref for AuthUpstream {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.registry
    }
}

impl DerefMut for AuthUpstream {
    fn deref_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
}
