//! The session layer on a fake clock: handshakes, data both ways, and everything an attacker
//! can try from outside (replays, bit flips, forged handshakes, a wrong network key, an
//! unknown key, a wrong viewer secret), plus restarts, rekeying, retries and roaming.

use bytes::Bytes;
use common::id::NodeId;
use common::keys::{KeyPair, Secret};
use common::secure::{
    open_viewer_secret, Reason, Secure, SecureConfig, SecureEvent, REKEY_AFTER, RETRY_FIRST,
};
use common::wire::{Body, Datagram, Message};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 8010))
}

fn ping(from: NodeId, nonce: u64) -> Bytes {
    Datagram::new(from, Body::Unreliable(Message::Ping { nonce }))
        .encode()
        .unwrap()
}

struct Host {
    id: NodeId,
    at: SocketAddr,
    keys: KeyPair,
    sec: Secure,
    /// What it opened: (from, peer, plaintext).
    got: Vec<(SocketAddr, NodeId, Bytes)>,
}

fn member(n: u8, network: &Secret, stamp: u64) -> Host {
    let keys = KeyPair::generate();
    Host {
        id: NodeId(n as u64),
        at: addr(n),
        sec: Secure::new(SecureConfig::member(
            keys.clone(),
            network.clone(),
            stamp,
            n as u64,
        )),
        keys,
        got: Vec::new(),
    }
}

/// Everyone knows everyone (what the bootstrapper hands out).
fn introduce(hosts: &mut [&mut Host]) {
    let dir: Vec<(NodeId, common::keys::PublicKey)> =
        hosts.iter().map(|h| (h.id, h.keys.public)).collect();
    for h in hosts.iter_mut() {
        for (id, k) in &dir {
            if *id != h.id {
                h.sec.set_member(*id, *k);
            }
        }
    }
}

/// Moves datagrams between hosts until nothing moves (all at time `now`); returns what went
/// on the wire: (from, to, bytes).
fn pump(hosts: &mut [&mut Host], now: Instant) -> Vec<(SocketAddr, SocketAddr, Bytes)> {
    let mut wire = Vec::new();
    loop {
        let mut moved = Vec::new();
        for h in hosts.iter_mut() {
            while let Some((to, b)) = h.sec.poll_transmit() {
                moved.push((h.at, to, b));
            }
        }
        if moved.is_empty() {
            return wire;
        }
        for (from, to, b) in moved {
            wire.push((from, to, b.clone()));
            if let Some(h) = hosts.iter_mut().find(|h| h.at == to) {
                if let Some(o) = h.sec.handle_datagram(now, from, &b[..]) {
                    h.got.push((o.from, o.peer, o.plaintext.freeze()));
                }
            }
        }
    }
}

fn network() -> Secret {
    Secret::random()
}

#[test]
fn members_handshake_and_exchange_both_ways() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    introduce(&mut [&mut a, &mut b]);
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    a.sec.send(t0, b.id, b.at, ping(a.id, 2));
    let wire = pump(&mut [&mut a, &mut b], t0);
    // Initiation, response, the two queued datagrams.
    assert_eq!(wire.len(), 4, "{wire:?}");
    assert_eq!(b.got.len(), 2);
    assert_eq!(b.got[0], (a.at, a.id, ping(a.id, 1)));
    // The responder's session is confirmed by the queued data: it sends at once.
    b.sec.send(t0, a.id, a.at, ping(b.id, 3));
    let wire = pump(&mut [&mut a, &mut b], t0);
    assert_eq!(wire.len(), 1, "no new handshake");
    assert_eq!(a.got, vec![(b.at, b.id, ping(b.id, 3))]);
    assert!(a.sec.has_session(b.id) && b.sec.has_session(a.id));
    // Nothing in clear on the wire.
    let clear = ping(a.id, 1);
    assert!(wire
        .iter()
        .all(|(_, _, w)| !w.windows(8).any(|x| x == &clear[4..12])));
    assert_eq!(
        a.sec.stats().rejected_total() + b.sec.stats().rejected_total(),
        0
    );
}

