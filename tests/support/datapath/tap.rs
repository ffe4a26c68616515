//! A TCP tap between a proxy and its upstream: forwards bytes and counts those coming *from* the
//! upstream, and can be switched to misbehave the way real networks do.
//!
//! The proxies' `remoteURL` points at the tap, so tests and the bench can measure upstream bytes
//! per pull, and make the upstream "blackholed" (connections accepted, nothing ever answered —
//! what a dropped route or a stuck load balancer looks like) without touching the registry.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapMode {
    /// Forward both ways.
    Forward = 0,
    /// Accept, read and discard, never answer.
    Blackhole = 1,
}

struct Shared {
    target: String,
    mode: AtomicU8,
    from_upstream: AtomicU64,
    connections: AtomicU64,
    stop: AtomicBool,
    /// Client sides of the connections, so a dropped tap ends them as a dead server would.
    open: Mutex<Vec<TcpStream>>,
}

pub struct Tap {
    addr: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Listens on a free 127.0.0.1 port and forwards to `target` (`host:port`).
    pub fn start(target: &str) -> Tap {
        Tap::start_on("127.0.0.1:0", target)
    }

    /// [`Tap::start`] on `addr` (a dropped tap's address again: "the upstream is back").
    pub fn start_on(addr: &str, target: &str) -> Tap {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tap on {addr}: {e}"));
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            target: target.to_string(),
            mode: AtomicU8::new(TapMode::Forward as u8),
            from_upstream: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                s.connections.fetch_add(1, Ordering::Relaxed);
                if let Ok(c) = conn.try_clone() {
                    s.open.lock().unwrap().push(c);
                }
                let s = s.clone();
                std::thread::spawn(move || handle(&s, conn));
            }
        });
        Tap { addr, shared, thread: Some(thread) }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes received from the upstream so far (response headers and bodies).
    pub fn bytes_from_upstream(&self) -> u64 {
        self.shared.from_upstream.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Applies at once, also to open (kept-alive) connections.
    pub fn set_mode(&self, mode: TapMode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        for conn in self.shared.open.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(shared: &Arc<Shared>, mut client: TcpStream) {
    if shared.mode.load(Ordering::SeqCst) == TapMode::Blackhole as u8 {
        // Hold the connection open and swallow the request until the peer gives up (or the
        // tap is dropped and the test process moves on).
        let _ = client.set_read_timeout(Some(Duration::from_secs(600)));
        let mut sink = [0u8; 4096];
        while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
        return;
    }
    let Ok(upstream) = TcpStream::connect(&shared.target) else {
        // Upstream down: the client sees the connection closed at once, as with a refusal.
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let s = shared.clone();
    let up = std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Kept-alive connections go dark too: requests are swallowed, so nothing answers.
            if s.mode.load(Ordering::SeqCst) == TapMode::Blackhole as u8 {
                continue;
            }
            if u_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = u_read.read(&mut buf) {
        if n == 0 {
            break;
        }
        shared.from_upstream.fetch_add(n as u64, Ordering::SeqCst);
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
}
