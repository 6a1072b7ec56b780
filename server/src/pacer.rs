//! PCR-paced playout, I/O-free: [`LoopRewriter`] makes a file played in a loop one continuous
//! stream, [`DatagramAssembler`] groups packets 7 per datagram with keyframes at datagram
//! starts, and [`Pacer`] says when each datagram is due.
//!
//! Timing: the first PCR (of the first PID carrying one) maps to the pacer's start `Instant`.
//! PCRs are used as *anchors* only when at least [`PacerConfig::anchor_min`] after the previous
//! anchor, and datagrams between two anchors are spread linearly by byte position. ffmpeg's
//! VBR muxer stamps every packet of a PES with the same PCR (so a 100 KB I-frame would leave
//! as one burst if PCRs were followed packet by packet); coarse anchors turn that into a
//! constant rate per ~300 ms segment, which the T-STD's 0.7 s mux delay easily absorbs.

use bytes::{BufMut, Bytes, BytesMut};
use common::ts::{
    KeyframeDetector, PsiTracker, TsError, TsPacket, DATAGRAM_PAYLOAD_LEN, NULL_PID,
    PACKETS_PER_DATAGRAM, PCR_HZ, TS_PACKET_LEN,
};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// PCR values wrap at 2^33 × 300 (27 MHz units).
pub const PCR_WRAP: u64 = (1 << 33) * 300;
/// PTS/DTS values wrap at 2^33 (90 kHz units).
pub const PTS_WRAP: u64 = 1 << 33;

// ---------------------------------------------------------------------------------------------
// Loop rewriting
// ---------------------------------------------------------------------------------------------

/// Per-PID timestamp statistics of the first pass (90 kHz units, modular).
#[derive(Debug, Clone, Copy, Default)]
struct TsStats {
    first: u64,
    last: u64,
    step: u64,
    span: u64,
}

/// Rewrites a looped file so that its output is one continuous stream: every pass after the
/// first has `k × period` added to every PCR, PTS and DTS, and continuity counters are
/// renumbered per PID so they never jump (on the first pass they are left as they are when
/// the input is itself continuous).
///
/// The period is learned from the first pass: the largest of (PCR span + mean PCR interval)
/// and, per PID, (timestamp span + last frame duration), so that the first PCR, PTS and DTS of
/// pass *k+1* each come strictly after the last ones of pass *k*.
#[derive(Debug, Default)]
pub struct LoopRewriter {
    pass: u64,
    offset: u64,
    period: Option<u64>,
    // First-pass statistics.
    pcr_first: Option<u64>,
    pcr_last: u64,
    pcr_count: u64,
    pes: HashMap<u16, TsStats>,
    // PCR unwrapping within a pass.
    pcr_prev_raw: Option<u64>,
    pcr_epoch: u64,
    cc: HashMap<u16, u8>,
}

impl LoopRewriter {
    /// A rewriter at the start of the first pass.
    pub fn new() -> Self {
        Self::default()
    }

    /// Passes completed so far.
    pub fn pass(&self) -> u64 {
        self.pass
    }

    /// The offset (27 MHz units) added to timestamps of the current pass.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The loop period (27 MHz units), known after the first pass.
    pub fn period(&self) -> Option<u64> {
        self.period
    }

    /// Rewrites one 188-byte packet in place. Returns the packet's PCR after rewriting,
    /// unwrapped (monotonic across passes and 33-bit wraps), if it carries one.
    pub fn rewrite(&mut self, pkt: &mut [u8]) -> Result<Option<u64>, TsError> {
        let view = TsPacket::parse(pkt)?;
        let pid = view.pid();
        let has_payload = view.has_payload();
        let pusi = view.payload_unit_start();
        let pcr = view.pcr();
        let payload_start = TS_PACKET_LEN - view.payload().len();
        // Continuity counter.
        if pid != NULL_PID {
            let in_cc = pkt[3] & 0x0f;
            let out = match (self.cc.get(&pid), has_payload) {
                (Some(&last), true) => (last + 1) & 0x0f,
                (Some(&last), false) => last,
                (None, _) => in_cc,
            };
            if has_payload || self.cc.contains_key(&pid) {
                self.cc.insert(pid, out);
            }
            pkt[3] = (pkt[3] & 0xf0) | out;
        }
        // PCR (adaptation field starts at byte 4: length, flags, PCR at 6..12).
        let mut out_pcr = None;
        if let Some(raw) = pcr {
            if let Some(prev) = self.pcr_prev_raw {
                if raw + PCR_WRAP / 2 < prev {
                    self.pcr_epoch += PCR_WRAP;
                }
            }
            self.pcr_prev_raw = Some(raw);
            let unwrapped = raw + self.pcr_epoch;
            if self.pass == 0 {
                self.pcr_first.get_or_insert(unwrapped);
                self.pcr_last = self.pcr_last.max(unwrapped);
                self.pcr_count += 1;
            }
            let v = unwrapped + self.offset;
            write_pcr(&mut pkt[6..12], v % PCR_WRAP);
            out_pcr = Some(v);
        }
        // PTS / DTS in the PES header.
        if pusi && has_payload {
            self.rewrite_pes(pid, &mut pkt[payload_start..]);
        }
        Ok(out_pcr)
    }

