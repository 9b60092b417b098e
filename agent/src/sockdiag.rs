//! Asking the kernel about a TCP socket by its 4-tuple (`NETLINK_SOCK_DIAG`,
//! `inet_diag` exact lookups), in the agent's own network namespace.
//!
//! Two questions the proxy asks:
//! - **is the loop's socket still the one that made this record?** The lookup
//!   carries the record's socket cookie; the kernel answers `ESTALE` when the
//!   socket holding that 4-tuple has another cookie, and `ENOENT` when no
//!   socket holds it. Only an exact match serves the connection.
//! - **who would receive a connection to this address?** A lookup with a
//!   made-up peer falls through the established table to the listener that a
//!   SYN would reach; its `INET_DIAG_CGROUP_ID` says which cgroup created it
//!   (accepted sockets inherit their listener's cgroup).
//!
//! Lookups are synchronous (the kernel answers inside `sendmsg`) and use one
//! netlink socket per thread.

use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

/// `INET_DIAG_CGROUP_ID` (Linux 5.7+): the socket's cgroup v2 id.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `INET_DIAG_NOCOOKIE`: match whatever socket holds the 4-tuple.
const NO_COOKIE: [u8; 8] = [0xff; 8];

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("sock_diag answer could not be decoded: {0}")]
    Decode(String),
    #[error("sock_diag: {0}")]
    Kernel(std::io::Error),
}

/// What the kernel said about the socket holding a 4-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    pub cookie: u64,
    /// TCP state (`TCP_ESTABLISHED` = 1, `TCP_LISTEN` = 10, ...).
    pub state: u8,
    /// cgroup v2 id of the socket (0 when the kernel did not say).
    pub cgroup_id: u64,
    /// The socket's owner uid.
    pub uid: u32,
}

thread_local! {
    static SOCK: RefCell<Option<(Socket, u32)>> = const { RefCell::new(None) };
}

fn cookie_bytes(cookie: u64) -> [u8; 8] {
    // `__u32 idiag_cookie[2]`: low word first, each in host order.
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    b[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    b
}

fn cookie_value(b: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let hi = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]) as u64;
    lo | (hi << 32)
}

/// The socket whose local end is `local` and whose remote end is `remote`
/// (TCP, this namespace). With `cookie`, only that very socket matches.
/// `Ok(None)`: no such socket (or it has another cookie).
pub fn lookup(
    local: SocketAddr,
    remote: SocketAddr,
    cookie: Option<u64>,
) -> Result<Option<SocketInfo>, DiagError> {
    query(IPPROTO_TCP, local, remote, cookie)
}

/// The UDP socket bound at `sender` that sent a datagram to `receiver`
/// (this namespace). (The kernel's UDP lookup finds the socket that would
/// receive a datagram from `receiver` to `sender`.)
pub fn lookup_udp(
    sender: SocketAddr,
    receiver: SocketAddr,
) -> Result<Option<SocketInfo>, DiagError> {
    query(IPPROTO_UDP, receiver, sender, None)
}