/// A datagram is opened where it arrived: the plaintext handed out is the received buffer's
/// own bytes (after the session header), decrypted in place, not a copy.
#[test]
fn data_is_opened_in_the_buffer_it_arrived_in() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    introduce(&mut [&mut a, &mut b]);
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    pump(&mut [&mut a, &mut b], t0);
    a.sec.send(t0, b.id, b.at, ping(a.id, 2));
    let (_, sealed) = a.sec.poll_transmit().expect("sealed at once");
    let arrived = bytes::BytesMut::from(&sealed[..]);
    let range = arrived.as_ptr_range();
    let opened = b.sec.handle_datagram(t0, a.at, arrived).expect("opens");
    assert_eq!(opened.plaintext, ping(a.id, 2));
    let p = opened.plaintext.as_ptr();
    assert!(
        range.contains(&p) && p != range.start,
        "opened into another buffer: copied"
    );
}

#[test]
fn replays_bit_flips_garbage_and_forgeries_are_dropped_and_counted_without_answer() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    introduce(&mut [&mut a, &mut b]);
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    let wire = pump(&mut [&mut a, &mut b], t0);
    let init = wire[0].2.clone();
    let data = wire.last().unwrap().2.clone();
    assert_eq!(b.got.len(), 1);
    let attacker = addr(66);
    let t1 = t0 + Duration::from_millis(10);
    // A captured data datagram, replayed (from anywhere).
    assert!(b.sec.handle_datagram(t1, attacker, &data[..]).is_none());
    assert!(b.sec.handle_datagram(t1, a.at, &data[..]).is_none());
    assert_eq!(b.sec.stats().rejected(Reason::Replay), 2);
    // Every single bit flipped, one at a time.
    for i in 0..data.len() * 8 {
        let mut x = data.to_vec();
        x[i / 8] ^= 1 << (i % 8);
        assert!(
            b.sec.handle_datagram(t1, attacker, &x[..]).is_none(),
            "bit {i}"
        );
    }
    // A replayed initiation: refused before any answer (its stamp is not newer).
    assert!(b.sec.handle_datagram(t1, attacker, &init[..]).is_none());
    assert_eq!(b.sec.stats().rejected(Reason::ReplayedHandshake), 1);
    // Garbage of every length.
    let mut rng = common::rng::Rng::seeded(7);
    for len in 0..1500 {
        let g: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        assert!(b.sec.handle_datagram(t1, attacker, &g[..]).is_none());
    }
    assert!(b.sec.poll_transmit().is_none(), "nothing is answered");
    assert_eq!(b.got.len(), 1, "nothing more was accepted");
    let s = b.sec.stats();
    println!("rejected: {:?}", s.rejected_by_reason());
    assert_eq!(
        s.reply_bytes,
        wire[1].2.len() as u64,
        "only the one real response"
    );
    // The session still works.
    a.sec.send(t1, b.id, b.at, ping(a.id, 2));
    pump(&mut [&mut a, &mut b], t1);
    assert_eq!(b.got.len(), 2);
}

#[test]
fn a_host_with_another_network_key_or_an_unknown_key_gets_nothing() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    // C has a key B does not know; D has another network key.
    let mut c = member(3, &net, 300);
    let mut d = member(4, &network(), 400);
    introduce(&mut [&mut a, &mut b]);
    c.sec.set_member(b.id, b.keys.public);
    d.sec.set_member(b.id, b.keys.public);
    b.sec.set_member(d.id, d.keys.public);
    c.sec.send(t0, b.id, b.at, ping(c.id, 1));
    d.sec.send(t0, b.id, b.at, ping(d.id, 1));
    let wire = pump(&mut [&mut b, &mut c, &mut d], t0);
    assert_eq!(wire.len(), 2, "two initiations, no answer: {wire:?}");
    assert!(b.got.is_empty());
    assert_eq!(b.sec.stats().rejected(Reason::UnknownKey), 1);
    assert_eq!(b.sec.stats().rejected(Reason::BadMac), 1);
    assert_eq!(b.sec.stats().reply_bytes, 0);
    // A datagram from a member with C's id inside: B drops it (the id is the session's).
    a.sec.send(t0, b.id, b.at, ping(c.id, 9));
    pump(&mut [&mut a, &mut b], t0);
    assert!(b.got.is_empty());
    assert_eq!(b.sec.stats().rejected(Reason::WrongSender), 1);
}

