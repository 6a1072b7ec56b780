use super::*;
use common::ts::{crc32_mpeg2, datagram_packets, Continuity, ContinuityChecker, PAT_PID};

const PMT_PID: u16 = 0x1000;
const VIDEO: u16 = 0x100;
const AUDIO: u16 = 0x101;
/// 90 kHz PTS offset of the first frame (ffmpeg's 1.4 s).
const PTS0: u64 = 126_000;

struct Gen {
    cc: HashMap<u16, u8>,
    out: Vec<[u8; TS_PACKET_LEN]>,
}

impl Gen {
    fn packet(&mut self, pid: u16, pusi: bool, af: Option<Vec<u8>>, payload: &[u8]) {
        let mut p = [0xFFu8; TS_PACKET_LEN];
        let cc = self.cc.entry(pid).or_insert(15);
        *cc = (*cc + 1) & 15;
        p[0] = 0x47;
        p[1] = (u8::from(pusi) << 6) | (pid >> 8) as u8;
        p[2] = pid as u8;
        let afc = if af.is_some() { 0x30 } else { 0x10 };
        p[3] = afc | *cc;
        let mut at = 4;
        if let Some(af) = af {
            // Adaptation field padded with stuffing so that the payload ends the packet.
            let len = TS_PACKET_LEN - 5 - payload.len();
            p[4] = len as u8;
            p[5..5 + af.len()].copy_from_slice(&af);
            at = 5 + len;
        }
        assert_eq!(
            at + payload.len(),
            TS_PACKET_LEN,
            "payload must fill the packet"
        );
        p[at..].copy_from_slice(payload);
        self.out.push(p);
    }

    fn section(&mut self, pid: u16, table: &[u8]) {
        let crc = crc32_mpeg2(table);
        let mut pl = vec![0u8];
        pl.extend_from_slice(table);
        pl.extend_from_slice(&crc.to_be_bytes());
        pl.resize(184, 0xFF);
        self.packet(pid, true, None, &pl);
    }

    fn psi(&mut self) {
        let pat = [0x00, 0xB0, 13, 0, 1, 0xC1, 0, 0, 0, 1, 0xF0, 0x00];
        self.section(PAT_PID, &pat);
        let pmt = [
            0x02, 0xB0, 23, 0, 1, 0xC1, 0, 0, 0xE1, 0x00, 0xF0, 0, 0x1b, 0xE1, 0x00, 0xF0, 0, 0x0f,
            0xE1, 0x01, 0xF0, 0,
        ];
        self.section(PMT_PID, &pmt);
    }

    /// One PES spread over `n` packets; the first carries PTS (and DTS) and optionally PCR/RAI.
    fn pes(&mut self, pid: u16, n: usize, pts: u64, pcr: Option<u64>, rai: bool) {
        let mut hdr = vec![0, 0, 1, if pid == VIDEO { 0xE0 } else { 0xC0 }, 0, 0, 0x80];
        let dts = pid == VIDEO;
        hdr.push(if dts { 0xC0 } else { 0x80 });
        hdr.push(if dts { 10 } else { 5 });
        let mut ts = [0u8; 5];
        ts[0] = if dts { 0x30 } else { 0x20 };
        write_ts(&mut ts, pts);
        hdr.extend_from_slice(&ts);
        if dts {
            ts[0] = 0x10;
            write_ts(&mut ts, pts);
            hdr.extend_from_slice(&ts);
        }
        // NAL start code of an IDR / non-IDR slice after the header.
        hdr.extend_from_slice(&[0, 0, 0, 1, if rai { 0x65 } else { 0x41 }]);
        let mut af = vec![u8::from(rai) << 6];
        if let Some(v) = pcr {
            af[0] |= 0x10;
            let mut b = [0u8; 6];
            write_pcr(&mut b, v);
            af.extend_from_slice(&b);
        }
        let room = 184 - 1 - af.len();
        hdr.resize(room, 0xAA);
        self.packet(pid, true, Some(af), &hdr);
        for _ in 1..n {
            self.packet(pid, false, None, &[0xAA; 184]);
        }
    }
}

