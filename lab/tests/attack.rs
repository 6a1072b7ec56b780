//! An attacker on the same machine as a streaming overlay (real binaries, loopback), with
//! root's powers: it sniffs the loopback interface and sends IPv4/UDP datagrams with any source
//! address (a raw socket). While a viewer watches through a PoP it replays the datagrams it
//! captured towards the PoP, flips their bits, forges plaintext subscribes, floods and NACKs
//! with spoofed sources and ids, sends handshake initiations from a spoofed victim, 100 000
//! random datagrams per second, and a handshake flood (four times the PoP's handshake budget)
//! while a second viewer joins. Nothing of it may be accepted, the viewer must lose nothing,
//! the latecomer must get in (through a cookie), and no spoofed address may get more bytes
//! back than were sent in its name.
//!
//! Needs root (raw and packet sockets), as CI runs; says so and skips otherwise.

mod support;

use common::secure::{Secure, SecureConfig};
use common::wire::{Body, ChannelId, Datagram, Flood, Message, PathHop};
use common::NodeId;
use lab::Media;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const SEC: Duration = Duration::from_secs(1);

fn host(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 76, n)
}

/// Sends IPv4/UDP datagrams with any source (`IPPROTO_RAW`: we write the IP header).
struct RawSender {
    fd: libc::c_int,
}

impl RawSender {
    fn open() -> RawSender {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        RawSender { fd }
    }

    /// Sends `payload` from `src` to `dst`; returns the UDP payload bytes sent.
    fn send(&self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> usize {
        self.send_batch(&[(src, dst, payload.to_vec())])
    }

    /// Sends a batch with one `sendmmsg`; returns the UDP payload bytes sent.
    fn send_batch(&self, batch: &[(SocketAddrV4, SocketAddrV4, Vec<u8>)]) -> usize {
        let packets: Vec<Vec<u8>> = batch
            .iter()
            .map(|(src, dst, payload)| ip_udp(*src, *dst, payload))
            .collect();
        let names: Vec<libc::sockaddr_in> = batch
            .iter()
            .map(|(_, dst, _)| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.ip().octets()),
                },
                sin_zero: [0; 8],
            })
            .collect();
        let mut iovs: Vec<libc::iovec> = packets
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: zeroed msghdrs are valid; every pointer below points into vectors that
        // outlive the sendmmsg call.
        let mut msgs: Vec<libc::mmsghdr> = (0..batch.len())
            .map(|i| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&names[i] as *const libc::sockaddr_in) as *mut libc::c_void;
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0usize;
        while done < msgs.len() {
            // SAFETY: see above.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd,
                    msgs[done..].as_mut_ptr(),
                    (msgs.len() - done) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            done += n as usize;
        }
        batch[..done].iter().map(|b| b.2.len()).sum()
    }
}

/// An IPv4/UDP packet from `src` to `dst` (the kernel fills the IP checksum).
fn ip_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    {
        let total = 20 + 8 + payload.len();
        let mut p = Vec::with_capacity(total);
        p.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ]);
        p.extend_from_slice(&src.ip().octets());
        p.extend_from_slice(&dst.ip().octets());
        p.extend_from_slice(&src.port().to_be_bytes());
        p.extend_from_slice(&dst.port().to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed on IPv4)
        p.extend_from_slice(payload);
        p
    }
}

impl Drop for RawSender {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.fd) };
    }
}

/// A UDP datagram seen on loopback.
#[derive(Clone, Debug)]
struct Seen {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: Vec<u8>,
}

/// Captures on a thread, until stopped, the IPv4/UDP datagrams on `lo` (once, as received)
/// that come from `pop`, and those sent to it while `capture` is set.
fn sniff(
    pop: SocketAddrV4,
    capture: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    into: Arc<Mutex<Vec<Seen>>>,
) -> std::thread::JoinHandle<u64> {
    // SAFETY: plain socket(2)/setsockopt(2)/bind(2) calls with checked results.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            (libc::ETH_P_IP as u16).to_be() as libc::c_int,
        )
    };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    unsafe {
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let size: libc::c_int = 64 << 20;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut ll: libc::sockaddr_ll = std::mem::zeroed();
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        ll.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
        let r = libc::bind(
            fd,
            (&ll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind lo: {}", std::io::Error::last_os_error());
    }
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are ours, sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            // Loopback shows each packet twice: keep the copy as received.
            if n < 28 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            if p[9] != 17 || p.len() < ihl + 8 {
                continue;
            }
            let ipa = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
            let port = |o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
            let src = SocketAddrV4::new(ipa(12), port(ihl));
            let dst = SocketAddrV4::new(ipa(16), port(ihl + 2));
            if src != pop && !(dst == pop && capture.load(Ordering::Relaxed)) {
                continue;
            }
            into.lock().unwrap().push(Seen {
                src,
                dst,
                payload: p[ihl + 8..].to_vec(),
            });
        }
        let mut stats = [0u32; 2];
        let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
        // SAFETY: PACKET_STATISTICS fills a tpacket_stats (two u32) we own.
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
        u64::from(stats[1])
    })
}

