//! MPEG-TS helpers: packet framing, header views, PSI (PAT/PMT), keyframe detection,
//! datagram chunking and continuity-counter loss accounting.
//!
//! Servers read MPEG-TS (H.264 + AAC) from an ffmpeg pipe, split it into 188-byte packets
//! ([`TsSplitter`]), group 7 of them per UDP datagram ([`DatagramChunker`]) and cut their GOP
//! cache at keyframes ([`KeyframeDetector`]). Relays and clients iterate received datagrams
//! ([`datagram_packets`]), learn the stream layout ([`PsiTracker`]), pace playout by PCR
//! ([`TsPacket::pcr`]) and count losses ([`ContinuityChecker`]).
//!
//! Everything here is I/O-free, never panics on any input, and parses by borrowing
//! ([`TsPacket`] is a view over the caller's bytes).

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use thiserror::Error;

/// Length of one MPEG-TS packet in bytes.
pub const TS_PACKET_LEN: usize = 188;
/// The byte every TS packet starts with.
pub const SYNC_BYTE: u8 = 0x47;
/// TS packets carried by one full overlay datagram.
pub const PACKETS_PER_DATAGRAM: usize = 7;
/// Length of a full datagram payload: 7 × 188 = 1316 bytes (fits a 1500-byte MTU).
pub const DATAGRAM_PAYLOAD_LEN: usize = PACKETS_PER_DATAGRAM * TS_PACKET_LEN;
/// PID of the Program Association Table.
pub const PAT_PID: u16 = 0x0000;
/// PID of null (stuffing) packets.
pub const NULL_PID: u16 = 0x1FFF;
/// PMT `stream_type` of H.264 / AVC video.
pub const STREAM_TYPE_H264: u8 = 0x1b;
/// PMT `stream_type` of AAC audio in ADTS framing.
pub const STREAM_TYPE_AAC_ADTS: u8 = 0x0f;
/// PCR / PTS clock rate of [`TsPacket::pcr`] values: 27 MHz.
pub const PCR_HZ: u64 = 27_000_000;

/// Errors from parsing TS packets, datagrams and PSI sections.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TsError {
    /// A TS packet was not exactly 188 bytes long.
    #[error("TS packet must be {TS_PACKET_LEN} bytes, got {0}")]
    PacketLength(usize),
    /// A TS packet did not start with the sync byte 0x47.
    #[error("TS packet starts with {0:#04x}, not the sync byte 0x47")]
    SyncByte(u8),
    /// A datagram's length was zero or not a multiple of 188.
    #[error("datagram length {0} is not a non-zero multiple of {TS_PACKET_LEN}")]
    DatagramLength(usize),
    /// The PSI section (or its pointer field) ran past the end of the payload.
    #[error("PSI section truncated")]
    SectionTruncated,
    /// The section's `table_id` was not the one asked for.
    #[error("PSI table_id {found:#04x}, expected {expected:#04x}")]
    TableId {
        /// The table_id the parser wanted.
        expected: u8,
        /// The table_id found.
        found: u8,
    },
    /// The section is not in long (syntax) form or its length is out of range.
    #[error("malformed PSI section header")]
    SectionHeader,
    /// The section's CRC-32/MPEG-2 did not match.
    #[error("PSI CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// CRC stored in the section.
        stored: u32,
        /// CRC computed over the section.
        computed: u32,
    },
    /// The section has `current_next_indicator = 0` (a future table, not yet valid).
    #[error("PSI section is not current (current_next_indicator = 0)")]
    NotCurrent,
    /// The section body is internally inconsistent.
    #[error("malformed PSI section body: {0}")]
    Malformed(&'static str),
}

// ---------------------------------------------------------------------------------------------
// Splitter
// ---------------------------------------------------------------------------------------------

/// Unpopped bytes above which [`TsSplitter::push`] discards the oldest data (see there).
pub const SPLITTER_MAX_BUFFERED: usize = 64 * 1024;

/// Counters kept by a [`TsSplitter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitterStats {
    /// Packets returned by [`TsSplitter::pop`].
    pub packets: u64,
    /// Bytes discarded while searching for sync (garbage, truncated packets, a partial
    /// trailing packet at [`TsSplitter::finish`]).
    pub skipped_bytes: u64,
    /// Times sync was lost after having been acquired.
    pub resyncs: u64,
    /// Bytes discarded because the caller let more than [`SPLITTER_MAX_BUFFERED`] bytes pile
    /// up without popping.
    pub overflow_bytes: u64,
}