    fn rewrite_pes(&mut self, pid: u16, p: &mut [u8]) {
        if p.len() < 9 || p[..3] != [0, 0, 1] || p[6] & 0xC0 != 0x80 {
            return;
        }
        if matches!(p[3], 0xBC | 0xBE | 0xBF | 0xF0 | 0xF1 | 0xF2 | 0xF8 | 0xFF) {
            return;
        }
        let flags = p[7] >> 6;
        let add = self.offset / 300;
        let mut order_ts = None;
        let mut pts_v = None;
        if flags & 0b10 != 0 && p.len() >= 14 {
            let pts = read_ts(&p[9..14]);
            pts_v = Some(pts);
            order_ts = Some(pts);
            write_ts(&mut p[9..14], (pts + add) % PTS_WRAP);
        }
        if flags == 0b11 && p.len() >= 19 {
            let dts = read_ts(&p[14..19]);
            order_ts = Some(dts);
            write_ts(&mut p[14..19], (dts + add) % PTS_WRAP);
        }
        if self.pass == 0 {
            if let Some(t) = order_ts {
                let pts = pts_v.unwrap_or(t);
                match self.pes.get_mut(&pid) {
                    None => {
                        self.pes.insert(
                            pid,
                            TsStats {
                                first: t,
                                last: t,
                                step: 0,
                                span: pts.wrapping_sub(t) % PTS_WRAP,
                            },
                        );
                    }
                    Some(s) => {
                        let step = t.wrapping_sub(s.last) % PTS_WRAP;
                        if step > 0 && step < PTS_WRAP / 2 {
                            s.step = step;
                        }
                        s.last = t;
                        let span = pts.wrapping_sub(s.first) % PTS_WRAP;
                        if span < PTS_WRAP / 2 {
                            s.span = s.span.max(span);
                        }
                    }
                }
            }
        }
    }

    /// Marks the end of a pass: the next packet is the file's first again.
    pub fn next_loop(&mut self) {
        let period = *self.period.get_or_insert_with(|| {
            let mut d = 0;
            if let Some(first) = self.pcr_first {
                let span = self.pcr_last - first;
                let gap = span
                    .checked_div(self.pcr_count.saturating_sub(1))
                    .unwrap_or(0);
                d = span + gap;
            }
            for s in self.pes.values() {
                d = d.max((s.span + s.step) * 300);
            }
            if d == 0 {
                d = PCR_HZ;
            }
            d.div_ceil(300) * 300
        });
        self.pass += 1;
        self.offset += period;
        self.pcr_prev_raw = None;
        self.pcr_epoch = 0;
    }
}

fn write_pcr(b: &mut [u8], v: u64) {
    let base = v / 300;
    let ext = v % 300;
    b[0] = (base >> 25) as u8;
    b[1] = (base >> 17) as u8;
    b[2] = (base >> 9) as u8;
    b[3] = (base >> 1) as u8;
    b[4] = (((base & 1) as u8) << 7) | 0x7e | ((ext >> 8) as u8 & 1);
    b[5] = ext as u8;
}

/// Reads a 33-bit PES timestamp from its 5-byte field.
pub fn read_ts(b: &[u8]) -> u64 {
    (u64::from(b[0] >> 1 & 0x07) << 30)
        | (u64::from(b[1]) << 22)
        | (u64::from(b[2] >> 1) << 15)
        | (u64::from(b[3]) << 7)
        | u64::from(b[4] >> 1)
}

fn write_ts(b: &mut [u8], v: u64) {
    b[0] = (b[0] & 0xf0) | (((v >> 30) as u8 & 0x07) << 1) | 1;
    b[1] = (v >> 22) as u8;
    b[2] = (((v >> 15) as u8) << 1) | 1;
    b[3] = (v >> 7) as u8;
    b[4] = ((v as u8) << 1) | 1;
}

