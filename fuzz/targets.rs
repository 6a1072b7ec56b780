// The decoders every fuzz target drives, in one place: `include!`d by each target in
// `fuzz_targets/` (cargo-fuzz, nightly) and by `common/tests/fuzz_corpus.rs` (stable: the
// corpus and seeded mutations of it run in the test command).
#[allow(dead_code)]
mod targets {
    use common::keys::{KeyPair, Secret};
    use common::secure::{Secure, SecureConfig};
    use common::wire::{Body, BootstrapRequest, BootstrapResponse, Datagram, Message};
    use common::NodeId;
    use std::net::SocketAddr;
    use std::sync::OnceLock;
    use std::time::Instant;

    /// The targets, by name (the corpus directories).
    pub const ALL: [(&str, fn(&[u8])); 6] = [
        ("wire_datagram", wire_datagram),
        ("wire_header", wire_header),
        ("bootstrap_frames", bootstrap_frames),
        ("secure_packets", secure_packets),
        ("topology_toml", topology_toml),
        ("ts_splitter", ts_splitter),
    ];

    /// A datagram decodes, or not; what decodes re-encodes to something that decodes alike.
    pub fn wire_datagram(data: &[u8]) {
        if let Ok(d) = Datagram::decode(data) {
            if let Ok(b) = d.encode() {
                assert_eq!(Datagram::decode(&b).expect("re-encoded decodes"), d);
            }
        }
    }

    pub fn wire_header(data: &[u8]) {
        let _ = common::wire::decode_header(data);
    }

    /// The request and the answer inside a bootstrap session.
    pub fn bootstrap_frames(data: &[u8]) {
        let _ = common::wire::decode_as::<BootstrapRequest>(data);
        let _ = common::wire::decode_as::<BootstrapResponse>(data);
    }

    fn now() -> Instant {
        static T: OnceLock<Instant> = OnceLock::new();
        *T.get_or_init(Instant::now)
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], 8010))
    }

    /// The fixed member the secure target attacks (network key [9; 32], private key [7; 32]),
    /// knowing one other member (private key [8; 32], id 2).
    pub fn member() -> Secure {
        let mut s = Secure::new(SecureConfig::member(
            KeyPair::from_private(Secret([7; 32])),
            Secret([9; 32]),
            1,
            1,
        ));
        s.set_member(NodeId(2), KeyPair::from_private(Secret([8; 32])).public);
        s
    }

    /// A viewer with a handshake in progress with the PoP at `addr()`.
    pub fn viewer() -> Secure {
        let mut v = Secure::new(SecureConfig::viewer(None, 1));
        v.add_pop(addr(), None);
        let ping = Datagram::new(NodeId(5), Body::Unreliable(Message::Ping { nonce: 1 }));
        v.send(now(), NodeId(0), addr(), ping.encode().expect("encodes"));
        while v.poll_transmit().is_some() {}
        v
    }

    /// Any packet, at a member (which also takes viewers) and at a viewer mid-handshake.
    pub fn secure_packets(data: &[u8]) {
        for mut s in [member(), viewer()] {
            let _ = s.handle_datagram(now(), addr(), data);
            while s.poll_transmit().is_some() {}
            while s.poll_event().is_some() {}
        }
    }

    pub fn topology_toml(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = common::topology::Topology::parse(text);
        }
    }

    /// The splitter fed in two pieces (split where the first byte says), and every 188-byte
    /// chunk parsed as a packet.
    pub fn ts_splitter(data: &[u8]) {
        let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
        let mut s = common::ts::TsSplitter::new();
        s.push(&data[..cut]);
        while s.pop().is_some() {}
        s.push(&data[cut..]);
        s.finish();
        while s.pop().is_some() {}
        for p in data.chunks(188) {
            if let Ok(p) = common::ts::TsPacket::parse(p) {
                let _ = (p.pid(), p.payload_unit_start(), p.random_access_indicator());
            }
        }
    }
}
