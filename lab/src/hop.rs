//! Per-hop latency from kernel timestamps: a packet socket on `lo` (root) sees every video
//! datagram that enters a relay (from its upstream) and every copy it sends on (to its
//! children), each stamped by the kernel as it crosses the loopback device (`SO_TIMESTAMPNS`).
//! The added latency of the hop is, for each datagram and each child, the time from its arrival
//! at the relay to the departure of that child's copy: the relay's wake-up, opening, decisions,
//! sealing and its place in the fan-out, as a viewer behind the relay would see it.
//!
//! The datagrams are encrypted, so they are matched by order: a relay forwards its upstream's
//! datagrams to each child in the order they came (on loopback nothing is lost, so nothing is
//! retransmitted). The server sends its datagrams in bursts (a playout quantum every 10 ms):
//! the sequences are anchored at a quiet gap (no input for [`QUIET`]) at both ends of the
//! window, and a child whose count of copies between the anchors differs from the count of
//! inputs (a retransmission, a GOP burst, a drop in the capture) is left out and counted.
//!
//! Loopback carries a UDP GSO send whole (one packet for a run of datagrams to one peer): the
//! socket asks for the virtio header (`PACKET_VNET_HDR`), whose `gso_size` splits such a packet
//! back into its datagrams, each with the packet's stamp.
//!
//! The kernel stamps are the system clock (the only clock packet sockets offer); only
//! differences of a few microseconds between two stamps of the same clock are used.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Datagrams shorter than this are not video (control, acks, pings).
pub const VIDEO_MIN_LEN: usize = 1000;
/// A gap in the relay's input long enough to anchor the matching (every earlier datagram has
/// been forwarded by then).
pub const QUIET: u64 = 4_000_000;

/// One captured UDP datagram of the hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Kernel timestamp (ns).
    pub ns: u64,
    /// Source.
    pub src: SocketAddrV4,
    /// Destination.
    pub dst: SocketAddrV4,
    /// Seen as it left (the loopback device shows each datagram once leaving, once arriving).
    pub outgoing: bool,
    /// UDP payload bytes.
    pub len: u16,
}

/// Latency figures of one window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matched {
    /// Per (datagram, child) latencies, ns.
    pub latencies: Vec<u64>,
    /// Per datagram, the latency of its first copy out (wake-up and processing, without the
    /// fan-out's spread), ns.
    pub first: Vec<u64>,
    /// Copies counted for each child left out.
    pub unmatched_copies: Vec<usize>,
    /// Datagrams that entered the relay between the anchors.
    pub inputs: usize,
    /// Children whose copies matched the inputs one for one.
    pub children: usize,
    /// Children left out (their copy count differed).
    pub unmatched: usize,
}

/// Pairs the relay's inputs (datagrams from `upstream` to `relay`, as they arrived) with each
/// child's copies (datagrams from `relay`, as they left), in order, between two quiet gaps.
pub fn match_hop(seen: &[Seen], relay: SocketAddrV4, upstream: SocketAddrV4) -> Matched {
    // Only video-size datagrams on both sides: a chunk's short last datagram may travel in a
    // GSO packet on one side (counted) and alone on the other (below the kernel filter).
    let video = |s: &&Seen| usize::from(s.len) >= VIDEO_MIN_LEN;
    let inputs: Vec<u64> = seen
        .iter()
        .filter(video)
        .filter(|s| s.src == upstream && s.dst == relay && !s.outgoing)
        .map(|s| s.ns)
        .collect();
    // Anchors: the first and the last input that follow a quiet gap.
    let anchors: Vec<usize> = (1..inputs.len())
        .filter(|&i| inputs[i].saturating_sub(inputs[i - 1]) >= QUIET)
        .collect();
    let (Some(&a), Some(&z)) = (anchors.first(), anchors.last()) else {
        return Matched::default();
    };
    if z <= a {
        return Matched::default();
    }
    let (from, to) = (inputs[a], inputs[z]);
    let window = &inputs[a..z];
    let mut per_child: std::collections::BTreeMap<SocketAddrV4, Vec<u64>> = Default::default();
    for s in seen
        .iter()
        .filter(video)
        .filter(|s| s.src == relay && s.dst != upstream && s.outgoing)
        .filter(|s| s.ns >= from && s.ns < to)
    {
        per_child.entry(s.dst).or_default().push(s.ns);
    }
    let mut m = Matched {
        inputs: window.len(),
        ..Matched::default()
    };
    let mut first = vec![u64::MAX; window.len()];
    for copies in per_child.values() {
        if copies.len() != window.len() {
            m.unmatched += 1;
            m.unmatched_copies.push(copies.len());
            continue;
        }
        m.children += 1;
        for (k, (i, o)) in window.iter().zip(copies).enumerate() {
            let l = o.saturating_sub(*i);
            m.latencies.push(l);
            first[k] = first[k].min(l);
        }
    }
    if m.children > 0 {
        m.first = first;
    }
    m
}