/// A valid viewer initiation towards `pop` from a fresh viewer (what anyone can mint).
fn viewer_init(seed: u64, pop: SocketAddrV4) -> Vec<u8> {
    let mut v = Secure::new(SecureConfig::viewer(None, seed));
    v.add_pop(pop.into(), None);
    let ping = Datagram::new(NodeId(7), Body::Unreliable(Message::Ping { nonce: 1 }));
    v.send(
        Instant::now(),
        NodeId(0),
        pop.into(),
        ping.encode().unwrap(),
    );
    v.poll_transmit().unwrap().1.to_vec()
}

/// Sends `pool`'s datagrams round-robin to `dst`, the `i`-th from `src(i)`, `per_call` per
/// system call, paced at `per_sec` (slower if the machine cannot), while `go(sent so far)`.
/// Returns (datagrams, bytes) sent.
fn paced_flood(
    raw: &RawSender,
    dst: SocketAddrV4,
    pool: &[Vec<u8>],
    (per_sec, per_call): (u64, u64),
    src: impl Fn(u64) -> SocketAddrV4,
    go: impl Fn(u64) -> bool,
) -> (u64, usize) {
    let (t0, mut sent, mut bytes) = (Instant::now(), 0u64, 0usize);
    while go(sent) {
        let batch: Vec<_> = (sent..sent + per_call)
            .map(|i| (src(i), dst, pool[(i % pool.len() as u64) as usize].clone()))
            .collect();
        sent += per_call;
        bytes += raw.send_batch(&batch);
        let due = t0 + Duration::from_micros(sent * 1_000_000 / per_sec);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    (sent, bytes)
}

#[test]
fn an_attacker_on_the_machine_gets_nothing_in_and_nothing_out() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (raw and packet sockets), as CI runs");
        return;
    }
    require_ffmpeg();
    let mut o = Overlay::start(
        r#"
"127.0.76.1" = ["127.0.76.2"]
"127.0.76.2" = ["127.0.76.1"]
"#,
        &["127.0.76.1"],
        Media {
            videos: None,
            sources: vec![format!("live={}", lab::DEMO_SOURCE)],
        },
    );
    let stats = o.client("viewer", &["127.0.76.2"], &["--stream", "live"]);
    o.wait_stats(&stats, 60 * SEC, "the stream plays", |s| {
        s.streams.get("live").is_some_and(|x| x.packets >= 200)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let capture = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pop = SocketAddrV4::new(host(2), 8010);
    let sniffer = sniff(pop, capture.clone(), stop.clone(), seen.clone());
    std::thread::sleep(3 * SEC);
    capture.store(false, Ordering::Relaxed);
    let server = SocketAddrV4::new(host(1), 8010);
    let captured: Vec<Seen> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.dst == pop)
        .take(2000)
        .cloned()
        .collect();
    assert!(captured.len() >= 100, "captured only {}", captured.len());
    let before = o.wait_stats(&stats, 10 * SEC, "stats", |_| true).streams["live"].clone();
    let t_attack = Instant::now();
    let raw = RawSender::open();
    // Bytes sent in the name of each spoofed (non-overlay) address.
    let mut spoofed_bytes = 0usize;
    let spoofed = |n: u8, port: u16| SocketAddrV4::new(host(n), port);

    // 1. Replays, from their real sources, then with every datagram's bits flipped.
    for s in &captured {
        raw.send(s.src, s.dst, &s.payload);
    }
    let mut rng = common::rng::Rng::seeded(76);
    for s in &captured {
        let mut p = s.payload.clone();
        let i = rng.below(p.len() as u64 * 8) as usize;
        p[i / 8] ^= 1 << (i % 8);
        raw.send(s.src, s.dst, &p);
    }
    // 2. Forged plaintext control: a subscribe from a spoofed viewer, a flood and NACKs in the
    //    server's name (its address and id).
    let ch = ChannelId::of_name("live");
    let forged = [
        (
            spoofed(50, 9000),
            Datagram::new(
                NodeId(0xbad),
                Body::Reliable {
                    session: 1,
                    id: 0,
                    msg: Message::Subscribe { channel: ch },
                },
            ),
        ),
        (
            server,
            Datagram::new(
                NodeId::for_ip(host(1).into()),
                Body::Unreliable(Message::Flood(Flood {
                    origin: NodeId::for_ip(host(1).into()),
                    seq: u64::MAX / 2,
                    cost_us: 0,
                    load: 0,
                    path: vec![PathHop {
                        id: NodeId::for_ip(host(1).into()),
                        addr: server.into(),
                    }],
                    channels: vec![],
                })),
            ),
        ),
        (
            server,
            Datagram::new(
                NodeId::for_ip(host(1).into()),
                Body::Unreliable(Message::Nack {
                    channel: ch,
                    seqs: (0..64).collect(),
                }),
            ),
        ),
    ];
    for (src, d) in &forged {
        let b = d.encode().unwrap();
        for _ in 0..20 {
            let n = raw.send(*src, pop, &b);
            if src.ip().octets()[3] >= 50 {
                spoofed_bytes += n;
            }
        }
    }
    // 3. Valid viewer handshakes in the name of a victim (the reflection attempt), and member
    //    initiations without the network key.
    for _ in 0..50 {
        let init = viewer_init(rng.next_u64(), pop);
        spoofed_bytes += raw.send(spoofed(52, 9000), pop, &init);
        let mut fake_init = vec![0u8; 144];
        fake_init[..4].copy_from_slice(b"PS\x02\x01");
        for b in &mut fake_init[4..] {
            *b = rng.next_u64() as u8;
        }
        spoofed_bytes += raw.send(spoofed(53, 8010), pop, &fake_init);
    }
    // The viewer did not notice any of that (checked after a jitter buffer's worth).
    std::thread::sleep(SEC);
    let mid = o.wait_stats(&stats, 10 * SEC, "stats", |_| true).streams["live"].clone();
    // 4. 200 000 random datagrams paced at 100 000 per second (slower if the machine cannot),
    //    from 100 spoofed addresses; half look like data of a session (the right prefix).
    let pool: Vec<Vec<u8>> = (0..4096)
        .map(|i| {
            let len = 16 + rng.below(300) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if i % 2 == 0 {
                p[..4].copy_from_slice(b"PS\x02\x05");
            }
            p
        })
        .collect();
    let t0 = Instant::now();
    let (sent, bytes) = paced_flood(
        &raw,
        pop,
        &pool,
        (100_000, 64),
        |i| spoofed(100 + (i % 100) as u8, 1024 + (i % 5000) as u16),
        |sent| sent < 200_000,
    );
    spoofed_bytes += bytes;
    let flood_rate = sent as f64 / t0.elapsed().as_secs_f64();
    // 5. A handshake flood: valid viewer initiations, minted fresh, from 1 000 spoofed
    //    addresses at 2 000/s (four times the PoP's handshake budget) while a second viewer
    //    starts. The spoofed ones get cookies; the latecomer proves its address with its
    //    cookie and plays.
    let inits: Vec<Vec<u8>> = (0..1000)
        .map(|_| viewer_init(rng.next_u64(), pop))
        .collect();
    let done = AtomicBool::new(false);
    let (hs_sent, hs_bytes) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let t = Instant::now();
            paced_flood(
                &raw,
                pop,
                &inits,
                (2_000, 20),
                |i| spoofed(150 + (i % 100) as u8, 30000 + (i % 10) as u16),
                |_| !done.load(Ordering::Relaxed) && t.elapsed() < 40 * SEC,
            )
        });
        // The flood drains the budget within 0.1 s; the latecomer starts once it has.
        std::thread::sleep(SEC / 2);
        let late_stats = o.client("latecomer", &["127.0.76.2"], &["--stream", "live"]);
        o.wait_stats(
            &late_stats,
            30 * SEC,
            "a latecomer plays through a handshake flood",
            |s| s.streams.get("live").is_some_and(|x| x.packets >= 50),
        );
        done.store(true, Ordering::Relaxed);
        flood.join().unwrap()
    });
    spoofed_bytes += hs_bytes;
    let attack_secs = t_attack.elapsed().as_secs_f64();
    std::thread::sleep(2 * SEC);
    stop.store(true, Ordering::Relaxed);
    let sniffer_drops = sniffer.join().unwrap();

    // What came back to the spoofed addresses (127.0.76.50 and up): handshake responses
    // (kind 4, 108 bytes, as large as the initiation) and cookies (kind 6, 52 bytes), nothing
    // else.
    let seen = seen.lock().unwrap();
    let back: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.src == pop && s.dst.ip().octets()[3] >= 50)
        .collect();
    // (Replies to one address that left together are one UDP GSO packet on the wire, which
    // the sniffer sees whole: a multiple of the size, every segment of the same kind.)
    let answered: usize = back.iter().map(|s| s.payload.len()).sum();
    let segments = |s: &Seen, size: usize| -> Option<usize> {
        let whole = !s.payload.is_empty() && s.payload.len().is_multiple_of(size);
        let alike = s.payload.chunks(size).all(|c| c[..4] == s.payload[..4]);
        (whole && alike).then(|| s.payload.len() / size)
    };
    let mut cookies = 0;
    for s in &back {
        match s.payload[3] {
            4 if segments(s, 108).is_some() => {}
            6 if segments(s, 52).is_some() => cookies += segments(s, 52).unwrap_or(0),
            _ => panic!("answered {:?}", (s.payload[3], s.payload.len())),
        }
    }
    // The latecomer (not spoofed) was asked for its cookie, then let in.
    let latecomer_cookie = seen
        .iter()
        .any(|s| s.src == pop && s.dst.ip().octets()[3] < 50 && s.payload[3] == 6);
    drop(seen);
    let after = o.wait_stats(&stats, 10 * SEC, "stats", |_| true).streams["live"].clone();
    // And the stream goes on after the flood.
    let recovered = o.wait_stats(&stats, 20 * SEC, "the stream goes on", |s| {
        s.streams["live"].packets > after.packets + 100
    });
    let pop_log = o.log("node-127.0.76.2");
    eprintln!(
        "attack: {} captured datagrams replayed and bit-flipped, 60 forged control datagrams, \
         100 handshakes, {sent} random datagrams ({flood_rate:.0}/s), {hs_sent} spoofed viewer \
         handshakes ({cookies} cookies), {attack_secs:.1} s in all; {spoofed_bytes} bytes \
         sent in spoofed names, {answered} answered; viewer: {} → {} → {} datagrams, lost {} \
         → {} (replays, forgeries, handshakes) → {} (random flood), gaps {:?}; sniffer drops \
         {sniffer_drops}",
        captured.len(),
        before.packets,
        mid.packets,
        after.packets,
        before.lost,
        mid.lost,
        after.lost,
        after.gaps
    );
    // No amplification: spoofed addresses got at most what was sent in their name (here:
    // the viewer handshakes' responses, 108 bytes each for 108).
    assert!(answered <= spoofed_bytes, "{answered} > {spoofed_bytes}");
    assert!(cookies > 0, "no cookie under a handshake flood");
    assert!(
        latecomer_cookie,
        "the latecomer met no cookie: was the PoP under load?"
    );
    // Nothing accepted: no spoofed subscriber, no flood from the attacker, and every kind of
    // attempt counted and logged by reason.
    assert!(
        !pop_log
            .lines()
            .any(|l| l.contains("subscriber added") && l.contains("127.0.76.5")),
        "a forged subscribe was accepted"
    );
    assert_eq!(sent, 200_000);
    for reason in ["Replay", "BadTag", "BadMac", "Malformed", "UnknownSession"] {
        assert!(
            pop_log.contains(reason),
            "no {reason} drop logged by the PoP:\n{pop_log}"
        );
    }
    // The viewer did not notice the replays, bit flips, forgeries and handshakes: the stream
    // went on, nothing lost, no arrival silence its 200 ms jitter buffer would not cover (a
    // burst of 2 000 raw packets on a 2-core machine may delay arrivals by ~100 ms).
    assert!(mid.packets > before.packets + 20);
    assert_eq!(mid.lost, before.lost, "datagrams lost during the attack");
    let long_gaps: Vec<_> = mid
        .gaps
        .iter()
        .skip(before.gaps.len())
        .filter(|g| g.1 >= 200.0)
        .collect();
    assert!(
        long_gaps.is_empty(),
        "silences during the attack: {long_gaps:?}"
    );
    // Under the 100 000/s flood and the handshake flood (attacker and overlay share the
    // machine's 2 cores) nothing is accepted either, the viewer loses nothing (NACK recovery
    // and the jitter buffer cover what the floods delay), and the stream goes on afterwards.
    // Arrival silences there depend on how the cores are shared: ≤ 125 ms in most quiet runs,
    // 340–370 ms in some (reported above); only a stall is asserted.
    assert_eq!(
        after.lost, mid.lost,
        "datagrams lost during the random flood"
    );
    let stalls: Vec<_> = after
        .gaps
        .iter()
        .skip(mid.gaps.len())
        .filter(|g| g.1 >= 1000.0)
        .collect();
    assert!(
        stalls.is_empty(),
        "the stream stalled during the floods: {stalls:?}"
    );
    assert!(recovered.streams["live"].packets > after.packets + 100);
    o.stop();
}