/// Splits an arbitrarily chunked MPEG-TS byte stream (e.g. reads from an ffmpeg pipe) into
/// whole 188-byte packets, resynchronising after garbage or truncated packets.
///
/// Use: [`push`](Self::push) every chunk read, then [`pop`](Self::pop) until `None`; at end of
/// input call [`finish`](Self::finish) and pop the rest.
///
/// Sync is acquired at an offset holding 0x47 with 0x47 also at +188 and +376. While in sync a
/// packet is returned once the byte after it is buffered and is 0x47 too; if only exactly the
/// packet is buffered, the default (low-latency) splitter returns it at once (optimistically;
/// if the next boundary then turns out not to be 0x47 it rescans from inside that packet, so at
/// worst one damaged packet is emitted), while [`TsSplitter::strict`] waits for that byte.
/// When the byte after a packet is not 0x47, the splitter looks for the next confirmed sync:
/// if it starts less than 188 bytes in, the current packet was truncated and is dropped;
/// otherwise the current packet is complete and garbage follows it. The internal buffer stays
/// below ~600 bytes plus the last pushed chunk when the caller pops after every push.
#[derive(Debug, Default)]
pub struct TsSplitter {
    buf: BytesMut,
    locked: bool,
    strict: bool,
    eof: bool,
    /// Last packet returned without having seen the byte after it.
    prev: Option<Bytes>,
    /// Leading bytes of `buf` that were already returned (re-scanned after a lost sync).
    rescan: usize,
    stats: SplitterStats,
}

/// Result of checking whether an offset is a confirmed packet start.
enum Confirm {
    Yes,
    No,
    NeedMore,
}

impl TsSplitter {
    /// A low-latency splitter: a packet is returned as soon as its 188 bytes are buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// A splitter that returns a packet only after seeing that the next packet starts with
    /// 0x47 (or at [`finish`](Self::finish)); never emits a truncated packet whose damage is
    /// detectable, at the cost of holding the last packet of each read until more data comes.
    pub fn strict() -> Self {
        TsSplitter {
            strict: true,
            ..Self::default()
        }
    }

    /// Appends a chunk of the byte stream. Clears a previous [`finish`](Self::finish).
    ///
    /// If more than [`SPLITTER_MAX_BUFFERED`] bytes are already buffered (the caller is not
    /// popping), the oldest bytes are discarded first and counted in
    /// [`SplitterStats::overflow_bytes`].
    pub fn push(&mut self, data: &[u8]) {
        self.eof = false;
        if self.buf.len() > SPLITTER_MAX_BUFFERED {
            let mut n = self.buf.len() - SPLITTER_MAX_BUFFERED / 2;
            if self.locked {
                n = n.div_ceil(TS_PACKET_LEN) * TS_PACKET_LEN;
            }
            let n = n.min(self.buf.len());
            let _ = self.buf.split_to(n);
            self.rescan = self.rescan.saturating_sub(n);
            self.prev = None;
            self.stats.overflow_bytes += n as u64;
            tracing::debug!(discarded = n, "TsSplitter overflow: caller is not popping");
        }
        self.buf.extend_from_slice(data);
    }

    /// Signals end of input: from now on [`pop`](Self::pop) returns the remaining packets
    /// without waiting for look-ahead bytes, and discards a trailing partial packet.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// The next whole packet (exactly 188 bytes, starting with 0x47), or `None` if more data
    /// is needed. Zero-copy: the returned `Bytes` shares the splitter's buffer.
    pub fn pop(&mut self) -> Option<Bytes> {
        loop {
            let len = self.buf.len();
            if len == 0 {
                return None;
            }
            if !self.locked {
                if !self.acquire() {
                    return None;
                }
                continue;
            }
            if self.buf[0] != SYNC_BYTE {
                self.lose_sync();
                continue;
            }
            if len < TS_PACKET_LEN {
                if self.eof {
                    self.discard(len);
                }
                return None;
            }
            if len == TS_PACKET_LEN {
                if self.strict && !self.eof {
                    return None;
                }
                let pkt = self.take();
                if !self.eof {
                    self.prev = Some(pkt.clone());
                }
                return Some(pkt);
            }
            if self.buf[TS_PACKET_LEN] == SYNC_BYTE {
                self.prev = None;
                return Some(self.take());
            }
            // The byte after the front packet is not a sync byte.
            if self.prev.is_some() {
                // The packet returned before may have been the truncated one: rescan it too.
                self.lose_sync();
                continue;
            }
            let mut next = None;
            for o in 1..TS_PACKET_LEN {
                if self.buf[o] != SYNC_BYTE {
                    continue;
                }
                match self.confirm(o) {
                    Confirm::Yes => {
                        next = Some(o);
                        break;
                    }
                    Confirm::No => {}
                    Confirm::NeedMore => return None,
                }
            }
            self.stats.resyncs += 1;
            match next {
                Some(o) => {
                    // The front packet is truncated: drop it, stay locked at `o`.
                    tracing::debug!(skipped = o, "TS resync: truncated packet");
                    self.discard(o);
                }
                None => {
                    // The front packet is whole; what follows it is garbage.
                    tracing::debug!("TS resync: garbage after packet");
                    self.locked = false;
                    return Some(self.take());
                }
            }
        }
    }