#[test]
fn a_restarted_host_handshakes_again_and_both_directions_resume() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    introduce(&mut [&mut a, &mut b]);
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    pump(&mut [&mut a, &mut b], t0);
    // B restarts: same keys, no sessions, a later stamp base.
    let t1 = t0 + Duration::from_secs(1);
    b.sec = Secure::new(SecureConfig::member(
        b.keys.clone(),
        net.clone(),
        10_000,
        22,
    ));
    b.sec.set_member(a.id, a.keys.public);
    b.got.clear();
    a.sec.send(t1, b.id, b.at, ping(a.id, 2));
    pump(&mut [&mut a, &mut b], t1);
    assert!(b.got.is_empty());
    assert_eq!(b.sec.stats().rejected(Reason::UnknownSession), 1);
    // B has something to send: it handshakes, A accepts (newer stamp), both resume.
    b.sec.send(t1, a.id, a.at, ping(b.id, 3));
    pump(&mut [&mut a, &mut b], t1);
    assert_eq!(a.got.last().unwrap().2, ping(b.id, 3));
    a.sec.send(t1, b.id, b.at, ping(a.id, 4));
    pump(&mut [&mut a, &mut b], t1);
    assert_eq!(b.got, vec![(a.at, a.id, ping(a.id, 4))]);
}

#[test]
fn sessions_are_rekeyed_and_unanswered_handshakes_retried_with_backoff() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    introduce(&mut [&mut a, &mut b]);
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    pump(&mut [&mut a, &mut b], t0);
    // Past REKEY_AFTER, A's next send opens a new session, the data goes on the old one.
    let t1 = t0 + REKEY_AFTER + Duration::from_secs(1);
    a.sec.send(t1, b.id, b.at, ping(a.id, 2));
    let wire = pump(&mut [&mut a, &mut b], t1);
    assert_eq!(b.got.len(), 2);
    assert_eq!(
        wire.len(),
        4,
        "data, initiation, response, keepalive: {wire:?}"
    );
    assert_eq!(a.sec.stats().handshakes, 2);
    let t2 = t1 + Duration::from_secs(100);
    a.sec.send(t2, b.id, b.at, ping(a.id, 3));
    b.sec.send(t2, a.id, a.at, ping(b.id, 4));
    let wire = pump(&mut [&mut a, &mut b], t2);
    assert_eq!(wire.len(), 2, "the new session carries both ways: {wire:?}");
    assert_eq!(b.got.len(), 3);
    assert_eq!(a.got.len(), 1);

    // A peer that never answers: retries at 200, 400, 800 ms … intervals, capped.
    let mut c = member(3, &net, 300);
    let dead = member(9, &net, 900);
    c.sec.set_member(dead.id, dead.keys.public);
    c.sec.send(t0, dead.id, dead.at, ping(c.id, 1));
    let mut sent = vec![t0];
    while c.sec.poll_transmit().is_some() {}
    for _ in 0..8 {
        let t = c.sec.poll_timeout().unwrap();
        c.sec.handle_timeout(t);
        while c.sec.poll_transmit().is_some() {
            sent.push(t);
        }
    }
    let gaps: Vec<u64> = sent
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    assert_eq!(gaps, vec![200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    assert_eq!(RETRY_FIRST, Duration::from_millis(200));
}

#[test]
fn a_member_that_moves_keeps_its_session() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 200));
    introduce(&mut [&mut a, &mut b]);
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    pump(&mut [&mut a, &mut b], t0);
    a.at = addr(11);
    a.sec.send(t0, b.id, b.at, ping(a.id, 2));
    pump(&mut [&mut a, &mut b], t0);
    assert_eq!(b.got.last().unwrap().0, addr(11));
    // B answers where A is now, on the same session.
    b.sec.send(t0, a.id, addr(1), ping(b.id, 3));
    let wire = pump(&mut [&mut a, &mut b], t0);
    assert_eq!(wire.len(), 1);
    assert_eq!(wire[0].1, addr(11));
    assert_eq!(a.got.len(), 1);
}

