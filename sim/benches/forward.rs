//! The relay's hot path: one video datagram in, its fan-out to N subscribers out, on the real
//! `RelayCore` (taken out of a simulated overlay once its viewers have subscribed, sessions
//! and all), encrypted as the daemons run and with the benchmark-only plaintext for
//! comparison; then the same with every datagram handed to a real loopback socket; a burst of
//! three datagrams (a playout quantum) fanned out per subscriber with and without UDP GSO; and
//! the raw Linux UDP baselines of this machine measured in the same run (`send_to`, `sendmmsg`
//! ×32, GSO ×8, per 1 316-byte datagram).
//!
//! `cargo bench -p sim --bench forward` (divan: time per iteration, and items/s where an
//! iteration sends several datagrams). The sink sockets are not drained: a send that finds
//! the receiver's queue full is dropped by the kernel after the same work, which keeps the
//! second core free for the sender.

use bytes::{Bytes, BytesMut};
use common::batch::{SendBatch, BATCH};
use common::wire::ChannelId;
use divan::counter::ItemsCount;
use divan::Bencher;
use node::relay_core::{Command, RelayConfig, RelayCore};
use sim::{addr, Net, SourceConfig};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const SUBSCRIBERS: &[usize] = &[1, 10, 100];
const LEN: usize = 1316;

fn main() {
    divan::main();
}

/// The origin of the relay's input.
struct Hot {
    origin: RelayCore,
    at_relay: SocketAddr,
    at_origin: SocketAddr,
    now: Instant,
    channel: ChannelId,
    counter: u64,
}

impl Hot {
    /// An origin, and a relay with `n` viewers subscribed to its channel through it.
    fn new(n: usize, secure: bool) -> (Hot, RelayCore) {
        let mut net = if secure {
            Net::new(7)
        } else {
            Net::plaintext(7)
        };
        net.count_links = false;
        let source = SourceConfig {
            interval: Duration::from_millis(10),
            ..SourceConfig::default()
        };
        net.add_origin(
            "127.0.0.1",
            &["127.0.0.2"],
            RelayConfig::default(),
            &["hot"],
            source,
        );
        net.add_relay("127.0.0.2", &["127.0.0.1"], RelayConfig::default());
        let viewers: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 9, 1 + (i / 200) as u8], 9000 + i as u16)))
            .collect();
        for &v in &viewers {
            net.add_viewer(v, &["127.0.0.2"], Default::default());
            net.play(v, "hot");
        }
        net.run_for(Duration::from_secs(4));
        for &v in &viewers {
            assert!(net.viewing(v, "hot").delivered() > 0, "{v} does not watch");
        }
        let now = net.now();
        let (at_origin, at_relay) = (addr("127.0.0.1"), addr("127.0.0.2"));
        let hot = Hot {
            origin: net.take_relay(at_origin).expect("origin"),
            at_relay,
            at_origin,
            now,
            channel: ChannelId::of_name("hot"),
            counter: 1 << 40,
        };
        (hot, net.take_relay(at_relay).expect("relay"))
    }

    /// The next video datagram the origin sends the relay (sealed when secure), in a buffer of
    /// its own as a receive hands it over.
    fn next_input(&mut self) -> BytesMut {
        self.counter += 1;
        let mut payload = vec![0x47u8; LEN];
        payload[..8].copy_from_slice(&self.counter.to_le_bytes());
        self.origin.handle_command(
            self.now,
            Command::LocalVideo {
                channel: self.channel,
                payload: payload.into(),
                keyframe: false,
            },
        );
        let mut video = None;
        while let Some(tx) = self.origin.poll_transmit() {
            if tx.to == self.at_relay && tx.bytes.len() >= LEN {
                video = Some(tx.bytes);
            }
        }
        BytesMut::from(&video.expect("the origin forwards to the relay")[..])
    }
}

/// The relay's decision and seal for every subscriber (what its driver then sends).
fn forward(bencher: Bencher, n: usize, secure: bool) {
    let (mut hot, mut relay) = Hot::new(n, secure);
    let (from, now) = (hot.at_origin, hot.now);
    bencher
        .counter(ItemsCount::new(n))
        .with_inputs(|| hot.next_input())
        .bench_local_values(|bytes| {
            relay.handle_datagram(now, from, bytes);
            let mut sent = 0;
            while let Some(tx) = relay.poll_transmit() {
                sent += 1;
                divan::black_box(&tx.bytes);
            }
            debug_assert!(sent >= n);
        });
}

/// [`forward`], and every datagram handed to the kernel: one `send_to` each (`batched`
/// false, what the driver did before issue 10), or [`SendBatch`] (`sendmmsg`, 64 per call:
/// what `Port` does now).
fn forward_and_send(bencher: Bencher, n: usize, secure: bool, batched: bool) {
    let (tx, sink) = sockets();
    let (mut hot, mut relay) = Hot::new(n, secure);
    let (from, now) = (hot.at_origin, hot.now);
    // One sink stands for every subscriber: no GSO (each subscriber is another peer).
    let mut batch = SendBatch::without_gso();
    let mut out: Vec<(SocketAddr, Bytes)> = Vec::with_capacity(BATCH);
    bencher
        .counter(ItemsCount::new(n))
        .with_inputs(|| hot.next_input())
        .bench_local_values(|bytes| {
            relay.handle_datagram(now, from, bytes);
            while let Some(t) = relay.poll_transmit() {
                if batched {
                    out.push((sink, t.bytes));
                    if out.len() == BATCH {
                        send_all(&mut batch, &tx, &mut out);
                    }
                } else {
                    let _ = tx.send_to(&t.bytes, sink);
                }
            }
            send_all(&mut batch, &tx, &mut out);
        });
}