fn query(
    protocol: u8,
    local: SocketAddr,
    remote: SocketAddr,
    cookie: Option<u64>,
) -> Result<Option<SocketInfo>, DiagError> {
    // A v4-mapped pair is looked up as IPv4: the kernel hashes such
    // dual-stack sockets by their IPv4 addresses.
    let (l, r) = (
        crate::ebpf::canonical_ip(local.ip()),
        crate::ebpf::canonical_ip(remote.ip()),
    );
    let family = match (l, r) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return Ok(None),
    };
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST;
    let mut msg = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: l,
                destination_address: r,
                interface_id: 0,
                cookie: cookie.map(cookie_bytes).unwrap_or(NO_COOKIE),
            },
        })
        .into(),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);

    SOCK.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut s = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Socket)?;
            s.bind_auto().map_err(DiagError::Socket)?;
            s.connect(&NlAddr::new(0, 0)).map_err(DiagError::Socket)?;
            *slot = Some((s, 0));
        }
        let (sock, seq) = slot.as_mut().expect("set above");
        *seq = seq.wrapping_add(1);
        let want_seq = *seq;
        buf[8..12].copy_from_slice(&want_seq.to_ne_bytes());
        if let Err(e) = sock.send(&buf, 0) {
            *slot = None;
            return Err(DiagError::Socket(e));
        }
        let mut rx = vec![0u8; 8192];
        loop {
            let n = match sock.recv(&mut &mut rx[..], 0) {
                Ok(n) => n,
                Err(e) => {
                    *slot = None;
                    return Err(DiagError::Socket(e));
                }
            };
            let mut off = 0;
            while off < n {
                let m = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[off..n])
                    .map_err(|e| DiagError::Decode(e.to_string()))?;
                let len = m.header.length as usize;
                if m.header.sequence_number != want_seq {
                    // An answer to an earlier request that timed out: skip.
                    off += len.max(1);
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        let cgroup_id = r
                            .nlas
                            .iter()
                            .find_map(|nla| match nla {
                                Nla::Other(d)
                                    if d.kind() == INET_DIAG_CGROUP_ID && d.value_len() == 8 =>
                                {
                                    let mut v = [0u8; 8];
                                    d.emit_value(&mut v);
                                    Some(u64::from_ne_bytes(v))
                                }
                                _ => None,
                            })
                            .unwrap_or(0);
                        return Ok(Some(SocketInfo {
                            cookie: cookie_value(&r.header.socket_id.cookie),
                            state: r.header.state,
                            cgroup_id,
                            uid: r.header.uid,
                        }));
                    }
                    NetlinkPayload::Error(e) => {
                        let io = e.to_io();
                        return match io.raw_os_error() {
                            Some(libc::ENOENT) | Some(libc::ESTALE) => Ok(None),
                            _ => Err(DiagError::Kernel(io)),
                        };
                    }
                    _ => return Ok(None),
                }
            }
        }
    })
}

/// Whether the loop's socket (`peer`, connected to the proxy's `local`) is
/// the socket with cookie `cookie`.
pub fn peer_is(peer: SocketAddr, local: SocketAddr, cookie: u64) -> Result<bool, DiagError> {
    Ok(lookup(peer, local, Some(cookie))?.is_some_and(|i| i.cookie == cookie))
}

/// The cgroup of the listener a connection to `addr` would reach in this
/// namespace, if any.
pub fn listener_cgroup(addr: SocketAddr) -> Result<Option<u64>, DiagError> {
    // A peer no real connection uses: the established table has nothing for
    // it, so the kernel answers with the listener.
    let probe: SocketAddr = match crate::ebpf::canonical_ip(addr.ip()) {
        IpAddr::V4(_) => SocketAddr::from(([127, 255, 255, 254], 1)),
        IpAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 1)),
    };
    Ok(lookup(addr, probe, None)?
        .filter(|i| i.state == 10)
        .map(|i| i.cgroup_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn so_cookie(fd: &impl std::os::fd::AsRawFd) -> u64 {
        let mut c: u64 = 0;
        let mut len = 8 as libc::socklen_t;
        // SAFETY: getsockopt with an 8-byte out buffer.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut c as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        c
    }

    #[test]
    fn finds_a_connected_socket_by_4_tuple_and_cookie() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, local) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let cookie = so_cookie(&c);
        assert!(peer_is(peer, local, cookie).unwrap());
        // Another cookie, or another port: not this socket.
        assert!(!peer_is(peer, local, cookie + 1).unwrap());
        let other = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1).max(1));
        assert!(!peer_is(other, local, cookie).unwrap());
        // As the kernel keys v4-mapped pairs.
        let mapped = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            v6 => SocketAddr::new(v6, a.port()),
        };
        assert!(peer_is(mapped(peer), mapped(local), cookie).unwrap());
    }

    #[test]
    fn finds_the_udp_socket_that_sent_a_datagram() {
        use std::net::UdpSocket;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("0.0.0.0:0").unwrap();
        client.send_to(b"q", server.local_addr().unwrap()).unwrap();
        let mut b = [0u8; 4];
        let (_, from) = server.recv_from(&mut b).unwrap();
        let info = lookup_udp(from, server.local_addr().unwrap())
            .unwrap()
            .expect("the sender's socket");
        assert_eq!(info.cookie, so_cookie(&client));
        assert_ne!(info.cgroup_id, 0);
        // SAFETY: getuid has no failure mode.
        assert_eq!(info.uid, unsafe { libc::getuid() });
        drop(client);
        assert_eq!(
            lookup_udp(from, server.local_addr().unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn names_the_cgroup_of_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let id = listener_cgroup(l.local_addr().unwrap()).unwrap();
        assert!(id.is_some_and(|i| i != 0), "{id:?}");
        drop(l);
    }
}