/// A capture of the video datagrams into and out of `relay` on `lo`, on a thread, until
/// [`Capture::stop`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<std::io::Result<(Vec<Seen>, u64)>>,
}

impl Capture {
    /// Starts capturing (needs root: `CAP_NET_RAW`). A kernel filter passes only datagrams of
    /// at least [`VIDEO_MIN_LEN`] bytes from `relay` as they leave, or from `upstream` to
    /// `relay` as they arrive.
    pub fn start(relay: SocketAddrV4, upstream: SocketAddrV4) -> std::io::Result<Capture> {
        Capture::with_filter(&mut hop_filter(*relay.ip(), *upstream.ip()))
    }

    /// Starts capturing every UDP datagram on `lo` shorter than [`VIDEO_MIN_LEN`] (control
    /// traffic), once each (as it arrives).
    pub fn control() -> std::io::Result<Capture> {
        Capture::with_filter(&mut control_filter())
    }

    fn with_filter(filter: &mut [libc::sock_filter]) -> std::io::Result<Capture> {
        let fd = open(filter)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || read(fd, &s));
        Ok(Capture { stop, thread })
    }

    /// Stops; returns what was seen, and how many datagrams the socket dropped (its buffer
    /// overflowed: the capture is then incomplete).
    pub fn stop(self) -> std::io::Result<(Vec<Seen>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| std::io::Error::other("the capture thread panicked"))?
    }
}

fn check(r: libc::c_int, what: &str) -> std::io::Result<()> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn set<T>(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    v: &T,
    what: &str,
) -> std::io::Result<()> {
    // SAFETY: `v` is a live value of the option's type, its size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(r, what)
}

/// Bytes of the `virtio_net_hdr` a packet socket with `PACKET_VNET_HDR` puts before each
/// packet (its `gso_type` and `gso_size` tell a GSO packet's datagrams apart).
const VNET_HDR: usize = 10;
/// `PACKET_VNET_HDR` (linux/if_packet.h).
const PACKET_VNET_HDR: libc::c_int = 15;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (linux/virtio_net.h).
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;

/// Bytes of the (loopback's) Ethernet header before the IP header.
const ETH: u32 = 14;