    /// Iterator over the packets available now (calls [`pop`](Self::pop) until `None`).
    pub fn drain(&mut self) -> impl Iterator<Item = Bytes> + '_ {
        std::iter::from_fn(move || self.pop())
    }

    /// Counters so far.
    pub fn stats(&self) -> SplitterStats {
        self.stats
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the splitter currently has packet sync.
    pub fn is_synced(&self) -> bool {
        self.locked
    }

    fn take(&mut self) -> Bytes {
        self.rescan = self.rescan.saturating_sub(TS_PACKET_LEN);
        self.stats.packets += 1;
        self.buf.split_to(TS_PACKET_LEN).freeze()
    }

    fn discard(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        let _ = self.buf.split_to(n);
        self.stats.skipped_bytes += n.saturating_sub(self.rescan) as u64;
        self.rescan = self.rescan.saturating_sub(n);
    }

    fn lose_sync(&mut self) {
        self.stats.resyncs += 1;
        self.locked = false;
        if let Some(prev) = self.prev.take() {
            let tail = prev.get(1..).unwrap_or_default();
            let mut nb = BytesMut::with_capacity(tail.len() + self.buf.len());
            nb.extend_from_slice(tail);
            nb.extend_from_slice(&self.buf);
            self.buf = nb;
            self.rescan += tail.len();
        }
        tracing::debug!("TS sync lost");
    }

    /// Whether offset `o` starts a packet confirmed by sync bytes at +188 and +376.
    fn confirm(&self, o: usize) -> Confirm {
        let b = &self.buf;
        if b.get(o) != Some(&SYNC_BYTE) {
            return Confirm::No;
        }
        for k in 1..=2 {
            match b.get(o + k * TS_PACKET_LEN) {
                Some(&SYNC_BYTE) => {}
                Some(_) => return Confirm::No,
                None if self.eof => {
                    return if o + TS_PACKET_LEN <= b.len() {
                        Confirm::Yes
                    } else {
                        Confirm::No
                    }
                }
                None => return Confirm::NeedMore,
            }
        }
        Confirm::Yes
    }

    /// Searches for sync; returns true when locked at offset 0, false when more data is needed.
    fn acquire(&mut self) -> bool {
        let mut o = 0;
        while o < self.buf.len() {
            if self.buf[o] == SYNC_BYTE {
                match self.confirm(o) {
                    Confirm::Yes => {
                        self.discard(o);
                        self.locked = true;
                        self.prev = None;
                        return true;
                    }
                    Confirm::No => {}
                    Confirm::NeedMore => {
                        self.discard(o);
                        return false;
                    }
                }
            }
            o += 1;
        }
        let n = self.buf.len();
        self.discard(n);
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Packet view
// ---------------------------------------------------------------------------------------------

/// A borrowed, validated view of one 188-byte TS packet (length and sync byte checked; every
/// other field is read lazily and never panics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsPacket<'a> {
    data: &'a [u8],
}

impl<'a> TsPacket<'a> {
    /// Validates `data` as one TS packet: exactly 188 bytes starting with 0x47.
    pub fn parse(data: &'a [u8]) -> Result<TsPacket<'a>, TsError> {
        if data.len() != TS_PACKET_LEN {
            return Err(TsError::PacketLength(data.len()));
        }
        if data[0] != SYNC_BYTE {
            return Err(TsError::SyncByte(data[0]));
        }
        Ok(TsPacket { data })
    }

    /// The whole 188 packet bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.data
    }

    /// The 13-bit packet identifier.
    pub fn pid(&self) -> u16 {
        (u16::from(self.data[1] & 0x1f) << 8) | u16::from(self.data[2])
    }

    /// `transport_error_indicator`: set by a demodulator on uncorrectable errors.
    pub fn transport_error(&self) -> bool {
        self.data[1] & 0x80 != 0
    }

    /// `payload_unit_start_indicator`: a PES packet or PSI section starts in this payload.
    pub fn payload_unit_start(&self) -> bool {
        self.data[1] & 0x40 != 0
    }

    /// The 2-bit `transport_scrambling_control` (0 = not scrambled).
    pub fn scrambling_control(&self) -> u8 {
        self.data[3] >> 6
    }

    /// The 4-bit continuity counter.
    pub fn continuity_counter(&self) -> u8 {
        self.data[3] & 0x0f
    }

    /// Whether the packet carries a payload (`adaptation_field_control` bit 0).
    pub fn has_payload(&self) -> bool {
        self.data[3] & 0x10 != 0
    }

    /// Whether the packet has an adaptation field (`adaptation_field_control` bit 1).
    pub fn has_adaptation_field(&self) -> bool {
        self.data[3] & 0x20 != 0
    }

    /// The adaptation field, if present and its length byte fits in the packet (≤ 183).
    pub fn adaptation_field(&self) -> Option<AdaptationField<'a>> {
        if !self.has_adaptation_field() {
            return None;
        }
        let len = usize::from(self.data[4]);
        self.data
            .get(5..5 + len)
            .map(|data| AdaptationField { data })
    }

    /// The adaptation field's `random_access_indicator` (false without one). ffmpeg sets it on
    /// the first packet of every keyframe PES (and of every audio PES).
    pub fn random_access_indicator(&self) -> bool {
        self.adaptation_field()
            .is_some_and(|af| af.random_access_indicator())
    }

    /// The adaptation field's `discontinuity_indicator` (false without one).
    pub fn discontinuity_indicator(&self) -> bool {
        self.adaptation_field()
            .is_some_and(|af| af.discontinuity_indicator())
    }

    /// The PCR in 27 MHz units (`base * 300 + extension`), if the packet carries one.
    pub fn pcr(&self) -> Option<u64> {
        self.adaptation_field().and_then(|af| af.pcr())
    }

    /// The payload after the header and adaptation field. Empty if the packet has no payload
    /// or its adaptation field length is malformed.
    pub fn payload(&self) -> &'a [u8] {
        if !self.has_payload() {
            return &[];
        }
        let start = if self.has_adaptation_field() {
            5 + usize::from(self.data[4])
        } else {
            4
        };
        self.data.get(start..).unwrap_or(&[])
    }
}

