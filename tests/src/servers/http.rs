//! HTTP/1.1 servers: [`RawHttpServer`] answers with whatever bytes a test
//! gives it; [`HttpServer`] (a fixed 200) and [`webhook_receiver`] are built
//! on it. [`gzip`] and [`zlib`] make encoded bodies for hostile answers.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
};

/// An HTTP/1.1 upstream on a loopback address that answers each request
/// with the raw bytes `respond(head)` returns (a hostile upstream: any status
/// line, encoding or trailer), then closes the connection.
pub struct RawHttpServer {
    pub addr: SocketAddr,
    /// Each request's line and headers, as received.
    pub heads: Arc<Mutex<Vec<String>>>,
    /// Each request's body (`Content-Length` bytes), as text.
    pub bodies: Arc<Mutex<Vec<String>>>,
}

impl RawHttpServer {
    pub fn start(ip: &str, respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let l = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("bind raw http server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (h, b) = (heads.clone(), bodies.clone());
        let respond = Arc::new(respond);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (h, b, respond) = (h.clone(), b.clone(), respond.clone());
                thread::spawn(move || {
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut head = String::new();
                    let mut line = String::new();
                    // Request line and headers up to the blank line.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => head.push_str(&line),
                        }
                    }
                    // Read a request body, so closing does not reset.
                    let len = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    let _ = reader.read_exact(&mut body);
                    let answer = respond(&head);
                    h.lock().unwrap().push(head);
                    b.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&body).into_owned());
                    let mut s = s;
                    let _ = s.write_all(&answer);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    // Let the agent read to the end before the socket closes.
                    let _ = reader.read_to_end(&mut Vec::new());
                });
            }
        });
        RawHttpServer {
            addr,
            heads,
            bodies,
        }
    }
}

/// A minimal HTTP/1.1 server on a loopback address: answers every request with
/// `body`, closing the connection.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    /// Each request's line and headers, as received.
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    pub fn start(ip: &str, body: &'static str) -> HttpServer {
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        let raw = RawHttpServer::start(ip, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            )
            .into_bytes()
        });
        HttpServer {
            addr: raw.addr,
            requests,
            heads: raw.heads,
        }
    }
}

/// A webhook receiver on `ip`: answers the first `fail_first` POSTs with 500,
/// the rest with 200, and keeps every body. Returns the webhook URL (`path` on
/// the receiver) and the bodies.
pub fn webhook_receiver(
    ip: &str,
    path: &str,
    fail_first: usize,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = AtomicUsize::new(0);
    let hook = RawHttpServer::start(ip, move |_| {
        let status = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
            "500 Internal Server Error"
        } else {
            "200 OK"
        };
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
    });
    (format!("http://{}{path}", hook.addr), hook.bodies)
}

/// `data` gzip-compressed.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` zlib-compressed (HTTP's `deflate`).
pub fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}
