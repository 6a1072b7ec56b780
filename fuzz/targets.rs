// The decoders every fuzz target drives, in one place: `include!`d by each target in
// `fuzz_targets/` (cargo-fuzz, nightly) and by `common/tests/fuzz_corpus.rs` (stable: the corpus
// and seeded mutations of it run in the test command). A driver panics only on a real bug: a
// decoder that panics, or a documented property that does not hold (named in the assertion).
#[allow(dead_code)]
mod targets {
    use common::keys::{KeyPair, Secret};
    use common::secure::{Secure, SecureConfig};
    use common::topology::Topology;
    use common::ts::{
        datagram_packets, pes_has_idr, KeyframeDetector, PsiTracker, TsPacket, TsSplitter,
        SYNC_BYTE, TS_PACKET_LEN,
    };
    use common::wire::{
        decode_as, decode_header, encode_with_limit, Body, BootstrapRequest, BootstrapResponse,
        Datagram, Message,
    };
    use common::NodeId;
    use std::net::SocketAddr;
    use std::sync::OnceLock;
    use std::time::Instant;

    /// A target's driver: one input, panics only on a bug.
    pub type Driver = fn(&[u8]);

    /// The targets by name: the names of `fuzz_targets/*.rs` and of the `corpus/` directories.
    pub const ALL: [(&str, Driver); 6] = [
        ("wire_datagram", wire_datagram),
        ("wire_header", wire_header),
        ("bootstrap_frames", bootstrap_frames),
        ("secure_packets", secure_packets),
        ("topology_toml", topology_toml),
        ("ts_splitter", ts_splitter),
    ];

    /// A UDP datagram (version 1). What decodes re-encodes, and the re-encoding decodes to the
    /// same datagram. The in-place video parser accepts exactly the video datagrams the decoder
    /// accepts, with the same fields.
    pub fn wire_datagram(data: &[u8]) {
        let decoded = Datagram::decode(data);
        if let Ok(d) = &decoded {
            let again = d.encode().expect("a decoded datagram re-encodes");
            assert!(again.len() <= data.len(), "re-encoding grew");
            assert_eq!(
                &Datagram::decode(&again).expect("a re-encoded datagram decodes"),
                d
            );
        }
        let frame = common::wire::VideoFrame::parse(bytes::BytesMut::from(data));
        match (decoded.map(|d| d.body), frame) {
            (Ok(common::wire::Body::Video(p)), Ok(Ok(f))) => assert_eq!(f.into_packet(), p),
            (Ok(common::wire::Body::Video(_)), f) => panic!("the parser refused video: {f:?}"),
            (Ok(_), f) => assert!(matches!(f, Ok(Err(_))), "the parser took a non-video"),
            (Err(_), f) => assert!(!matches!(f, Ok(Ok(_))), "the parser took a malformed one"),
        }
    }

    /// The fixed header alone.
    pub fn wire_header(data: &[u8]) {
        if let Ok(h) = decode_header(data) {
            assert_eq!(data[..2], common::wire::MAGIC);
            assert_eq!(h.version, common::wire::PROTOCOL_VERSION);
        }
    }

    /// The request and the answer of a bootstrap session (the frame after its length prefix),
    /// each round-tripped like a datagram.
    pub fn bootstrap_frames(data: &[u8]) {
        if let Ok((h, q)) = decode_as::<BootstrapRequest>(data) {
            let again = encode_with_limit(&h, &q, data.len()).expect("a request re-encodes");
            assert_eq!(decode_as::<BootstrapRequest>(&again).unwrap(), (h, q));
        }
        if let Ok((h, r)) = decode_as::<BootstrapResponse>(data) {
            let again = encode_with_limit(&h, &r, data.len()).expect("an answer re-encodes");
            assert_eq!(decode_as::<BootstrapResponse>(&again).unwrap(), (h, r));
        }
    }

    /// One instant for every run, so a run depends on its input only (not on the clock).
    fn now() -> Instant {
        static T: OnceLock<Instant> = OnceLock::new();
        *T.get_or_init(Instant::now)
    }