fn viewer(n: u8, secret: Option<Secret>) -> Host {
    Host {
        id: NodeId(1000 + n as u64),
        at: SocketAddr::from(([127, 0, 1, n], 9000)),
        keys: KeyPair::generate(),
        sec: Secure::new(SecureConfig::viewer(secret, n as u64)),
        got: Vec::new(),
    }
}

#[test]
fn viewers_learn_the_pop_key_and_are_bound_to_their_id() {
    let t0 = Instant::now();
    let net = network();
    let mut pop = member(1, &net, 100);
    let mut v = viewer(1, None);
    v.sec.add_pop(pop.at, None);
    // The client does not know the PoP's id yet: it names it by address.
    v.sec.send(t0, NodeId(0), pop.at, ping(v.id, 1));
    let wire = pump(&mut [&mut pop, &mut v], t0);
    assert_eq!(pop.got, vec![(v.at, v.id, ping(v.id, 1))]);
    // No amplification: the response is no larger than the initiation.
    assert_eq!(wire[0].2.len(), wire[1].2.len());
    assert!(
        matches!(v.sec.poll_event(), Some(SecureEvent::PopKey { key, .. }) if key == pop.keys.public)
    );
    pop.sec.send(t0, v.id, v.at, ping(pop.id, 2));
    pump(&mut [&mut pop, &mut v], t0);
    assert_eq!(v.got, vec![(pop.at, pop.id, ping(pop.id, 2))]);
    // Afterwards the client may name the PoP by its id.
    v.sec.send(t0, pop.id, pop.at, ping(v.id, 3));
    pump(&mut [&mut pop, &mut v], t0);
    assert_eq!(pop.got.len(), 2);
    // Another viewer cannot use v's id on its own session.
    let mut w = viewer(2, None);
    w.sec.add_pop(pop.at, Some(pop.keys.public));
    w.sec.send(t0, NodeId(0), pop.at, ping(w.id, 1));
    w.sec.send(t0, NodeId(0), pop.at, ping(v.id, 1));
    pump(&mut [&mut pop, &mut w], t0);
    assert_eq!(pop.got.len(), 3, "w's own datagram only");
    assert_eq!(pop.sec.stats().rejected(Reason::WrongSender), 1);
}

#[test]
fn a_wrong_viewer_secret_is_access_denied_and_a_changed_pop_key_is_refused() {
    let t0 = Instant::now();
    let net = network();
    let mut pop = member(1, &net, 100);
    let secret = Secret::random();
    pop.sec = Secure::new(SecureConfig {
        viewer_secret: Some(secret.clone()),
        ..SecureConfig::member(pop.keys.clone(), net.clone(), 100, 1)
    });
    let mut v = viewer(1, None);
    v.sec.add_pop(pop.at, None);
    v.sec.send(t0, NodeId(0), pop.at, ping(v.id, 1));
    pump(&mut [&mut pop, &mut v], t0);
    assert!(pop.got.is_empty());
    assert_eq!(
        v.sec.poll_event(),
        Some(SecureEvent::AccessDenied { pop: pop.at })
    );
    // With the secret it works.
    let mut ok = viewer(2, Some(secret));
    ok.sec.add_pop(pop.at, None);
    ok.sec.send(t0, NodeId(0), pop.at, ping(ok.id, 1));
    pump(&mut [&mut pop, &mut ok], t0);
    assert_eq!(pop.got.len(), 1);
    // A pinned key that is not the PoP's.
    let mut p = viewer(3, Some(open_viewer_secret()));
    let other = KeyPair::generate().public;
    let mut open_pop = member(5, &net, 100);
    p.sec.add_pop(open_pop.at, Some(other));
    p.sec.send(t0, NodeId(0), open_pop.at, ping(p.id, 1));
    pump(&mut [&mut open_pop, &mut p], t0);
    assert!(open_pop.got.is_empty());
    assert!(matches!(
        p.sec.poll_event(),
        Some(SecureEvent::PopKeyMismatch { pinned, got, .. }) if pinned == other && got == open_pop.keys.public
    ));
}