// ---------------------------------------------------------------------------------------------
// Datagram assembly
// ---------------------------------------------------------------------------------------------

/// One assembled datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    /// 7 TS packets (1316 bytes); null packets may pad the one before a keyframe.
    pub payload: Bytes,
    /// The datagram starts a keyframe (its first packets are the PAT/PMT written before the
    /// keyframe, or the keyframe's first video packet): a decoder can start here.
    pub keyframe: bool,
    /// Output position of its first packet, in packets (7 × datagrams emitted before it;
    /// padding included, so positions are evenly spaced in bytes on the wire).
    pub first_slot: u64,
}

/// A 188-byte null packet.
pub fn null_packet() -> [u8; TS_PACKET_LEN] {
    let mut p = [0xFFu8; TS_PACKET_LEN];
    p[..4].copy_from_slice(&[0x47, 0x1F, 0xFF, 0x10]);
    p
}

/// Groups TS packets into 1316-byte datagrams so that every keyframe starts a datagram.
///
/// A keyframe is the video PUSI packet recognised by [`KeyframeDetector`] (after the video PID
/// is learned from PAT/PMT by [`PsiTracker`]); the PSI packets (PAT, PMT, SDT) immediately
/// before it travel with it. The datagram before is padded with null packets (at most 6 per
/// keyframe, ~1 KB/s). A keyframe recognised late by the NAL fallback, after its datagram left,
/// flags the datagram being assembled instead.
#[derive(Debug, Default)]
pub struct DatagramAssembler {
    psi: PsiTracker,
    kf: Option<(KeyframeDetector, u64)>,
    /// (index, packet, is_psi)
    pending: Vec<(u64, Bytes, bool)>,
    pending_kf: bool,
    next_index: u64,
    out: VecDeque<Assembled>,
    padding: u64,
    emitted: u64,
}

impl DatagramAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next packet (must be 188 bytes starting with 0x47). Returns its output
    /// position in packets (counting the padding inserted so far, see
    /// [`Assembled::first_slot`]).
    pub fn push(&mut self, pkt: Bytes) -> Result<u64, TsError> {
        let index = self.next_index;
        let view = TsPacket::parse(&pkt)?;
        self.next_index += 1;
        if self.psi.push(&view) {
            if let Some(v) = self.psi.info().and_then(|i| i.video_pid) {
                if self.kf.as_ref().map(|k| k.0.pid()) != Some(v) {
                    self.kf = Some((KeyframeDetector::new(v), index));
                }
            }
        }
        let pid = view.pid();
        let is_psi = pid < 0x20 || Some(pid) == self.psi.pmt_pid();
        let kf = self
            .kf
            .as_mut()
            .and_then(|(d, base)| d.push(&view).map(|k| k.pusi_seq + *base));
        self.pending.push((index, pkt, is_psi));
        if let Some(kidx) = kf {
            match self.pending.iter().position(|p| p.0 == kidx) {
                Some(mut at) => {
                    while at > 0 && self.pending[at - 1].2 {
                        at -= 1;
                    }
                    if at > 0 {
                        let rest = self.pending.split_off(at);
                        self.emit(true);
                        self.pending = rest;
                    }
                    self.pending_kf = true;
                }
                None => self.pending_kf = true,
            }
        }
        let slot = index + self.padding;
        if self.pending.len() >= PACKETS_PER_DATAGRAM {
            self.emit(false);
        }
        Ok(slot)
    }

    /// Emits the pending packets, padded with null packets to a whole datagram if `pad`.
    fn emit(&mut self, pad: bool) {
        if self.pending.is_empty() {
            return;
        }
        let mut buf = BytesMut::with_capacity(DATAGRAM_PAYLOAD_LEN);
        let take = self.pending.len().min(PACKETS_PER_DATAGRAM);
        for (_, p, _) in self.pending.drain(..take) {
            buf.put_slice(&p);
        }
        if pad {
            while buf.len() < DATAGRAM_PAYLOAD_LEN {
                buf.put_slice(&null_packet());
                self.padding += 1;
            }
        }
        self.out.push_back(Assembled {
            payload: buf.freeze(),
            keyframe: std::mem::take(&mut self.pending_kf),
            first_slot: self.emitted * PACKETS_PER_DATAGRAM as u64,
        });
        self.emitted += 1;
    }

    /// Emits what is pending as a final datagram padded with null packets.
    pub fn flush(&mut self) {
        self.emit(true);
    }

    /// The next complete datagram.
    pub fn pop(&mut self) -> Option<Assembled> {
        self.out.pop_front()
    }

    /// Null packets added so far.
    pub fn padding_packets(&self) -> u64 {
        self.padding
    }
}