/// A borrowed view of a TS adaptation field (the bytes after its length byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptationField<'a> {
    data: &'a [u8],
}

impl<'a> AdaptationField<'a> {
    /// The field's bytes after the length byte (flags first); empty for a 0-length field.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.data
    }

    /// The flags byte (0 for a 0-length field, i.e. a single stuffing byte).
    pub fn flags(&self) -> u8 {
        self.data.first().copied().unwrap_or(0)
    }

    /// `discontinuity_indicator`: continuity counter and/or time base restart here.
    pub fn discontinuity_indicator(&self) -> bool {
        self.flags() & 0x80 != 0
    }

    /// `random_access_indicator`: a decoder can start at the PES beginning in this packet.
    pub fn random_access_indicator(&self) -> bool {
        self.flags() & 0x40 != 0
    }

    /// `elementary_stream_priority_indicator`.
    pub fn es_priority(&self) -> bool {
        self.flags() & 0x20 != 0
    }

    /// The PCR in 27 MHz units, if `PCR_flag` is set and the field is long enough.
    pub fn pcr(&self) -> Option<u64> {
        if self.flags() & 0x10 == 0 {
            return None;
        }
        let b = self.data.get(1..7)?;
        let base = (u64::from(b[0]) << 25)
            | (u64::from(b[1]) << 17)
            | (u64::from(b[2]) << 9)
            | (u64::from(b[3]) << 1)
            | (u64::from(b[4]) >> 7);
        let ext = (u64::from(b[4] & 0x01) << 8) | u64::from(b[5]);
        Some(base * 300 + ext)
    }
}

// ---------------------------------------------------------------------------------------------
// Datagrams
// ---------------------------------------------------------------------------------------------

/// Groups TS packets into overlay datagram payloads of exactly 7 packets (1316 bytes).
#[derive(Debug)]
pub struct DatagramChunker {
    buf: BytesMut,
}

impl Default for DatagramChunker {
    fn default() -> Self {
        Self::new()
    }
}

impl DatagramChunker {
    /// An empty chunker.
    pub fn new() -> Self {
        DatagramChunker {
            buf: BytesMut::with_capacity(DATAGRAM_PAYLOAD_LEN),
        }
    }

    /// Adds one packet; returns a full 1316-byte datagram when this was its 7th packet.
    pub fn push(&mut self, packet: &TsPacket<'_>) -> Option<Bytes> {
        self.buf.extend_from_slice(packet.as_bytes());
        if self.buf.len() >= DATAGRAM_PAYLOAD_LEN {
            let full =
                std::mem::replace(&mut self.buf, BytesMut::with_capacity(DATAGRAM_PAYLOAD_LEN));
            Some(full.freeze())
        } else {
            None
        }
    }