/// A synthetic ffmpeg-like clip: 25 fps, keyframe every second (30 packets, PSI before it),
/// other frames 8 packets, one audio packet per frame; every video PES carries a PCR equal to
/// its DTS minus 0.7 s (like ffmpeg's VBR muxer: all packets of a frame share it).
fn clip(secs: u64) -> Vec<[u8; TS_PACKET_LEN]> {
    let mut g = Gen {
        cc: HashMap::new(),
        out: Vec::new(),
    };
    for f in 0..secs * 25 {
        let pts = PTS0 + f * 3600;
        let key = f.is_multiple_of(25);
        if key {
            g.psi();
        }
        let pcr = (pts - 63_000) * 300;
        g.pes(VIDEO, if key { 30 } else { 8 }, pts, Some(pcr), key);
        g.pes(AUDIO, 1, pts, None, true);
    }
    g.out
}

fn start() -> Instant {
    Instant::now()
}

/// Runs `loops` passes of `clip` through a pacer, polling at exactly each due time.
fn run(clip: &[[u8; TS_PACKET_LEN]], loops: usize, t0: Instant) -> (Vec<PacedDatagram>, Pacer) {
    let mut p = Pacer::new(t0, PacerConfig::default());
    let mut out = Vec::new();
    for l in 0..loops {
        for pkt in clip {
            p.push(pkt).unwrap();
            while let Some(t) = p.poll_timeout() {
                out.push(p.poll(t).expect("due at its own timeout"));
            }
        }
        if l + 1 < loops {
            p.end_of_loop();
        }
    }
    p.finish();
    while let Some(t) = p.poll_timeout() {
        out.push(p.poll(t).unwrap());
    }
    (out, p)
}

#[test]
fn pes_timestamp_and_pcr_round_trip() {
    for v in [0, 1, 90_000, PTS_WRAP - 1, 0x1_2345_6789] {
        let mut b = [0x21u8, 0, 0, 0, 0];
        write_ts(&mut b, v);
        assert_eq!(read_ts(&b), v);
        assert_eq!(b[0] & 0xf0, 0x20, "prefix kept");
    }
    for v in [0, 299, 300, 27_000_000 * 3 + 17, PCR_WRAP - 1] {
        let mut g = Gen {
            cc: HashMap::new(),
            out: Vec::new(),
        };
        g.pes(VIDEO, 1, 0, Some(v), false);
        assert_eq!(TsPacket::parse(&g.out[0]).unwrap().pcr(), Some(v));
    }
}

#[test]
fn pacer_due_times_follow_pcr() {
    let clip = clip(4);
    let t0 = start();
    let (out, p) = run(&clip, 1, t0);
    let last = out.last().unwrap().due - t0;
    assert!(
        (3.9..=4.1).contains(&last.as_secs_f64()),
        "last datagram at {last:?}"
    );
    assert_eq!(out[0].due, t0);
    // Every datagram is whole and the count matches the input plus padding.
    assert!(out.iter().all(|d| d.payload.len() == DATAGRAM_PAYLOAD_LEN));
    let padding = p.stats().padding_packets as usize;
    assert_eq!(out.len() * 7, clip.len() + padding);
    // Keyframes start datagrams, with the PAT first: one per second.
    let kf: Vec<_> = out.iter().filter(|d| d.keyframe).collect();
    assert_eq!(kf.len(), 4);
    for d in kf {
        let first = TsPacket::parse(&d.payload[..188]).unwrap();
        assert_eq!(first.pid(), PAT_PID);
    }
    // The data of the second keyframe leaves at ≈ 1 s (its PCR), not before 0.9 s.
    let second = out.iter().filter(|d| d.keyframe).nth(1).unwrap();
    let at = (second.due - t0).as_secs_f64();
    assert!((0.9..=1.1).contains(&at), "second keyframe at {at}");
}