// ---------------------------------------------------------------------------------------------
// Pacer
// ---------------------------------------------------------------------------------------------

/// Tunables of a [`Pacer`].
#[derive(Debug, Clone, Copy)]
pub struct PacerConfig {
    /// Minimum PCR distance between two anchors (rate is constant between anchors).
    pub anchor_min: Duration,
    /// When the caller is this late on a datagram, the clock is re-based (the stream is
    /// delayed) instead of sending the backlog as a burst.
    pub max_lag: Duration,
    /// Assumed bitrate while no PCR interval is known (start, and streams without PCR).
    pub fallback_bps: u64,
    /// Datagrams held waiting for the next anchor before forcing a schedule at the last rate.
    pub max_unscheduled: usize,
}

impl Default for PacerConfig {
    fn default() -> Self {
        PacerConfig {
            anchor_min: Duration::from_millis(300),
            max_lag: Duration::from_millis(500),
            fallback_bps: 4_000_000,
            max_unscheduled: 4096,
        }
    }
}

/// A datagram and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacedDatagram {
    /// 1316 bytes of TS.
    pub payload: Bytes,
    /// It starts a keyframe (see [`Assembled::keyframe`]).
    pub keyframe: bool,
    /// When it was due.
    pub due: Instant,
}

/// Counters of a [`Pacer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacerStats {
    /// Datagrams released.
    pub datagrams: u64,
    /// Passes of the input completed ([`Pacer::end_of_loop`] calls).
    pub loops: u64,
    /// Clock re-bases because the caller fell behind by more than `max_lag`.
    pub rebases: u64,
    /// PCR discontinuities (backwards, or forward jumps over 10 s) bridged at the last rate.
    pub pcr_jumps: u64,
    /// Null packets inserted to align keyframes on datagram starts.
    pub padding_packets: u64,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    index: u64,
    pcr: u64,
    /// Media time, 27 MHz ticks since the first anchor (monotonic, jump-free).
    media: u64,
}

/// I/O-free PCR pacing of a looped TS file: push the file's packets, call
/// [`end_of_loop`](Self::end_of_loop) at each end of file, and release datagrams with
/// [`poll`](Self::poll) when [`poll_timeout`](Self::poll_timeout) is reached. Keep pushing
/// while [`needs_input`](Self::needs_input).
#[derive(Debug)]
pub struct Pacer {
    cfg: PacerConfig,
    start: Instant,
    shift: Duration,
    rewriter: LoopRewriter,
    asm: DatagramAssembler,
    pcr_pid: Option<u16>,
    anchor: Option<Anchor>,
    /// 27 MHz ticks per input packet over the last segment (×1024 fixed point).
    rate_q10: u64,
    unscheduled: VecDeque<Assembled>,
    ready: VecDeque<(Assembled, u64)>,
    last_media: u64,
    stats: PacerStats,
}

impl Pacer {
    /// A pacer whose first PCR will map to `start`.
    pub fn new(start: Instant, cfg: PacerConfig) -> Pacer {
        let rate_q10 = TS_PACKET_LEN as u64 * 8 * PCR_HZ * 1024 / cfg.fallback_bps.max(1);
        Pacer {
            cfg,
            start,
            shift: Duration::ZERO,
            rewriter: LoopRewriter::new(),
            asm: DatagramAssembler::new(),
            pcr_pid: None,
            anchor: None,
            rate_q10,
            unscheduled: VecDeque::new(),
            ready: VecDeque::new(),
            last_media: 0,
            stats: PacerStats::default(),
        }
    }

    /// Feeds the next packet of the file (188 bytes). It is rewritten for looping.
    pub fn push(&mut self, packet: &[u8]) -> Result<(), TsError> {
        let mut buf = BytesMut::from(packet);
        let pcr = self.rewriter.rewrite(&mut buf)?;
        let pid = TsPacket::parse(&buf)?.pid();
        let index = self.asm.push(buf.freeze())?;
        while let Some(d) = self.asm.pop() {
            self.unscheduled.push_back(d);
        }
        if let Some(pcr) = pcr {
            if *self.pcr_pid.get_or_insert(pid) == pid {
                self.on_pcr(index, pcr);
            }
        }
        if self.unscheduled.len() > self.cfg.max_unscheduled {
            let upto = self.unscheduled.len() / 2;
            self.force_schedule(upto);
        }
        Ok(())
    }