    /// The pending packets (1–6 of them, a multiple of 188 bytes) as a final short datagram,
    /// or `None` if nothing is pending.
    pub fn flush(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        Some(
            std::mem::replace(&mut self.buf, BytesMut::with_capacity(DATAGRAM_PAYLOAD_LEN))
                .freeze(),
        )
    }

    /// Packets waiting for the next datagram.
    pub fn pending_packets(&self) -> usize {
        self.buf.len() / TS_PACKET_LEN
    }
}

/// Iterates the TS packets of a received datagram payload. A length that is zero or not a
/// multiple of 188 yields a single [`TsError::DatagramLength`]; each packet is validated by
/// [`TsPacket::parse`].
pub fn datagram_packets(datagram: &[u8]) -> DatagramPackets<'_> {
    let chunks = datagram.chunks_exact(TS_PACKET_LEN);
    let bad = datagram.is_empty() || !chunks.remainder().is_empty();
    DatagramPackets {
        chunks,
        bad_len: bad.then_some(datagram.len()),
    }
}

/// Iterator returned by [`datagram_packets`].
#[derive(Debug, Clone)]
pub struct DatagramPackets<'a> {
    chunks: std::slice::ChunksExact<'a, u8>,
    bad_len: Option<usize>,
}

impl<'a> Iterator for DatagramPackets<'a> {
    type Item = Result<TsPacket<'a>, TsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(len) = self.bad_len.take() {
            self.chunks = [].chunks_exact(TS_PACKET_LEN);
            return Some(Err(TsError::DatagramLength(len)));
        }
        self.chunks.next().map(TsPacket::parse)
    }
}

// ---------------------------------------------------------------------------------------------
// PSI
// ---------------------------------------------------------------------------------------------

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = (i as u32) << 24;
        let mut j = 0;
        while j < 8 {
            c = if c & 0x8000_0000 != 0 {
                (c << 1) ^ 0x04C1_1DB7
            } else {
                c << 1
            };
            j += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32/MPEG-2 (poly 0x04C11DB7, init 0xFFFFFFFF, not reflected, no final xor), the CRC
/// of PSI sections.
pub fn crc32_mpeg2(data: &[u8]) -> u32 {
    data.iter().fold(0xFFFF_FFFF, |crc, &b| {
        (crc << 8) ^ CRC_TABLE[usize::from((crc >> 24) as u8 ^ b)]
    })
}

/// A long-form PSI section, CRC-checked, borrowed from a packet payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsiSection<'a> {
    /// `table_id` (0x00 PAT, 0x02 PMT).
    pub table_id: u8,
    /// `table_id_extension` (transport_stream_id for the PAT, program_number for a PMT).
    pub table_id_extension: u16,
    /// `version_number` (5 bits).
    pub version: u8,
    /// `section_number`.
    pub section_number: u8,
    /// `last_section_number`.
    pub last_section_number: u8,
    /// The bytes after the 8-byte header, up to (excluding) the CRC.
    pub body: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses the long-form PSI section starting in a PUSI packet's payload: skips the
/// `pointer_field`, checks `table_id`, section syntax, length, CRC and
/// `current_next_indicator`. Sections spanning several TS packets are not reassembled
/// (they fail with [`TsError::SectionTruncated`]); ffmpeg's PAT and PMT fit in one packet.
pub fn psi_section(payload: &[u8], table_id: u8) -> Result<PsiSection<'_>, TsError> {
    let pointer = usize::from(*payload.first().ok_or(TsError::SectionTruncated)?);
    let sec = payload
        .get(1 + pointer..)
        .ok_or(TsError::SectionTruncated)?;
    let found = *sec.first().ok_or(TsError::SectionTruncated)?;
    if found != table_id {
        return Err(TsError::TableId {
            expected: table_id,
            found,
        });
    }
    let hdr = be16(sec, 1).ok_or(TsError::SectionTruncated)?;
    let section_length = usize::from(hdr & 0x0fff);
    if hdr & 0x8000 == 0 || !(9..=1021).contains(&section_length) {
        return Err(TsError::SectionHeader);
    }
    let sec = sec
        .get(..3 + section_length)
        .ok_or(TsError::SectionTruncated)?;
    let (data, crc) = sec.split_at(sec.len() - 4);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32_mpeg2(data);
    if stored != computed {
        return Err(TsError::Crc { stored, computed });
    }
    // section_length >= 9 guarantees the 8 header bytes are in `data`.
    if data[5] & 0x01 == 0 {
        return Err(TsError::NotCurrent);
    }
    Ok(PsiSection {
        table_id: found,
        table_id_extension: u16::from_be_bytes([data[3], data[4]]),
        version: (data[5] >> 1) & 0x1f,
        section_number: data[6],
        last_section_number: data[7],
        body: &data[8..],
    })
}