/// Three datagrams per iteration (what a 10 ms playout quantum brings at 2.8 Mb/s), their
/// fan-out grouped by destination as `Port::flush` does, then sent with GSO (each
/// subscriber's three datagrams in one message) or without (`sendmmsg` only).
fn burst_of_three(bencher: Bencher, n: usize, gso: bool) {
    let (tx, sink) = sockets();
    let (mut hot, mut relay) = Hot::new(n, true);
    let (from, now) = (hot.at_origin, hot.now);
    let mut batch = if gso {
        SendBatch::default()
    } else {
        SendBatch::without_gso()
    };
    // One sink per subscriber, so runs are per peer as in a real fan-out.
    let sinks: Vec<SocketAddr> = (0..n).map(|_| sockets().1).collect();
    let _ = sink;
    let mut out: Vec<(SocketAddr, Bytes)> = Vec::new();
    bencher
        .counter(ItemsCount::new(3 * n))
        .with_inputs(|| [hot.next_input(), hot.next_input(), hot.next_input()])
        .bench_local_values(|inputs| {
            for bytes in inputs {
                relay.handle_datagram(now, from, bytes);
                while let Some(t) = relay.poll_transmit() {
                    // Viewer i listens on port 9000 + i: its own sink.
                    out.push((sinks[usize::from(t.to.port() - 9000) % n], t.bytes));
                }
            }
            out.sort_by_key(|(to, _)| *to);
            send_all(&mut batch, &tx, &mut out);
        });
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_encrypted_burst3_sendmmsg(bencher: Bencher, n: usize) {
    burst_of_three(bencher, n, false);
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_encrypted_burst3_gso(bencher: Bencher, n: usize) {
    burst_of_three(bencher, n, true);
}

fn send_all(batch: &mut SendBatch, tx: &UdpSocket, out: &mut Vec<(SocketAddr, Bytes)>) {
    let mut done = 0;
    while done < out.len() {
        done += batch.send(tx, &out[done..]).unwrap_or(1);
    }
    out.clear();
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_encrypted(bencher: Bencher, n: usize) {
    forward(bencher, n, true);
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_plaintext(bencher: Bencher, n: usize) {
    forward(bencher, n, false);
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_encrypted_send_to(bencher: Bencher, n: usize) {
    forward_and_send(bencher, n, true, false);
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_plaintext_send_to(bencher: Bencher, n: usize) {
    forward_and_send(bencher, n, false, false);
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_encrypted_sendmmsg(bencher: Bencher, n: usize) {
    forward_and_send(bencher, n, true, true);
}

#[divan::bench(args = SUBSCRIBERS)]
fn relay_plaintext_sendmmsg(bencher: Bencher, n: usize) {
    forward_and_send(bencher, n, false, true);
}

/// A sender and a sink address on loopback (the sink is bound, never read).
fn sockets() -> (UdpSocket, SocketAddr) {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let at = sink.local_addr().unwrap();
    std::mem::forget(sink); // kept open (bound) for the process's life
    (UdpSocket::bind("127.0.0.1:0").unwrap(), at)
}

fn sockaddr(a: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = a else {
        unreachable!("IPv4 loopback")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Raw baseline: one `send_to` per datagram.
#[divan::bench]
fn raw_send_to(bencher: Bencher) {
    let (tx, sink) = sockets();
    let buf = vec![0x47u8; LEN];
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let _ = tx.send_to(&buf, sink);
    });
}

/// Raw baseline: `sendmmsg` of 32 datagrams (one message each, as to 32 peers).
#[divan::bench]
fn raw_sendmmsg_32(bencher: Bencher) {
    let (tx, sink) = sockets();
    let buf = Bytes::from(vec![0x47u8; LEN]);
    let items: Vec<(SocketAddr, Bytes)> = (0..32).map(|_| (sink, buf.clone())).collect();
    let mut batch = SendBatch::without_gso();
    bencher
        .counter(ItemsCount::new(items.len()))
        .bench_local(|| batch.send(&tx, &items));
}

/// Raw baseline: UDP GSO, 8 datagrams of 1 316 bytes in one `sendmsg` (`UDP_SEGMENT`).
#[divan::bench]
fn raw_gso_8(bencher: Bencher) {
    const B: usize = 8;
    let (tx, sink) = sockets();
    let buf = vec![0x47u8; LEN * B];
    let mut dst = sockaddr(sink);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = vec![0u8; space];
    bencher.counter(ItemsCount::new(B)).bench_local(|| {
        // SAFETY: the header points at live buffers of the sizes given; the control buffer
        // has room for one u16 cmsg (CMSG_SPACE).
        unsafe {
            let mut h: libc::msghdr = std::mem::zeroed();
            h.msg_name = (&mut dst as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut iov;
            h.msg_iovlen = 1;
            h.msg_control = control.as_mut_ptr().cast();
            h.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&h);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), LEN as u16);
            libc::sendmsg(tx.as_raw_fd(), &h, 0)
        }
    });
}