    fn on_pcr(&mut self, index: u64, pcr: u64) {
        let Some(a) = self.anchor else {
            self.anchor = Some(Anchor {
                index,
                pcr,
                media: 0,
            });
            self.schedule_until(index, |_| 0);
            return;
        };
        let jump = pcr < a.pcr || pcr - a.pcr > 10 * PCR_HZ;
        let min = self.cfg.anchor_min.as_nanos() as u64 * 27 / 1000;
        if !jump && pcr - a.pcr < min {
            return;
        }
        let packets = index.saturating_sub(a.index).max(1);
        let media = if jump {
            self.stats.pcr_jumps += 1;
            a.media + packets * self.rate_q10 / 1024
        } else {
            a.media + (pcr - a.pcr)
        };
        let span = media - a.media;
        if !jump {
            self.rate_q10 = span * 1024 / packets;
        }
        // A datagram straddling the previous anchor (first slot before it) is extrapolated
        // backwards at this segment's rate.
        self.schedule_until(index, |i| {
            let d = (i as i128 - a.index as i128) * span as i128 / packets as i128;
            (a.media as i128 + d).max(0) as u64
        });
        self.anchor = Some(Anchor { index, pcr, media });
    }

    /// Schedules unscheduled datagrams whose first slot is at most `index`, using `time_of`.
    fn schedule_until(&mut self, index: u64, time_of: impl Fn(u64) -> u64) {
        while let Some(d) = self.unscheduled.front() {
            if d.first_slot > index {
                break;
            }
            let d = self.unscheduled.pop_front().expect("front exists");
            let media = time_of(d.first_slot).max(self.last_media);
            self.last_media = media;
            self.ready.push_back((d, media));
        }
    }

    /// Schedules the first `n` unscheduled datagrams by extrapolating the last rate.
    fn force_schedule(&mut self, n: usize) {
        let a = self.anchor.unwrap_or(Anchor {
            index: 0,
            pcr: 0,
            media: 0,
        });
        if self.anchor.is_none() {
            self.anchor = Some(a);
        }
        let rate = self.rate_q10;
        for _ in 0..n {
            let Some(d) = self.unscheduled.pop_front() else {
                break;
            };
            let media =
                (a.media + d.first_slot.saturating_sub(a.index) * rate / 1024).max(self.last_media);
            self.last_media = media;
            self.ready.push_back((d, media));
        }
    }

    /// End of the file: the next packets are its beginning again (timestamps continue).
    pub fn end_of_loop(&mut self) {
        self.rewriter.next_loop();
        self.stats.loops += 1;
    }

    /// No more input: everything pending is scheduled at the last known rate.
    pub fn finish(&mut self) {
        self.asm.flush();
        while let Some(d) = self.asm.pop() {
            self.unscheduled.push_back(d);
        }
        let n = self.unscheduled.len();
        self.force_schedule(n);
    }

    /// Whether the caller should push more packets before sleeping (no datagram is scheduled).
    pub fn needs_input(&self) -> bool {
        self.ready.is_empty()
    }

    fn instant_of(&self, media: u64) -> Instant {
        self.start + self.shift + Duration::from_nanos((media as u128 * 1000 / 27) as u64)
    }

    /// When the next scheduled datagram is due, if one is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.ready.front().map(|(_, m)| self.instant_of(*m))
    }

    /// The next datagram if it is due at `now`. If the caller is more than
    /// [`PacerConfig::max_lag`] late, the clock is shifted so the rest is not a burst.
    pub fn poll(&mut self, now: Instant) -> Option<PacedDatagram> {
        let due = self.poll_timeout()?;
        if due > now {
            return None;
        }
        let lag = now - due;
        if lag > self.cfg.max_lag {
            self.shift += lag;
            self.stats.rebases += 1;
        }
        let (d, _) = self.ready.pop_front()?;
        self.stats.datagrams += 1;
        Some(PacedDatagram {
            payload: d.payload,
            keyframe: d.keyframe,
            due,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> PacerStats {
        PacerStats {
            padding_packets: self.asm.padding_packets(),
            ..self.stats
        }
    }

    /// The loop rewriter (period, pass).
    pub fn rewriter(&self) -> &LoopRewriter {
        &self.rewriter
    }
}

#[cfg(test)]
mod tests;