/// Parses a PAT from a PUSI packet payload on PID 0 (pointer field included). Returns
/// `(program_number, pmt_pid)` pairs; program 0 (the network PID) is left out.
pub fn parse_pat(payload: &[u8]) -> Result<Vec<(u16, u16)>, TsError> {
    let sec = psi_section(payload, 0x00)?;
    let entries = sec.body.chunks_exact(4);
    if !entries.remainder().is_empty() {
        return Err(TsError::Malformed("PAT entries not a multiple of 4 bytes"));
    }
    Ok(entries
        .map(|e| {
            (
                u16::from_be_bytes([e[0], e[1]]),
                u16::from_be_bytes([e[2], e[3]]) & 0x1fff,
            )
        })
        .filter(|&(program, _)| program != 0)
        .collect())
}

/// A parsed Program Map Table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pmt {
    /// The program this PMT describes.
    pub program_number: u16,
    /// PID whose adaptation fields carry the program's PCR.
    pub pcr_pid: u16,
    /// Elementary streams as `(stream_type, pid)`, in PMT order
    /// (see [`STREAM_TYPE_H264`], [`STREAM_TYPE_AAC_ADTS`]).
    pub streams: Vec<(u8, u16)>,
}

/// Parses a PMT from a PUSI packet payload on the PMT PID (pointer field included).
pub fn parse_pmt(payload: &[u8]) -> Result<Pmt, TsError> {
    let sec = psi_section(payload, 0x02)?;
    let b = sec.body;
    let pcr_pid = be16(b, 0).ok_or(TsError::Malformed("PMT too short"))? & 0x1fff;
    let info_len = usize::from(be16(b, 2).ok_or(TsError::Malformed("PMT too short"))? & 0x0fff);
    let mut pos = 4 + info_len;
    if pos > b.len() {
        return Err(TsError::Malformed("program_info_length past section end"));
    }
    let mut streams = Vec::new();
    while pos + 5 <= b.len() {
        let stream_type = b[pos];
        let pid = u16::from_be_bytes([b[pos + 1], b[pos + 2]]) & 0x1fff;
        let es_info_len = usize::from(u16::from_be_bytes([b[pos + 3], b[pos + 4]]) & 0x0fff);
        pos += 5 + es_info_len;
        if pos > b.len() {
            return Err(TsError::Malformed("ES_info_length past section end"));
        }
        streams.push((stream_type, pid));
    }
    Ok(Pmt {
        program_number: sec.table_id_extension,
        pcr_pid,
        streams,
    })
}

/// The stream layout learned by a [`PsiTracker`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamInfo {
    /// Program number (of the first program in the PAT).
    pub program_number: u16,
    /// PID of the program's PMT.
    pub pmt_pid: u16,
    /// PID carrying the PCR.
    pub pcr_pid: u16,
    /// First H.264 stream ([`STREAM_TYPE_H264`]), if any.
    pub video_pid: Option<u16>,
    /// First AAC/ADTS stream ([`STREAM_TYPE_AAC_ADTS`]), if any.
    pub audio_pid: Option<u16>,
    /// All elementary streams as `(stream_type, pid)`.
    pub streams: Vec<(u8, u16)>,
}

/// Learns the PMT PID from the PAT and the stream PIDs from the PMT of the first program.
/// Only single-packet sections are understood (which is what ffmpeg writes).
#[derive(Debug, Default)]
pub struct PsiTracker {
    program: Option<(u16, u16)>,
    info: Option<StreamInfo>,
    errors: u64,
}

impl PsiTracker {
    /// A tracker that knows nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one packet (any PID). Returns true when [`info`](Self::info) changed.
    pub fn push(&mut self, pkt: &TsPacket<'_>) -> bool {
        if !pkt.payload_unit_start() || pkt.transport_error() {
            return false;
        }
        let pid = pkt.pid();
        if pid == PAT_PID {
            match parse_pat(pkt.payload()) {
                Ok(programs) => {
                    let first = programs.first().copied();
                    if first.is_some() && first != self.program {
                        self.program = first;
                        return self.info.take().is_some();
                    }
                }
                Err(_) => self.errors += 1,
            }
            return false;
        }
        let Some((program_number, pmt_pid)) = self.program else {
            return false;
        };
        if pid != pmt_pid {
            return false;
        }
        match parse_pmt(pkt.payload()) {
            Ok(pmt) => {
                let find = |t: u8| pmt.streams.iter().find(|s| s.0 == t).map(|s| s.1);
                let info = StreamInfo {
                    program_number,
                    pmt_pid,
                    pcr_pid: pmt.pcr_pid,
                    video_pid: find(STREAM_TYPE_H264),
                    audio_pid: find(STREAM_TYPE_AAC_ADTS),
                    streams: pmt.streams.clone(),
                };
                if self.info.as_ref() != Some(&info) {
                    self.info = Some(info);
                    return true;
                }
            }
            Err(_) => self.errors += 1,
        }
        false
    }