/// A viewer initiation from a fresh viewer (what an attacker can mint at will).
fn viewer_init(seed: u64, pop: SocketAddr) -> Bytes {
    let mut v = Secure::new(SecureConfig::viewer(None, seed));
    v.add_pop(pop, None);
    v.send(Instant::now(), NodeId(0), pop, ping(NodeId(seed), 1));
    v.poll_transmit().unwrap().1
}

#[test]
fn under_a_handshake_flood_spoofers_get_cookies_and_a_real_viewer_still_joins() {
    let t0 = Instant::now();
    let net = network();
    let mut pop = member(1, &net, 100);
    // 2 000 viewer initiations in 0.2 s (10 000/s) from 2 000 spoofed addresses.
    let (mut spoofed_in, mut answered) = (0, 0);
    for i in 0..2000u32 {
        let now = t0 + Duration::from_micros(100 * i as u64);
        let from = SocketAddr::from(([127, 0, 9, (i % 250) as u8], 20000 + i as u16));
        let init = viewer_init(i as u64 + 10, pop.at);
        spoofed_in += init.len();
        pop.sec.handle_datagram(now, from, &init[..]);
        while let Some((to, b)) = pop.sec.poll_transmit() {
            assert_eq!(to, from);
            assert!(b.len() <= init.len(), "no amplification");
            answered += b.len();
        }
    }
    let s = pop.sec.stats();
    // The budget's burst and refill got responses (Diffie-Hellman work); the rest a cookie.
    let responses = 2000 - s.cookie_replies;
    assert!(
        (50..=200).contains(&responses),
        "{responses} handshakes answered"
    );
    assert_eq!(s.rejected(Reason::Busy), s.cookie_replies);
    assert!(answered <= spoofed_in);
    // A real viewer now: one round trip for the cookie, then it is in.
    let now = t0 + Duration::from_millis(200);
    let mut v = viewer(1, None);
    v.sec.add_pop(pop.at, None);
    v.sec.send(now, NodeId(0), pop.at, ping(v.id, 1));
    let wire = pump(&mut [&mut pop, &mut v], now);
    let kinds: Vec<(SocketAddr, u8, usize)> =
        wire.iter().map(|(f, _, b)| (*f, b[3], b.len())).collect();
    assert_eq!(
        kinds[..3],
        [(v.at, 3, 108), (pop.at, 6, 52), (v.at, 3, 108)],
        "initiation, cookie reply, initiation with the cookie: {kinds:?}"
    );
    assert_eq!(pop.got, vec![(v.at, v.id, ping(v.id, 1))]);
    assert_eq!(v.sec.stats().cookies_received, 1);
    // While the flood goes on, spoofers still get only cookies.
    let busy = pop.sec.stats().rejected(Reason::Busy);
    pop.sec.handle_datagram(
        now,
        SocketAddr::from(([127, 0, 9, 1], 1)),
        &viewer_init(5, pop.at)[..],
    );
    assert_eq!(pop.sec.stats().rejected(Reason::Busy), busy + 1);
    assert_eq!(pop.sec.poll_transmit().unwrap().1[3], 6);
    // The cookie is bound to the viewer's address: from elsewhere it is worth nothing.
    let mut moved = viewer(2, None);
    moved.sec.add_pop(pop.at, None);
    moved.sec.send(now, NodeId(0), pop.at, ping(moved.id, 1));
    let (_, first) = moved.sec.poll_transmit().unwrap();
    pop.sec.handle_datagram(now, moved.at, &first[..]);
    let (_, cookie) = pop.sec.poll_transmit().unwrap();
    assert_eq!(cookie[3], 6);
    moved.sec.handle_datagram(now, pop.at, &cookie[..]);
    let (_, with_cookie) = moved.sec.poll_transmit().unwrap();
    let elsewhere = SocketAddr::from(([127, 0, 9, 77], 9000));
    pop.sec.handle_datagram(now, elsewhere, &with_cookie[..]);
    assert_eq!(
        pop.sec.poll_transmit().unwrap().1[3],
        6,
        "a new cookie, no response"
    );
    // One address with a valid cookie is limited to its own rate (burst 5).
    let mut refused = 0;
    for k in 0..20u64 {
        let mut w = viewer(3, None);
        w.sec.add_pop(pop.at, None);
        w.sec.send(now, NodeId(0), pop.at, ping(NodeId(k), 1));
        let (_, init) = w.sec.poll_transmit().unwrap();
        pop.sec.handle_datagram(now, w.at, &init[..]);
        let (_, c) = pop.sec.poll_transmit().unwrap();
        w.sec.handle_datagram(now, pop.at, &c[..]);
        let (_, init2) = w.sec.poll_transmit().unwrap();
        let before = pop.sec.stats().rejected(Reason::Refused);
        pop.sec.handle_datagram(now, w.at, &init2[..]);
        while pop.sec.poll_transmit().is_some() {}
        refused += pop.sec.stats().rejected(Reason::Refused) - before;
    }
    assert_eq!(refused, 15);
    // When the flood stops, the load ends: no cookie round trip any more.
    let later = now + Duration::from_secs(2);
    let mut late = viewer(4, None);
    late.sec.add_pop(pop.at, None);
    late.sec.send(later, NodeId(0), pop.at, ping(late.id, 1));
    let wire = pump(&mut [&mut pop, &mut late], later);
    assert_eq!(wire[1].2[3], 4, "a response straight away");
}