    /// Where every packet comes from (and the viewer's PoP).
    pub fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], 8010))
    }

    /// The member under attack: private key [7; 32], network key [9; 32], knowing one other
    /// member (id 2, private key [8; 32]). It also accepts viewers (open PoP).
    pub fn member() -> Secure {
        // The key pairs are computed once (a base-point multiplication each).
        static KEYS: OnceLock<(KeyPair, KeyPair)> = OnceLock::new();
        let (ours, theirs) = KEYS.get_or_init(|| {
            (
                KeyPair::from_private(Secret([7; 32])),
                KeyPair::from_private(Secret([8; 32])),
            )
        });
        let mut s = Secure::new(SecureConfig::member(ours.clone(), Secret([9; 32]), 1, 1));
        s.set_member(NodeId(2), theirs.public);
        s
    }

    /// A viewer with a handshake in progress with the PoP at [`addr`] (one datagram queued).
    pub fn viewer() -> Secure {
        let mut v = Secure::new(SecureConfig::viewer(None, 1));
        v.add_pop(addr(), None);
        let ping = Datagram::new(NodeId(5), Body::Unreliable(Message::Ping { nonce: 1 }));
        v.send(now(), NodeId(0), addr(), ping.encode().expect("encodes"));
        while v.poll_transmit().is_some() {}
        v
    }

    /// Any packet, at a fresh member and at a viewer mid-handshake. Neither has a session, so
    /// nothing may authenticate; the only answer allowed is one handshake reply no larger than
    /// the packet (no amplification).
    pub fn secure_packets(data: &[u8]) {
        for (who, mut s) in [("member", member()), ("viewer", viewer())] {
            let opened = s.handle_datagram(now(), addr(), data);
            assert!(
                opened.is_none(),
                "{who} opened a datagram without a session"
            );
            let mut replies = 0;
            while let Some((to, reply)) = s.poll_transmit() {
                replies += 1;
                assert_eq!(to, addr(), "{who} answered elsewhere");
                assert!(
                    replies == 1 && reply.len() <= data.len(),
                    "{who} amplified: reply {replies} of {} bytes to {} bytes",
                    reply.len(),
                    data.len()
                );
            }
            while s.poll_event().is_some() {}
        }
    }

    /// A topology file. What parses serialises to a file that parses to the same hosts and
    /// neighbours.
    pub fn topology_toml(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok((t, _warnings)) = Topology::parse(text) else {
            return;
        };
        let out = t.to_toml_string();
        let (back, _) = Topology::parse(&out)
            .unwrap_or_else(|e| panic!("to_toml_string output does not parse: {e}\n{out}"));
        // Hosts, neighbours and pinned keys (what `Topology`'s equality compares).
        assert_eq!(back, t, "{out}");
    }

    /// MPEG-TS: the splitter (low-latency and strict) fed in two pieces cut where the first
    /// byte says; every packet it returns, every 188-byte chunk of the input and the input as
    /// a video datagram's payload; every packet through the packet view, PSI tracker and keyframe detectors;
    /// the input as a PES packet through the IDR scan.
    pub fn ts_splitter(data: &[u8]) {
        let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
        let chunks: Vec<&[u8]> = data.chunks(TS_PACKET_LEN).collect();
        let whole = !data.is_empty() && data.len().is_multiple_of(TS_PACKET_LEN);
        let clean = whole && chunks.iter().all(|c| c[0] == SYNC_BYTE);
        for (mode, mut s) in [
            ("default", TsSplitter::new()),
            ("strict", TsSplitter::strict()),
        ] {
            let mut out = Vec::new();
            s.push(&data[..cut]);
            out.extend(s.drain());
            s.push(&data[cut..]);
            out.extend(s.drain());
            s.finish();
            out.extend(s.drain());
            for p in &out {
                assert!(
                    p.len() == TS_PACKET_LEN && p[0] == SYNC_BYTE,
                    "{mode} splitter returned a {}-byte packet starting {:#04x}",
                    p.len(),
                    p[0]
                );
            }
            assert_eq!(s.stats().packets, out.len() as u64, "{mode} packet count");
            if clean {
                let got: Vec<&[u8]> = out.iter().map(|p| &p[..]).collect();
                assert!(got == chunks, "{mode} splitter changed a clean stream");
            }
            inspect(
                out.iter()
                    .map(|p| TsPacket::parse(p).expect("a whole packet")),
            );
        }
        inspect(chunks.iter().filter_map(|c| TsPacket::parse(c).ok()));
        let synced = chunks.iter().filter(|c| c[0] == SYNC_BYTE).count();
        let parsed = datagram_packets(data).filter(Result::is_ok).count();
        assert_eq!(parsed, if whole { synced } else { 0 }, "datagram packets");
        let _ = pes_has_idr(data);
    }

    /// Reads every field of every packet and runs them through the stream trackers.
    fn inspect<'a>(packets: impl Iterator<Item = TsPacket<'a>>) {
        let mut psi = PsiTracker::new();
        let mut rai = KeyframeDetector::new(0x100);
        let mut nal = KeyframeDetector::nal_only(0x100);
        let mut cc = common::ts::ContinuityChecker::new();
        for p in packets {
            let _ = (p.pid(), p.payload_unit_start(), p.transport_error());
            let _ = (p.scrambling_control(), p.continuity_counter(), p.pcr());
            let _ = (p.random_access_indicator(), p.discontinuity_indicator());
            if let Some(af) = p.adaptation_field() {
                let _ = (af.flags(), af.es_priority(), af.pcr(), af.as_bytes().len());
            }
            assert!(p.payload().len() <= TS_PACKET_LEN - 4);
            let _ = pes_has_idr(p.payload());
            psi.push(&p);
            if let Some(video) = psi.info().and_then(|i| i.video_pid) {
                if video != rai.pid() {
                    rai = KeyframeDetector::new(video);
                    nal = KeyframeDetector::nal_only(video);
                }
            }
            for d in [&mut rai, &mut nal] {
                if let Some(k) = d.push(&p) {
                    assert!(k.pusi_seq < d.next_seq(), "keyframe from the future");
                }
            }
            let _ = cc.push(&p);
        }
    }
}