    /// The stream layout, once a PAT and then the matching PMT have been seen.
    pub fn info(&self) -> Option<&StreamInfo> {
        self.info.as_ref()
    }

    /// The PMT PID, once a PAT has been seen.
    pub fn pmt_pid(&self) -> Option<u16> {
        self.program.map(|p| p.1)
    }

    /// PAT/PMT sections that failed to parse (CRC errors, truncation, ...).
    pub fn errors(&self) -> u64 {
        self.errors
    }
}

// ---------------------------------------------------------------------------------------------
// Keyframes
// ---------------------------------------------------------------------------------------------

/// H.264 NAL unit type of an IDR slice.
pub const NAL_IDR: u8 = 5;

/// Finds Annex-B start codes across calls and reports the first VCL NAL type (1..=5).
#[derive(Debug, Clone, Copy, Default)]
struct NalScanner {
    zeros: u8,
    at_header: bool,
}

impl NalScanner {
    fn feed(&mut self, data: &[u8]) -> Option<u8> {
        for &b in data {
            if self.at_header {
                self.at_header = false;
                self.zeros = u8::from(b == 0);
                let nal_type = b & 0x1f;
                if b & 0x80 == 0 && (1..=5).contains(&nal_type) {
                    return Some(nal_type);
                }
                continue;
            }
            match b {
                0 => self.zeros = self.zeros.saturating_add(1),
                1 if self.zeros >= 2 => {
                    self.zeros = 0;
                    self.at_header = true;
                }
                _ => self.zeros = 0,
            }
        }
        None
    }
}

/// Whether an H.264 access unit is an IDR: scans `bytes` (a whole video PES packet, its
/// header is skipped, or raw Annex-B data) for start codes up to the first VCL NAL and
/// returns true iff that NAL is an IDR slice (type 5).
pub fn pes_has_idr(bytes: &[u8]) -> bool {
    let is_video_pes =
        bytes.starts_with(&[0, 0, 1]) && bytes.get(3).is_some_and(|s| (0xE0..=0xEF).contains(s));
    let skip = match bytes.get(..9) {
        Some(h) if is_video_pes && h[6] & 0xC0 == 0x80 => 9 + usize::from(h[8]),
        _ => 0,
    };
    let es = bytes.get(skip..).unwrap_or(&[]);
    NalScanner::default().feed(es) == Some(NAL_IDR)
}

/// How a [`Keyframe`] was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyframeSource {
    /// The PUSI packet's adaptation field had `random_access_indicator` set.
    RandomAccessIndicator,
    /// The access unit's first VCL NAL is an IDR slice.
    IdrNal,
}

/// "The access unit that began at packet `pusi_seq` is a keyframe."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyframe {
    /// Sequence number (0-based count of packets pushed into the [`KeyframeDetector`], all
    /// PIDs) of the video PUSI packet that starts the keyframe's PES: cut the GOP cache here.
    pub pusi_seq: u64,
    /// How it was recognised.
    pub source: KeyframeSource,
}

#[derive(Debug, Clone)]
struct AuScan {
    pusi_seq: u64,
    hdr: [u8; 9],
    hdr_len: usize,
    skip: Option<usize>,
    nal: NalScanner,
}

impl AuScan {
    /// Feeds payload; `Some(Some(t))` = first VCL type found, `Some(None)` = give up.
    fn feed(&mut self, mut data: &[u8]) -> Option<Option<u8>> {
        if self.skip.is_none() {
            let n = (9 - self.hdr_len).min(data.len());
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&data[..n]);
            self.hdr_len += n;
            data = &data[n..];
            if self.hdr_len < 9 {
                return None;
            }
            if self.hdr[..3] != [0, 0, 1] || self.hdr[6] & 0xC0 != 0x80 {
                return Some(None);
            }
            self.skip = Some(usize::from(self.hdr[8]));
        }
        let skip = self.skip.get_or_insert(0);
        let n = (*skip).min(data.len());
        *skip -= n;
        self.nal.feed(&data[n..]).map(Some)
    }
}