#[test]
fn members_under_load_handshake_through_a_cookie_and_forged_cookies_change_nothing() {
    let t0 = Instant::now();
    let net = network();
    let (mut a, mut b) = (member(1, &net, 100), member(2, &net, 100));
    introduce(&mut [&mut a, &mut b]);
    // b is under load: a flood of viewer initiations drained its budget.
    for i in 0..200u32 {
        let from = SocketAddr::from(([127, 0, 9, (i % 250) as u8], 20000 + i as u16));
        b.sec
            .handle_datagram(t0, from, &viewer_init(i as u64 + 10, b.at)[..]);
        while b.sec.poll_transmit().is_some() {}
    }
    a.sec.send(t0, b.id, b.at, ping(a.id, 1));
    // A forged cookie reply for a's initiation (its index is on the wire) is dropped.
    let (to, init) = a.sec.poll_transmit().unwrap();
    assert_eq!(init.len(), 144);
    let mut forged = [0u8; 52];
    forged[..4].copy_from_slice(b"PS\x02\x06");
    forged[4..8].copy_from_slice(&init[4..8]);
    a.sec.handle_datagram(t0, b.at, &forged[..]);
    assert_eq!(a.sec.stats().rejected(Reason::BadCookie), 1);
    assert!(
        a.sec.poll_transmit().is_none(),
        "a forged cookie makes us send nothing"
    );
    // The real exchange: cookie, initiation with it, response, data.
    b.sec.handle_datagram(t0, a.at, &init[..]);
    assert_eq!(b.sec.stats().cookie_replies, 201 - 50);
    let _ = to;
    pump(&mut [&mut a, &mut b], t0);
    assert_eq!(b.got, vec![(a.at, a.id, ping(a.id, 1))]);
    assert_eq!(a.sec.stats().cookies_received, 1);
}