#[test]
fn pacer_is_smooth_no_bursts() {
    let clip = clip(4);
    let t0 = start();
    let (out, _) = run(&clip, 2, t0);
    let gaps: Vec<f64> = out
        .windows(2)
        .map(|w| (w[1].due - w[0].due).as_secs_f64())
        .collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let max = gaps.iter().cloned().fold(0.0, f64::max);
    let min = gaps.iter().cloned().fold(f64::MAX, f64::min);
    for (i, g) in gaps.iter().enumerate() {
        if *g < mean / 2.5 || *g > 2.5 * mean {
            eprintln!(
                "gap {i} {g} kf={} due={:?}",
                out[i + 1].keyframe,
                out[i + 1].due - t0
            );
        }
    }
    // Keyframes are ~4× the size of other frames, yet the rate varies by < 2× and no
    // datagrams leave together.
    assert!(max < 2.5 * mean, "max gap {max} vs mean {mean}");
    assert!(min > mean / 2.5, "min gap {min} vs mean {mean}");
    // Across the loop boundary too (time keeps going, no jump back, no pause).
    assert!(out.windows(2).all(|w| w[1].due >= w[0].due));
    let total = (out.last().unwrap().due - t0).as_secs_f64();
    assert!(
        (7.9..=8.1).contains(&total),
        "two loops of 4 s took {total}"
    );
}

#[test]
fn loop_rewrite_keeps_timestamps_increasing_and_cc_continuous() {
    let clip = clip(2);
    let (out, p) = run(&clip, 3, start());
    assert_eq!(p.stats().loops, 2);
    assert_eq!(p.rewriter().period(), Some(2 * PCR_HZ));
    let mut cc = ContinuityChecker::new();
    let mut last_pcr = None;
    let mut last_ts: HashMap<u16, u64> = HashMap::new();
    let mut pes = 0;
    for d in &out {
        for pkt in datagram_packets(&d.payload) {
            let pkt = pkt.unwrap();
            let c = cc.push(&pkt);
            assert!(
                matches!(c, Continuity::Ok | Continuity::Start | Continuity::Ignored),
                "{c:?} on pid {}",
                pkt.pid()
            );
            if let Some(pcr) = pkt.pcr() {
                assert!(
                    last_pcr.is_none_or(|l| pcr > l),
                    "PCR {pcr} after {last_pcr:?}"
                );
                last_pcr = Some(pcr);
            }
            let pl = pkt.payload();
            if pkt.payload_unit_start() && pl.starts_with(&[0, 0, 1]) && pl[3] >= 0xC0 {
                pes += 1;
                let pts = read_ts(&pl[9..14]);
                if let Some(&l) = last_ts.get(&pkt.pid()) {
                    assert!(pts > l, "PTS {pts} after {l} on pid {}", pkt.pid());
                }
                if pl[7] >> 6 == 3 {
                    assert_eq!(read_ts(&pl[14..19]), pts);
                }
                last_ts.insert(pkt.pid(), pts);
            }
        }
    }
    assert_eq!(cc.lost(), 0);
    assert_eq!(cc.duplicates(), 0);
    assert_eq!(pes, 3 * 2 * 25 * 2);
    // The last PTS is where three back-to-back 2 s passes put it.
    assert_eq!(last_ts[&VIDEO], PTS0 + (3 * 50 - 1) * 3600);
}

#[test]
fn pacer_rebases_instead_of_bursting_when_late() {
    let clip = clip(2);
    let t0 = start();
    let mut p = Pacer::new(t0, PacerConfig::default());
    for pkt in &clip {
        p.push(pkt).unwrap();
    }
    p.finish();
    // The caller oversleeps by 2 s at the start.
    let late = t0 + Duration::from_secs(2);
    let first = p.poll(late).unwrap();
    assert_eq!(first.due, t0);
    assert_eq!(p.stats().rebases, 1);
    // The rest is shifted by the lag: nothing else is due right now.
    assert!(p.poll(late).is_none());
    let next = p.poll_timeout().unwrap();
    assert!(next > late && next - late < Duration::from_millis(50));
}

#[test]
fn pacer_without_pcr_uses_fallback_rate() {
    let mut g = Gen {
        cc: HashMap::new(),
        out: Vec::new(),
    };
    for _ in 0..70 {
        g.packet(AUDIO, false, None, &[0; 184]);
    }
    let t0 = start();
    let mut p = Pacer::new(t0, PacerConfig::default());
    for pkt in &g.out {
        p.push(pkt).unwrap();
    }
    p.finish();
    let mut n = 0;
    let mut last = t0;
    while let Some(t) = p.poll_timeout() {
        last = p.poll(t).unwrap().due;
        n += 1;
    }
    assert_eq!(n, 10);
    // 63 packets at 4 Mbit/s ≈ 23.7 ms.
    let ms = (last - t0).as_secs_f64() * 1000.0;
    assert!((20.0..28.0).contains(&ms), "{ms}");
}