/// Per-video-PID keyframe detector for cutting a GOP cache exactly at a keyframe's first packet.
///
/// Push *every* packet of the multiplex, in order (other PIDs only advance the sequence
/// number). Each PUSI on the video PID starts a new access unit. If its adaptation field has
/// `random_access_indicator` set (ffmpeg's muxer does this for keyframes), the keyframe is
/// reported immediately, from the PUSI packet's own push. Otherwise (or with
/// [`nal_only`](Self::nal_only)) the PES payload is scanned across packets — start codes may
/// straddle packets, and x264's SPS/PPS/SEI often push the IDR slice several packets on — up to
/// the first VCL NAL; if it is an IDR the keyframe is reported from the push that found it,
/// with [`Keyframe::pusi_seq`] pointing back to the PUSI packet.
#[derive(Debug, Clone)]
pub struct KeyframeDetector {
    pid: u16,
    use_rai: bool,
    next_seq: u64,
    au: Option<AuScan>,
}

impl KeyframeDetector {
    /// A detector for H.264 on `video_pid` using the RAI fast path with NAL-scan fallback.
    pub fn new(video_pid: u16) -> Self {
        KeyframeDetector {
            pid: video_pid,
            use_rai: true,
            next_seq: 0,
            au: None,
        }
    }

    /// A detector that ignores `random_access_indicator` and only scans NAL units.
    pub fn nal_only(video_pid: u16) -> Self {
        KeyframeDetector {
            use_rai: false,
            ..Self::new(video_pid)
        }
    }

    /// The video PID this detector watches.
    pub fn pid(&self) -> u16 {
        self.pid
    }

    /// Packets pushed so far; the next packet pushed gets this sequence number.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Feeds the next packet of the multiplex; returns a keyframe event if one was recognised.
    pub fn push(&mut self, pkt: &TsPacket<'_>) -> Option<Keyframe> {
        let seq = self.next_seq;
        self.next_seq += 1;
        if pkt.pid() != self.pid || !pkt.has_payload() {
            return None;
        }
        if pkt.payload_unit_start() {
            self.au = None;
            if self.use_rai && pkt.random_access_indicator() {
                return Some(Keyframe {
                    pusi_seq: seq,
                    source: KeyframeSource::RandomAccessIndicator,
                });
            }
            self.au = Some(AuScan {
                pusi_seq: seq,
                hdr: [0; 9],
                hdr_len: 0,
                skip: None,
                nal: NalScanner::default(),
            });
        }
        let au = self.au.as_mut()?;
        let pusi_seq = au.pusi_seq;
        let found = au.feed(pkt.payload())?;
        self.au = None;
        (found == Some(NAL_IDR)).then_some(Keyframe {
            pusi_seq,
            source: KeyframeSource::IdrNal,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Continuity
// ---------------------------------------------------------------------------------------------

/// What a [`ContinuityChecker`] made of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// Counter advanced by one, as expected.
    Ok,
    /// First packet seen on this PID, or `discontinuity_indicator` set: counter (re)started.
    Start,
    /// Same counter as the previous payload packet: a duplicate (drop it).
    Duplicate,
    /// `lost` packets (1..=15) are missing before this one.
    Gap {
        /// Packets missing (modulo 16).
        lost: u8,
    },
    /// Not checked: no payload, null PID or transport error.
    Ignored,
}

/// Per-PID continuity-counter tracking that counts lost TS packets.
///
/// Packets without payload (whose counter does not advance), null packets and packets with
/// `transport_error_indicator` are ignored; `discontinuity_indicator` restarts a PID's
/// counter. A repeated counter is a duplicate (the spec allows one; further repeats are also
/// reported as duplicates rather than as 16-packet gaps). Gaps are only known modulo 16.
#[derive(Debug, Clone, Default)]
pub struct ContinuityChecker {
    last: HashMap<u16, u8>,
    lost: u64,
    duplicates: u64,
}

impl ContinuityChecker {
    /// A checker that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks one packet.
    pub fn push(&mut self, pkt: &TsPacket<'_>) -> Continuity {
        let pid = pkt.pid();
        if !pkt.has_payload() || pid == NULL_PID || pkt.transport_error() {
            return Continuity::Ignored;
        }
        let cc = pkt.continuity_counter();
        let prev = self.last.insert(pid, cc);
        match prev {
            _ if pkt.discontinuity_indicator() => Continuity::Start,
            None => Continuity::Start,
            Some(p) if p == cc => {
                self.duplicates += 1;
                Continuity::Duplicate
            }
            Some(p) => {
                let lost = cc.wrapping_sub(p).wrapping_sub(1) & 0x0f;
                if lost == 0 {
                    Continuity::Ok
                } else {
                    self.lost += u64::from(lost);
                    Continuity::Gap { lost }
                }
            }
        }
    }

    /// Total packets lost so far (all PIDs).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Total duplicate packets seen so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Forgets all PIDs (e.g. after switching streams); totals are kept.
    pub fn reset_pids(&mut self) {
        self.last.clear();
    }
}

#[cfg(test)]
mod tests;