const LD_LEN: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_LEN) as u16;
const LD_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LDB_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// The packet type (an ancillary load): PACKET_HOST 0, PACKET_OUTGOING 4.
const PKTTYPE: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Classic BPF, offsets from the Ethernet header (`lo` has one, all zeros): accept if len >= VIDEO_MIN_LEN and (src == relay
/// as it leaves, or src == upstream and dst == relay as it arrives): each datagram once.
fn hop_filter(relay: Ipv4Addr, upstream: Ipv4Addr) -> Vec<libc::sock_filter> {
    let (relay, upstream) = (u32::from(relay), u32::from(upstream));
    vec![
        /* 0 */ ins(LD_LEN, 0, 0, 0),
        /* 1 */ ins(JGE, 0, 10, VIDEO_MIN_LEN as u32),
        /* 2 */ ins(LD_ABS, 0, 0, ETH + 12),
        /* 3 */ ins(JEQ, 0, 2, relay),
        /* 4 */ ins(LD_ABS, 0, 0, PKTTYPE),
        /* 5 */ ins(JEQ, 5, 6, libc::PACKET_OUTGOING as u32),
        /* 6 */ ins(JEQ, 0, 5, upstream),
        /* 7 */ ins(LD_ABS, 0, 0, ETH + 16),
        /* 8 */ ins(JEQ, 0, 3, relay),
        /* 9 */ ins(LD_ABS, 0, 0, PKTTYPE),
        /* 10 */ ins(JEQ, 0, 1, libc::PACKET_HOST as u32),
        /* 11 */ ins(RET, 0, 0, 0xffff),
        /* 12 */ ins(RET, 0, 0, 0),
    ]
}

/// Accept UDP (IPv4 protocol 17) shorter than VIDEO_MIN_LEN, as it arrives.
fn control_filter() -> Vec<libc::sock_filter> {
    vec![
        /* 0 */ ins(LD_ABS, 0, 0, PKTTYPE),
        /* 1 */ ins(JEQ, 0, 5, libc::PACKET_HOST as u32),
        /* 2 */ ins(LDB_ABS, 0, 0, ETH + 9),
        /* 3 */ ins(JEQ, 0, 3, 17),
        /* 4 */ ins(LD_LEN, 0, 0, 0),
        /* 5 */ ins(JGE, 1, 0, VIDEO_MIN_LEN as u32),
        /* 6 */ ins(RET, 0, 0, 0xffff),
        /* 7 */ ins(RET, 0, 0, 0),
    ]
}

/// The packet socket: every protocol on `lo` (a tap bound to IPv4 alone sees only what
/// arrives), raw (link header first: `PACKET_VNET_HDR`, which tells a GSO packet's datagrams
/// apart, needs `SOCK_RAW`), kernel timestamps, a 64 MB buffer, the filter.
fn open(prog: &mut [libc::sock_filter]) -> std::io::Result<libc::c_int> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as libc::c_int,
        )
    };
    check(fd, "packet socket (needs root)")?;
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    let r = (|| {
        set(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &fprog,
            "filter",
        )?;
        let one: libc::c_int = 1;
        set(fd, libc::SOL_PACKET, PACKET_VNET_HDR, &one, "virtio header")?;
        set(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &1 as &libc::c_int,
            "timestamps",
        )?;
        let size: libc::c_int = 64 << 20;
        set(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size, "buffer")?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        set(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, "timeout")?;
        // SAFETY: a zeroed sockaddr_ll filled in, its size passed.
        let r = unsafe {
            let mut ll: libc::sockaddr_ll = std::mem::zeroed();
            ll.sll_family = libc::AF_PACKET as u16;
            // All protocols: only such a tap sees datagrams as they leave, too.
            ll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            ll.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
            libc::bind(
                fd,
                (&ll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(r, "bind to lo")
    })();
    if let Err(e) = r {
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

/// Reads until `stop`; closes the socket.
fn read(fd: libc::c_int, stop: &AtomicBool) -> std::io::Result<(Vec<Seen>, u64)> {
    let mut seen = Vec::with_capacity(1 << 20);
    // Headers only: IP (up to 60) + UDP (8); the datagram is cut (MSG_TRUNC).
    // The virtio header, then IP (up to 60) + UDP (8); the datagram is cut (its length comes
    // back with MSG_TRUNC).
    let mut buf = [0u8; VNET_HDR + ETH as usize + 68];
    let mut control = [0u64; 16];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: zeroed plain C structures pointed at our live buffers, sizes passed.
        let (n, from, ns) = unsafe {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = libc::recvmsg(fd, &mut msg, libc::MSG_TRUNC);
            let mut ns = None;
            if n > 0 {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET
                        && (*c).cmsg_type == libc::SCM_TIMESTAMPNS
                    {
                        let ts =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                        ns = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            (n, from, ns)
        };
        let head = VNET_HDR + ETH as usize;
        let (Some(ns), true) = (ns, n >= (head + 28) as isize) else {
            continue;
        };
        let (vnet, p) = buf.split_at(VNET_HDR);
        let p = &p[ETH as usize..(n as usize).min(buf.len()) - VNET_HDR];
        let ihl = ((p[0] & 0x0f) as usize) * 4;
        if p[0] >> 4 != 4 || p[9] != 17 || p.len() < ihl + 4 {
            continue;
        }
        let ipa = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
        let port = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
        let (src, dst) = (
            SocketAddrV4::new(ipa(12), port(ihl)),
            SocketAddrV4::new(ipa(16), port(ihl + 2)),
        );
        let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
        // A UDP GSO packet (loopback carries a GSO send whole) is several datagrams of
        // `gso_size` bytes: each is one entry, all with the packet's stamp.
        let payload = (n as usize).saturating_sub(head + ihl + 8);
        let gso_size = usize::from(u16::from_le_bytes([vnet[4], vnet[5]]));
        let segment = if vnet[1] & 0x7f == VIRTIO_NET_HDR_GSO_UDP_L4 && gso_size > 0 {
            gso_size
        } else {
            payload.max(1)
        };
        let mut left = payload;
        loop {
            let len = left.min(segment);
            seen.push(Seen {
                ns,
                src,
                dst,
                outgoing,
                len: len as u16,
            });
            left -= len;
            if left == 0 {
                break;
            }
        }
    }
    let mut stats = [0u32; 2];
    let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
    // SAFETY: PACKET_STATISTICS fills a tpacket_stats (two u32) we own; then our descriptor
    // is closed.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            stats.as_mut_ptr().cast(),
            &mut len,
        );
        libc::close(fd);
    }
    Ok((seen, u64::from(stats[1])))
}

/// The floor under the `hop` figure on this machine: a raw forwarder (no session layer, no
/// decisions: each datagram in is copied by reference to every child) on the same I/O path as
/// a relay's ([`RecvBatch`](common::batch::RecvBatch) with GRO, the copies grouped by
/// child, one GSO message each, [`SendBatch`](common::batch::SendBatch) slices as the relay's
/// driver cuts them), fed bursts of three video-size datagrams every 11 ms as a server's playout
/// sends them, to `children` receiver threads blocked in `recv` (lighter than viewers: each
/// only reads; with UDP GRO, as viewers' sockets have). Measured by the same capture and matching as a relay, for `window`. A stand-in,
/// reported beside the relay's figure, never instead of it.
pub fn raw_floor(
    base: Ipv4Addr,
    children: usize,
    window: std::time::Duration,
) -> std::io::Result<(Matched, u64)> {
    use common::batch::{RecvBatch, SendBatch};
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    let o = base.octets();
    let at = |host: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(o[0], o[1], o[2], host), port);
    let (upstream, relay) = (at(1, 8010), at(2, 8010));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..children {
        let s = UdpSocket::bind(at(10, 0))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let _ = common::batch::set_gro(&s);
        addrs.push(s.local_addr()?);
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("sink{i}"))
                .spawn(move || {
                    let mut buf = vec![0u8; common::batch::GRO_MAX];
                    while !stop.load(Ordering::Relaxed) {
                        let _ = s.recv(&mut buf);
                    }
                })?,
        );
    }
    let fwd = UdpSocket::bind(relay)?;
    let src = UdpSocket::bind(upstream)?;
    {
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("forwarder".into())
                .spawn(move || {
                    let mut rx = RecvBatch::with_gro(2048, &fwd);
                    let mut tx = SendBatch::default();
                    let mut inputs: Vec<bytes::Bytes> = Vec::new();
                    let mut out: Vec<(std::net::SocketAddr, bytes::Bytes)> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let mut pfd = libc::pollfd {
                            fd: std::os::fd::AsRawFd::as_raw_fd(&fwd),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                            continue;
                        }
                        while rx.recv(&fwd).is_ok_and(|n| n > 0) {
                            while let Some((_, d)) = rx.pop() {
                                inputs.push(d.freeze());
                            }
                        }
                        for a in &addrs {
                            for d in &inputs {
                                out.push((*a, d.clone()));
                            }
                        }
                        inputs.clear();
                        // The relay driver's slices.
                        let (mut done, mut slice) = (0, common::batch::FIRST_SLICE);
                        while done < out.len() {
                            let mut end = (done + slice).min(out.len());
                            while end < out.len() && out[end].0 == out[end - 1].0 {
                                end += 1;
                            }
                            let mut sent = done;
                            while sent < end {
                                match tx.send(&fwd, &out[sent..end]) {
                                    Ok(n) => sent += n,
                                    Err(_) => sent += 1,
                                }
                            }
                            done = end;
                            slice = common::batch::next_slice(slice);
                        }
                        out.clear();
                    }
                })?,
        );
    }
    let capture = Capture::start(relay, upstream)?;
    // A server's playout: three 1 400-byte datagrams (one GSO message) every 11 ms.
    let mut send = SendBatch::default();
    let burst: Vec<(std::net::SocketAddr, bytes::Bytes)> = (0..3u8)
        .map(|i| (relay.into(), bytes::Bytes::from(vec![i; 1400])))
        .collect();
    let start = Instant::now();
    let mut next = start;
    while next < start + window {
        let _ = send.send(&src, &burst);
        next += Duration::from_micros(11_000);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    std::thread::sleep(Duration::from_millis(50));
    let seen = capture.stop();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let (seen, drops) = seen?;
    Ok((match_hop(&seen, relay, upstream), drops))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 99, n), port)
    }

    /// Real sockets on loopback (root): a datagram into the relay's address and one out of
    /// it are captured once each way, with stamps of one clock in the order they were sent.
    #[test]
    fn the_capture_sees_datagrams_into_and_out_of_the_relay() {
        let (up, relay, child) = (a(1, 0), a(2, 0), a(9, 0));
        let bind = |x: SocketAddrV4| std::net::UdpSocket::bind(x).unwrap();
        let (up_s, relay_s, child_s) = (bind(up), bind(relay), bind(child));
        let at = |s: &std::net::UdpSocket| match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(v) => v,
            _ => unreachable!(),
        };
        let (up, relay, child) = (at(&up_s), at(&relay_s), at(&child_s));
        let cap = Capture::start(relay, up).expect("capture (root)");
        std::thread::sleep(std::time::Duration::from_millis(50));
        up_s.send_to(&[1u8; 1200], relay).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        relay_s.send_to(&[2u8; 1200], child).unwrap();
        // Three of one size to one peer: one UDP GSO packet on loopback, three entries.
        let run: Vec<_> = (0..3u8)
            .map(|i| (child.into(), bytes::Bytes::from(vec![10 + i; 1200])))
            .collect();
        let mut batch = common::batch::SendBatch::default();
        assert_eq!(batch.send(&relay_s, &run).unwrap(), 3);
        // Not captured: short, or neither from nor to the relay.
        relay_s.send_to(&[3u8; 100], child).unwrap();
        up_s.send_to(&[4u8; 1200], child).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150));
        let (seen, drops) = cap.stop().unwrap();
        assert_eq!(drops, 0);
        let of = |src, dst, outgoing| {
            seen.iter()
                .filter(|s| s.src == src && s.dst == dst && s.outgoing == outgoing)
                .map(|s| s.ns)
                .collect::<Vec<_>>()
        };
        let (i, o) = (of(up, relay, false), of(relay, child, true));
        assert_eq!((i.len(), o.len()), (1, 4), "{seen:?}");
        assert!(o[0] > i[0] && o[0] - i[0] < 1_000_000_000, "{seen:?}");
        assert!(
            o[1..].iter().all(|&t| t == o[1]),
            "one GSO packet: {seen:?}"
        );
        assert!(seen.iter().all(|s| s.len == 1200), "{seen:?}");
        // Each datagram once (the filter keeps the relay's as it leaves, its input as it
        // arrives), nothing else.
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    #[test]
    fn inputs_and_copies_pair_in_order_between_quiet_gaps() {
        let (up, relay, c1, c2) = (a(1, 8010), a(2, 8010), a(9, 5000), a(9, 5001));
        let mut seen = Vec::new();
        let input = |ns| Seen {
            ns,
            src: up,
            dst: relay,
            outgoing: false,
            len: 1300,
        };
        let copy = |ns, dst| Seen {
            ns,
            src: relay,
            dst,
            outgoing: true,
            len: 1300,
        };
        // Bursts of three inputs every 10 ms; child 1 gets each copy 100 µs later, child 2
        // 300 µs later, except in the last burst where child 2 also gets a retransmission.
        for burst in 0..5u64 {
            let t = burst * 10_000_000;
            for i in 0..3u64 {
                seen.push(input(t + i * 1_000));
                // The relay's own view of its upstream's copy (leaving the upstream): ignored.
                seen.push(Seen {
                    outgoing: true,
                    ..input(t + i * 1_000)
                });
                seen.push(copy(t + i * 1_000 + 100_000, c1));
                seen.push(copy(t + i * 1_000 + 300_000, c2));
            }
        }
        seen.sort_by_key(|s| s.ns);
        // Anchors at bursts 1 and 4: bursts 1, 2, 3 (nine inputs) are matched.
        let m = match_hop(&seen, relay, up);
        assert_eq!((m.inputs, m.children, m.unmatched), (9, 2, 0));
        let mut l = m.latencies.clone();
        l.sort();
        assert_eq!(
            (l[0], l[8], l[9], l[17]),
            (100_000, 100_000, 300_000, 300_000)
        );
        // A copy too many for child 2 inside the window: it is left out.
        seen.push(copy(25_000_000, c2));
        seen.sort_by_key(|s| s.ns);
        let m = match_hop(&seen, relay, up);
        assert_eq!((m.children, m.unmatched, m.latencies.len()), (1, 1, 9));
    }
}
