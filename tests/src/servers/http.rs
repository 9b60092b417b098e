//! HTTP/1.1 servers: [`HttpServer`] answers every request with a fixed 200;
//! [`RawHttpServer`] answers with whatever bytes a test gives it. [`gzip`]
//! and [`zlib`] make encoded bodies for hostile answers.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

/// A minimal HTTP/1.1 server on a loopback address: answers every request with
/// `body`, closing the connection.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    /// Each request's line and headers, as received.
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl HttpServer {
    pub fn start(ip: &str, body: &'static str) -> HttpServer {
        let l =
            TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind http server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = requests.clone();
        let h = heads.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let r = r.clone();
                let h = h.clone();
                thread::spawn(move || {
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut line = String::new();
                    let mut head = String::new();
                    // Request line and headers up to the blank line.
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" || line == "\n" => break,
                            Ok(_) => head.push_str(&line),
                        }
                    }
                    h.lock().unwrap().push(head);
                    r.fetch_add(1, Ordering::SeqCst);
                    let mut s = s;
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    );
                });
            }
        });
        HttpServer {
            addr,
            requests,
            heads,
        }
    }
}

/// An HTTP/1.1 upstream on a loopback address that answers each request
/// with the raw bytes `respond(head)` returns (a hostile upstream: any status
/// line, encoding or trailer), then closes the connection.
pub struct RawHttpServer {
    pub addr: SocketAddr,
    /// Each request's line and headers, as received.
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawHttpServer {
    pub fn start(ip: &str, respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let l = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("bind raw http server on {ip}: {e}"));
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = heads.clone();
        let respond = Arc::new(respond);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (h, respond) = (h.clone(), respond.clone());
                thread::spawn(move || {
                    let mut reader = BufReader::new(s.try_clone().unwrap());
                    let mut head = String::new();
                    let mut line = String::new();
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
                    let mut s = s;
                    let _ = s.write_all(&answer);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    // Let the agent read to the end before the socket closes.
                    let _ = reader.read_to_end(&mut Vec::new());
                });
            }
        });
        RawHttpServer { addr, heads }
    }
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
