//! The wire format: every packet exchanged between bootstrapper, servers, nodes and clients.
//!
//! # Layout
//!
//! Every UDP datagram (and every bootstrap TCP frame, after its length prefix) is
//!
//! ```text
//!  0      2        3          4                 12
//!  +------+--------+----------+-----------------+------------------------------+
//!  | "PS" | version| envelope | sender (u64 LE) | body (bincode 1, varint ints)|
//!  +------+--------+----------+-----------------+------------------------------+
//! ```
//!
//! * `magic` (`"PS"`) tells our datagrams from stray traffic.
//! * `version` is [`PROTOCOL_VERSION`]; a peer speaking another version is rejected with
//!   [`WireError::Version`] before anything else is decoded (drivers log it once per peer,
//!   see [`OncePerPeer`]).
//! * `envelope` says how the rest is protected. Version 1 knows only [`Envelope::Plain`]; an
//!   authenticated envelope (a MAC trailer over header + body, keyed per overlay) is reserved
//!   for the issue that adds authentication, so the header does not have to change then.
//! * `sender` is the [`NodeId`] of the sending process. Architecture invariant: identity is this
//!   field (to be authenticated), never the UDP source address alone.
//!
//! The header is hand-encoded so that the version check happens before bincode sees a byte.
//! The body is bincode 1.3 (pinned) with varint integers, decoded with a byte limit equal to the
//! datagram length, rejecting trailing bytes; every variable-length list has an element cap that
//! is checked *before* allocating, and no allocation is sized from a claimed length (see
//! [`bounded`]; byte strings are checked against the byte limit by bincode first). So decoding
//! never panics, and what it allocates is bounded by what the datagram really contains: a
//! hostile length prefix costs nothing (`tests/decode_alloc.rs` checks this with a counting
//! allocator: no allocation larger than 16× the datagram — 8 bytes of u64 per 1-byte varint,
//! doubled by `Vec` growth).

use crate::id::NodeId;
use bincode::Options;
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;

/// First two bytes of every datagram and frame.
pub const MAGIC: [u8; 2] = *b"PS";
/// The protocol version this build speaks. Bump on any incompatible change of a body type.
pub const PROTOCOL_VERSION: u8 = 1;
/// Length of the fixed header (magic, version, envelope, sender).
pub const HEADER_LEN: usize = 12;
/// Largest datagram we send or accept: fits a 1500-byte Ethernet MTU without IP
/// fragmentation (1500 − 20 IPv4 − 8 UDP). A video datagram (7 × 188 TS bytes) fits with room.
pub const MAX_DATAGRAM_LEN: usize = 1472;
/// Largest bootstrap frame body (TCP, after the 4-byte length prefix).
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// The UDP (and bootstrap TCP) port every host uses unless told otherwise.
pub const DEFAULT_PORT: u16 = 8010;

/// Caps on list lengths, checked before allocating while decoding.
pub mod limits {
    /// Message ids in one [`super::Body::Ack`].
    pub const ACK_IDS: usize = 128;
    /// Hops remembered in a [`super::Flood`] path.
    pub const FLOOD_PATH: usize = 32;
    /// Channels announced in one flood or listed in one [`super::Message::Channels`] page.
    pub const CHANNELS: usize = 32;
    /// Sequence numbers in one [`super::Message::Nack`].
    pub const NACK_SEQS: usize = 64;
    /// Neighbours in one bootstrap answer.
    pub const NEIGHBOURS: usize = 1024;
    /// Bytes in a channel name.
    pub const CHANNEL_NAME: usize = 128;
}

/// How the part after the header is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Envelope {
    /// No protection: body follows the header directly (protocol version 1).
    Plain = 0,
}

impl Envelope {
    fn from_u8(b: u8) -> Option<Envelope> {
        match b {
            0 => Some(Envelope::Plain),
            _ => None,
        }
    }
}

/// The fixed header of every datagram and frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version the sender speaks (always [`PROTOCOL_VERSION`] after a successful decode).
    pub version: u8,
    /// How the body is protected.
    pub envelope: Envelope,
    /// Who sent it (to be authenticated by a later protocol version).
    pub sender: NodeId,
}

impl Header {
    /// A header for our own datagrams.
    pub fn new(sender: NodeId) -> Header {
        Header {
            version: PROTOCOL_VERSION,
            envelope: Envelope::Plain,
            sender,
        }
    }
}

/// Why a datagram or frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a header.
    #[error("datagram too short ({0} bytes, header needs {HEADER_LEN})")]
    TooShort(usize),
    /// Does not start with [`MAGIC`]: not one of ours.
    #[error("bad magic {0:02x?}: not a Pessi Streamer datagram")]
    BadMagic([u8; 2]),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    Version {
        /// The version in the datagram.
        got: u8,
    },
    /// Envelope kind this build does not know.
    #[error("unknown envelope kind {0}")]
    UnknownEnvelope(u8),
    /// The body did not decode (truncated, corrupt, trailing bytes, a list over its cap...).
    #[error("malformed body: {0}")]
    Body(String),
    /// Encoding would exceed the size limit.
    #[error("encoded size {size} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes it would take.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

fn bincode_opts(limit: usize) -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_little_endian()
        .with_limit(limit as u64)
        .reject_trailing_bytes()
}

/// Encodes `header` + `body` into one buffer, failing if it exceeds `limit` bytes.
pub fn encode_with_limit<B: Serialize>(
    header: &Header,
    body: &B,
    limit: usize,
) -> Result<Bytes, WireError> {
    let opts = bincode_opts(limit.saturating_sub(HEADER_LEN));
    let size = opts
        .serialized_size(body)
        .map_err(|_| WireError::TooLarge {
            size: usize::MAX,
            limit,
        })? as usize
        + HEADER_LEN;
    if size > limit {
        return Err(WireError::TooLarge { size, limit });
    }
    let mut buf = BytesMut::with_capacity(size);
    buf.put_slice(&MAGIC);
    buf.put_u8(header.version);
    buf.put_u8(header.envelope as u8);
    buf.put_u64_le(header.sender.0);
    let mut w = buf.writer();
    opts.serialize_into(&mut w, body)
        .map_err(|e| WireError::Body(e.to_string()))?;
    Ok(w.into_inner().freeze())
}

/// Decodes and checks the fixed header only.
pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::TooShort(bytes.len()));
    }
    if bytes[0..2] != MAGIC {
        return Err(WireError::BadMagic([bytes[0], bytes[1]]));
    }
    if bytes[2] != PROTOCOL_VERSION {
        return Err(WireError::Version { got: bytes[2] });
    }
    let envelope = Envelope::from_u8(bytes[3]).ok_or(WireError::UnknownEnvelope(bytes[3]))?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[4..12]);
    Ok(Header {
        version: bytes[2],
        envelope,
        sender: NodeId(u64::from_le_bytes(id)),
    })
}

/// Decodes a header and a body of type `B`; the whole input must be consumed.
pub fn decode_as<B: DeserializeOwned>(bytes: &[u8]) -> Result<(Header, B), WireError> {
    let header = decode_header(bytes)?;
    let rest = &bytes[HEADER_LEN..];
    let body = bincode_opts(rest.len())
        .deserialize(rest)
        .map_err(|e| WireError::Body(e.to_string()))?;
    Ok((header, body))
}

/// A decoded UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The fixed header.
    pub header: Header,
    /// What it carries.
    pub body: Body,
}

impl Datagram {
    /// A datagram from `sender`.
    pub fn new(sender: NodeId, body: Body) -> Datagram {
        Datagram {
            header: Header::new(sender),
            body,
        }
    }

    /// Encodes into one buffer (at most [`MAX_DATAGRAM_LEN`] bytes). The data path encodes a
    /// datagram once and sends the same `Bytes` to every subscriber.
    pub fn encode(&self) -> Result<Bytes, WireError> {
        encode_with_limit(&self.header, &self.body, MAX_DATAGRAM_LEN)
    }

    /// Decodes a received datagram. Never panics; allocates at most `bytes.len()` bytes.
    pub fn decode(bytes: &[u8]) -> Result<Datagram, WireError> {
        if bytes.len() > MAX_DATAGRAM_LEN {
            return Err(WireError::TooLarge {
                size: bytes.len(),
                limit: MAX_DATAGRAM_LEN,
            });
        }
        let (header, body) = decode_as(bytes)?;
        Ok(Datagram { header, body })
    }
}

/// The index of [`Body::Video`] in the body enum (bincode writes it as a varint).
const VIDEO_VARIANT: u64 = 3;

/// Reads one bincode-1 varint at `*at` (one byte up to 250; 251, 252, 253 announce a u16,
/// u32, u64 little-endian), as bincode does: non-minimal forms are accepted, 254 (u128) and 255
/// are not.
fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let tag = *b.get(*at)?;
    *at += 1;
    let width = match tag {
        0..=250 => return Some(u64::from(tag)),
        251 => 2,
        252 => 4,
        253 => 8,
        _ => return None,
    };
    let raw = b.get(*at..*at + width)?;
    *at += width;
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(raw);
    Some(u64::from_le_bytes(v))
}

/// Where the fields of a video datagram are, found without decoding its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VideoLayout {
    channel: ChannelId,
    seq: u64,
    flags: u8,
    /// Offset of the flags byte.
    flags_at: usize,
    /// Offset of the payload (it runs to the end).
    payload_at: usize,
}

impl VideoLayout {
    /// `Ok(None)`: a valid header whose body is not video. Accepts exactly what
    /// [`Datagram::decode`] accepts as a [`Body::Video`] (checked by a property test).
    fn of(b: &[u8]) -> Result<Option<VideoLayout>, WireError> {
        if b.len() > MAX_DATAGRAM_LEN {
            return Err(WireError::TooLarge {
                size: b.len(),
                limit: MAX_DATAGRAM_LEN,
            });
        }
        decode_header(b)?;
        let bad = |what: &str| WireError::Body(format!("video datagram: {what}"));
        let mut at = HEADER_LEN;
        match read_varint(b, &mut at) {
            Some(VIDEO_VARIANT) => {}
            _ => return Ok(None),
        }
        let channel = ChannelId(read_varint(b, &mut at).ok_or_else(|| bad("channel"))?);
        let seq = read_varint(b, &mut at).ok_or_else(|| bad("seq"))?;
        let flags_at = at;
        let flags = *b.get(at).ok_or_else(|| bad("flags"))?;
        at += 1;
        let len = read_varint(b, &mut at).ok_or_else(|| bad("payload length"))?;
        if len != (b.len() - at) as u64 {
            return Err(bad("payload length does not match the datagram"));
        }
        Ok(Some(VideoLayout {
            channel,
            seq,
            flags,
            flags_at,
            payload_at: at,
        }))
    }
}

/// A received video datagram, parsed in place: its buffer is the datagram as it arrived
/// (opened, when sessions are on), header included, and nothing of it is copied. A relay
/// forwards it by writing its own id into the header ([`VideoFrame::restamp`]); a viewer takes
/// the payload as a slice of the same buffer ([`VideoFrame::into_packet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoFrame {
    datagram: BytesMut,
    layout: VideoLayout,
}

impl VideoFrame {
    /// Parses `datagram` if it is a video datagram: `Ok(Err(datagram))` gives back any other
    /// kind (with a valid header) for the ordinary decoder; `Err` is a malformed video
    /// datagram, or a bad header.
    pub fn parse(datagram: BytesMut) -> Result<Result<VideoFrame, BytesMut>, WireError> {
        Ok(match VideoLayout::of(&datagram)? {
            Some(layout) => Ok(VideoFrame { datagram, layout }),
            None => Err(datagram),
        })
    }

    /// The sender id in its header.
    pub fn sender(&self) -> NodeId {
        NodeId(u64::from_le_bytes(
            self.datagram[4..HEADER_LEN].try_into().expect("8"),
        ))
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        self.layout.channel
    }

    /// The channel sequence number.
    pub fn seq(&self) -> u64 {
        self.layout.seq
    }

    /// The [`video_flags`].
    pub fn flags(&self) -> u8 {
        self.layout.flags
    }

    /// The TS payload.
    pub fn payload(&self) -> &[u8] {
        &self.datagram[self.layout.payload_at..]
    }

    /// The whole datagram as it arrived.
    pub fn datagram(&self) -> &[u8] {
        &self.datagram
    }

    /// The datagram to forward: the same buffer with `sender` written into its header, the
    /// payload untouched (no copy, no re-encoding).
    pub fn restamp(mut self, sender: NodeId) -> Bytes {
        self.datagram[4..HEADER_LEN].copy_from_slice(&sender.0.to_le_bytes());
        self.datagram.freeze()
    }

    /// The packet, its payload a slice of the datagram's buffer (no copy).
    pub fn into_packet(self) -> VideoPacket {
        let VideoLayout {
            channel,
            seq,
            flags,
            payload_at,
            ..
        } = self.layout;
        VideoPacket {
            channel,
            seq,
            flags,
            payload: self.datagram.freeze().slice(payload_at..),
        }
    }
}

/// A copy of the encoded video datagram `datagram` with `flag` set (see [`video_flags`]):
/// one byte changed in place of a decode and re-encode (GOP-cache bursts, retransmissions).
/// `None` if it is not a valid video datagram.
pub fn with_video_flag(datagram: &[u8], flag: u8) -> Option<Bytes> {
    let layout = VideoLayout::of(datagram).ok()??;
    let mut out = BytesMut::from(datagram);
    out[layout.flags_at] |= flag;
    Some(out.freeze())
}

/// Identifies a channel everywhere in the overlay: a hash of its name, so two servers that
/// serve a file of the same name offer two replicas of the *same* channel.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChannelId(pub u64);

impl ChannelId {
    /// The id of the channel called `name` (FNV-1a 64 over a domain tag and the UTF-8 name).
    pub fn of_name(name: &str) -> ChannelId {
        ChannelId(crate::rng::fnv1a64(
            b"pessi-channel/v1\0".iter().chain(name.as_bytes()).copied(),
        ))
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({:016x})", self.0)
    }
}

/// The body of a datagram: the transport-level kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A control message sent through the reliable channel: retransmitted until acknowledged and
    /// delivered to the application exactly once.
    Reliable {
        /// Random per sending endpoint and process start: a restarted peer's fresh ids are not
        /// mistaken for duplicates of the old ones.
        session: u64,
        /// Message id, increasing per (session, destination).
        id: u64,
        /// What the application sent.
        msg: Message,
    },
    /// Acknowledges reliable messages of `session` (also re-sent for duplicates, in case the
    /// first ack was lost).
    Ack {
        /// The session the ids belong to.
        session: u64,
        /// Acknowledged message ids.
        #[serde(deserialize_with = "bounded::vec::<_, _, { limits::ACK_IDS }>")]
        ids: Vec<u64>,
    },
    /// A control message sent once, without acknowledgement: periodic or time-critical traffic
    /// (floods, pings, NACKs) whose next round supersedes a lost one.
    Unreliable(Message),
    /// A slice of a channel's MPEG-TS. Never retransmitted by the reliable channel (late video is
    /// worthless); loss recovery for video has its own, deadline-aware mechanism.
    Video(VideoPacket),
}

/// Flags on a [`VideoPacket`].
pub mod video_flags {
    /// The payload begins an access unit that is a keyframe (random access point).
    pub const KEYFRAME: u8 = 0b0000_0001;
    /// This is a retransmission answering a NACK.
    pub const RETRANSMIT: u8 = 0b0000_0010;
    /// Sent from a relay's GOP cache to a new subscriber (catch-up burst), not live.
    pub const FROM_CACHE: u8 = 0b0000_0100;
}

/// A slice of a channel's MPEG-TS: normally 7 TS packets (1316 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoPacket {
    /// Which channel.
    pub channel: ChannelId,
    /// Channel sequence number, assigned by the server and kept end to end (gap detection,
    /// NACKs, merging two paths).
    pub seq: u64,
    /// See [`video_flags`].
    pub flags: u8,
    /// Whole TS packets (a multiple of 188 bytes).
    pub payload: Bytes,
}

/// A channel as announced by servers and listed to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// `ChannelId::of_name(name)`.
    pub id: ChannelId,
    /// Human-readable name (the video file name without extension, or the live source's name).
    #[serde(deserialize_with = "bounded::string::<_, { limits::CHANNEL_NAME }>")]
    pub name: String,
}

/// One hop of a flood's path: who relayed it and where that host listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathHop {
    /// The relaying host's id.
    pub id: NodeId,
    /// Its overlay address (used to reach a dead relay's own parent).
    pub addr: SocketAddr,
}

/// A periodic announcement that builds the distribution tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flood {
    /// The server that started this flood round.
    pub origin: NodeId,
    /// Round number per origin; relays suppress duplicates by `(origin, seq)`.
    pub seq: u64,
    /// Accumulated path cost in microseconds: the sum of link RTT estimates measured with
    /// `Instant` by each hop. Clock-free: no wall clock of any host is involved.
    pub cost_us: u64,
    /// The sender's load: how many (channel, subscriber) pairs it serves now. Each hop puts its
    /// own; receivers break ties between routes of equal cost and hops with it.
    pub load: u32,
    /// The hosts this flood went through, origin first, the sender last.
    #[serde(deserialize_with = "bounded::vec::<_, _, { limits::FLOOD_PATH }>")]
    pub path: Vec<PathHop>,
    /// The channels the origin serves.
    #[serde(deserialize_with = "bounded::vec::<_, _, { limits::CHANNELS }>")]
    pub channels: Vec<ChannelInfo>,
}

/// Application control messages (sent reliably or not, see [`Body`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Server/relay → neighbours: the periodic flood that announces channels and path costs.
    Flood(Flood),
    /// Downstream → upstream (node or client → its chosen upstream): start sending `channel` to
    /// me. Also used by a client to its PoP.
    Subscribe {
        /// The wanted channel.
        channel: ChannelId,
    },
    /// Downstream → upstream: stop sending `channel` to me. Upstream → downstream: I cannot
    /// feed you `channel` any more (I have no route to it).
    Unsubscribe {
        /// The channel no longer wanted.
        channel: ChannelId,
    },
    /// Client → PoP: which channels can you deliver?
    ListChannels,
    /// PoP → client: one page of the channels it can deliver.
    Channels {
        /// Page index, from 0.
        page: u16,
        /// Number of pages in this answer.
        pages: u16,
        /// The channels on this page.
        #[serde(deserialize_with = "bounded::vec::<_, _, { limits::CHANNELS }>")]
        channels: Vec<ChannelInfo>,
    },
    /// RTT / liveness probe; answered by [`Message::Pong`] with the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to [`Message::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Receiver → upstream: these sequence numbers of `channel` are missing; retransmit them.
    Nack {
        /// The channel.
        channel: ChannelId,
        /// Missing sequence numbers.
        #[serde(deserialize_with = "bounded::vec::<_, _, { limits::NACK_SEQS }>")]
        seqs: Vec<u64>,
    },
    /// Sender is shutting down cleanly: drop it at once instead of waiting for a timeout.
    Goodbye,
}

/// Bootstrap request, sent over TCP in a length-prefixed frame. The requester's identity is the
/// address its TCP connection comes from (it binds its own overlay IP before connecting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootstrapRequest {
    /// "Who are my neighbours, and what is my id?"
    Neighbours,
    /// "Tell me when my answer changes" (long poll, so topology edits reach running hosts):
    /// `known` is [`BootstrapResponse::digest`] of the answer the host holds. The
    /// bootstrapper answers at once if the host's answer differs, else when it changes or after
    /// its hold time (then with the same answer); the host asks again.
    Watch {
        /// Digest of the answer the host holds.
        known: u64,
    },
}

/// An overlay member and its static public key (see `common::secure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its static X25519 public key.
    pub key: crate::keys::PublicKey,
}

/// Bootstrap answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootstrapResponse {
    /// The requester is in the topology.
    Neighbours {
        /// The requester's stable id.
        id: NodeId,
        /// The requester's overlay address as the bootstrapper sees it.
        addr: SocketAddr,
        /// Its neighbours.
        #[serde(deserialize_with = "bounded::vec::<_, _, { limits::NEIGHBOURS }>")]
        neighbours: Vec<PathHop>,
        /// The overlay's members whose static keys are known (pinned in the topology, or
        /// registered by the host itself): who may open a session with whom.
        #[serde(deserialize_with = "bounded::vec::<_, _, { limits::NEIGHBOURS }>")]
        members: Vec<Member>,
    },
    /// The requester is not in the topology (or asked something refused): the reason says why.
    Refused {
        /// Human-readable reason, e.g. "127.0.0.9 is not in the topology".
        #[serde(deserialize_with = "bounded::string::<_, 1024>")]
        reason: String,
    },
}

impl BootstrapResponse {
    /// A stable digest of the answer (FNV-1a of its encoding), to tell whether a host's
    /// neighbours changed ([`BootstrapRequest::Watch`]).
    pub fn digest(&self) -> u64 {
        let bytes = bincode::serialize(self).unwrap_or_default();
        crate::rng::fnv1a64(bytes)
    }
}

/// Deserializers that enforce an element cap before allocating.
pub mod bounded {
    use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    /// A `Vec<T>` of at most `N` elements; a larger claimed length is refused before reading,
    /// and nothing is allocated from the claimed length.
    pub fn vec<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > N {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                // No preallocation from the claimed length: the Vec grows only as elements are
                // actually decoded, each of which consumed input bytes.
                let mut out = Vec::new();
                while let Some(x) = seq.next_element()? {
                    if out.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    out.push(x);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }

    /// A `String` of at most `N` bytes.
    pub fn string<'de, D, const N: usize>(d: D) -> Result<String, D::Error>
    where
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        if s.len() > N {
            return Err(de::Error::custom(format!(
                "string of {} bytes exceeds {N}",
                s.len()
            )));
        }
        Ok(s)
    }
}

/// Remembers which peers were already told about in the log, so a misbehaving peer (another
/// protocol version, say) yields one clear log line instead of one per datagram.
#[derive(Debug, Default)]
pub struct OncePerPeer {
    seen: HashSet<SocketAddr>,
}

impl OncePerPeer {
    /// Most peers remembered; past this the set is cleared (and may log again).
    const CAP: usize = 4096;

    /// `true` the first time `peer` is seen.
    pub fn first(&mut self, peer: SocketAddr) -> bool {
        if self.seen.len() >= Self::CAP && !self.seen.contains(&peer) {
            self.seen.clear();
        }
        self.seen.insert(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_node() -> impl Strategy<Value = NodeId> {
        any::<u64>().prop_map(NodeId)
    }
    fn arb_channel() -> impl Strategy<Value = ChannelId> {
        any::<u64>().prop_map(ChannelId)
    }
    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port)))
    }
    fn arb_info() -> impl Strategy<Value = ChannelInfo> {
        "[a-zA-Z0-9 _/.-]{0,40}".prop_map(|name| ChannelInfo {
            id: ChannelId::of_name(&name),
            name,
        })
    }
    fn arb_hop() -> impl Strategy<Value = PathHop> {
        (arb_node(), arb_addr()).prop_map(|(id, addr)| PathHop { id, addr })
    }
    fn arb_flood() -> impl Strategy<Value = Flood> {
        (
            arb_node(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(arb_hop(), 0..8),
            prop::collection::vec(arb_info(), 0..8),
        )
            .prop_map(|(origin, seq, cost_us, load, path, channels)| Flood {
                origin,
                seq,
                cost_us,
                load,
                path,
                channels,
            })
    }
    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            arb_flood().prop_map(Message::Flood),
            arb_channel().prop_map(|channel| Message::Subscribe { channel }),
            arb_channel().prop_map(|channel| Message::Unsubscribe { channel }),
            Just(Message::ListChannels),
            (
                any::<u16>(),
                any::<u16>(),
                prop::collection::vec(arb_info(), 0..10)
            )
                .prop_map(|(page, pages, channels)| Message::Channels {
                    page,
                    pages,
                    channels
                }),
            any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
            (
                arb_channel(),
                prop::collection::vec(any::<u64>(), 0..limits::NACK_SEQS)
            )
                .prop_map(|(channel, seqs)| Message::Nack { channel, seqs }),
            Just(Message::Goodbye),
        ]
    }
    fn arb_body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), arb_message())
                .prop_map(|(session, id, msg)| Body::Reliable { session, id, msg }),
            (
                any::<u64>(),
                prop::collection::vec(any::<u64>(), 0..limits::ACK_IDS)
            )
                .prop_map(|(session, ids)| Body::Ack { session, ids }),
            arb_message().prop_map(Body::Unreliable),
            (
                arb_channel(),
                any::<u64>(),
                any::<u8>(),
                prop::collection::vec(any::<u8>(), 0..=1316)
            )
                .prop_map(|(channel, seq, flags, payload)| Body::Video(VideoPacket {
                    channel,
                    seq,
                    flags,
                    payload: Bytes::from(payload)
                })),
        ]
    }
    fn arb_bootstrap_response() -> impl Strategy<Value = BootstrapResponse> {
        prop_oneof![
            (
                arb_node(),
                arb_addr(),
                prop::collection::vec(arb_hop(), 0..50),
                prop::collection::vec((arb_node(), any::<[u8; 32]>()), 0..50)
            )
                .prop_map(|(id, addr, neighbours, m)| BootstrapResponse::Neighbours {
                    id,
                    addr,
                    neighbours,
                    members: m
                        .into_iter()
                        .map(|(id, k)| Member {
                            id,
                            key: crate::keys::PublicKey(k)
                        })
                        .collect(),
                }),
            ".{0,100}".prop_map(|reason| BootstrapResponse::Refused { reason }),
        ]
    }

    /// The in-place video parser and bincode agree on `bytes`: the same packet when it is
    /// video, both refuse it otherwise (or the parser hands it to the ordinary decoder).
    fn frame_agrees_with_bincode(bytes: &[u8]) -> Result<(), TestCaseError> {
        match (
            Datagram::decode(bytes),
            VideoFrame::parse(BytesMut::from(bytes)),
        ) {
            (
                Ok(Datagram {
                    header,
                    body: Body::Video(p),
                }),
                Ok(Ok(f)),
            ) => {
                prop_assert_eq!(
                    (f.channel(), f.seq(), f.flags()),
                    (p.channel, p.seq, p.flags)
                );
                prop_assert_eq!(f.payload(), &p.payload[..]);
                prop_assert_eq!(f.clone().into_packet(), p);
                prop_assert_eq!(&f.restamp(header.sender)[..], bytes);
            }
            (Ok(d), Ok(Err(back))) => {
                prop_assert!(!matches!(d.body, Body::Video(_)), "parser missed {:?}", d);
                prop_assert_eq!(&back[..], bytes);
            }
            (Err(_), Err(_) | Ok(Err(_))) => {}
            (a, b) => prop_assert!(false, "bincode {:?} but parser {:?}", a, b),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn the_video_parser_agrees_with_bincode(sender in arb_node(), body in arb_body(), cut in any::<prop::sample::Index>(), bit in any::<prop::sample::Index>()) {
            let bytes = Datagram::new(sender, body).encode().unwrap();
            frame_agrees_with_bincode(&bytes)?;
            frame_agrees_with_bincode(&bytes[..cut.index(bytes.len())])?;
            let mut flipped = bytes.to_vec();
            let b = bit.index(flipped.len() * 8);
            flipped[b / 8] ^= 1 << (b % 8);
            frame_agrees_with_bincode(&flipped)?;
        }

        #[test]
        fn the_video_parser_agrees_on_random_video_bodies(body in prop::collection::vec(any::<u8>(), 0..40), tail in 0usize..1400) {
            // A valid header and the video tag, then random varints and a random length.
            let mut bytes = vec![b'P', b'S', PROTOCOL_VERSION, 0, 1, 2, 3, 4, 5, 6, 7, 8, 3];
            bytes.extend_from_slice(&body);
            bytes.extend(std::iter::repeat_n(0x47u8, tail));
            frame_agrees_with_bincode(&bytes)?;
        }

        #[test]
        fn flagging_changes_the_flags_only(sender in arb_node(), seq in any::<u64>(), flags in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..=1316)) {
            let p = VideoPacket { channel: ChannelId(9), seq, flags, payload: Bytes::from(payload) };
            let bytes = Datagram::new(sender, Body::Video(p.clone())).encode().unwrap();
            let flagged = with_video_flag(&bytes, video_flags::RETRANSMIT).unwrap();
            let want = VideoPacket { flags: flags | video_flags::RETRANSMIT, ..p };
            prop_assert_eq!(Datagram::decode(&flagged).unwrap(), Datagram::new(sender, Body::Video(want)));
        }

        #[test]
        fn every_datagram_round_trips(sender in arb_node(), body in arb_body()) {
            let d = Datagram::new(sender, body);
            let bytes = d.encode().expect("fits");
            prop_assert!(bytes.len() <= MAX_DATAGRAM_LEN);
            prop_assert_eq!(Datagram::decode(&bytes).expect("decodes"), d);
        }

        #[test]
        fn bootstrap_frames_round_trip(sender in arb_node(), resp in arb_bootstrap_response()) {
            let h = Header::new(sender);
            let digest = resp.digest();
            let bytes = encode_with_limit(&h, &resp, MAX_FRAME_LEN).unwrap();
            let (h2, r2): (Header, BootstrapResponse) = decode_as(&bytes).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(r2, resp);
            for r in [BootstrapRequest::Neighbours, BootstrapRequest::Watch { known: digest }] {
                let req = encode_with_limit(&h, &r, MAX_FRAME_LEN).unwrap();
                let (_, q): (Header, BootstrapRequest) = decode_as(&req).unwrap();
                prop_assert_eq!(q, r);
            }
        }

        #[test]
        fn truncated_datagrams_are_errors(sender in arb_node(), body in arb_body(), cut in any::<prop::sample::Index>()) {
            let bytes = Datagram::new(sender, body).encode().unwrap();
            let n = cut.index(bytes.len()); // strictly shorter
            prop_assert!(Datagram::decode(&bytes[..n]).is_err());
        }

        #[test]
        fn bit_flips_never_panic(sender in arb_node(), body in arb_body(), bit in any::<prop::sample::Index>()) {
            let mut bytes = Datagram::new(sender, body).encode().unwrap().to_vec();
            let b = bit.index(bytes.len() * 8);
            bytes[b / 8] ^= 1 << (b % 8);
            // May decode to another valid datagram (the body has no checksum), must not panic;
            // a flip in magic/version/envelope is always an error.
            let r = Datagram::decode(&bytes);
            if b / 8 < 4 { prop_assert!(r.is_err()); }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Datagram::decode(&bytes);
            let _ = decode_as::<BootstrapResponse>(&bytes);
            let _ = decode_as::<BootstrapRequest>(&bytes);
        }

        #[test]
        fn random_bodies_behind_a_valid_header_never_panic(body in prop::collection::vec(any::<u8>(), 0..1400)) {
            let mut bytes = vec![b'P', b'S', PROTOCOL_VERSION, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            bytes.extend_from_slice(&body);
            let _ = Datagram::decode(&bytes);
            let _ = decode_as::<BootstrapResponse>(&bytes);
        }
    }

    fn header_bytes() -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[PROTOCOL_VERSION, 0]);
        v.extend_from_slice(&7u64.to_le_bytes());
        v
    }

    #[test]
    fn oversize_length_prefixes_do_not_allocate() {
        // Body::Ack (variant 1) with a claimed list length of u64::MAX (varint 0xFD + 8 bytes).
        let mut b = header_bytes();
        b.extend_from_slice(&[1, 5, 0xFD]);
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Datagram::decode(&b), Err(WireError::Body(_))));
        // A list just over its cap is refused even if the bytes were there.
        let mut b = header_bytes();
        b.extend_from_slice(&[1, 5, (limits::ACK_IDS + 1) as u8]);
        b.extend(std::iter::repeat_n(0u8, limits::ACK_IDS + 1));
        let e = Datagram::decode(&b).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        // Video payload (bytes) claiming 4 GiB: rejected by the byte limit before allocating.
        let mut b = header_bytes();
        b.extend_from_slice(&[3, 1, 1, 0, 0xFC]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Datagram::decode(&b).is_err());
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let d = Datagram::new(NodeId(1), Body::Unreliable(Message::Goodbye));
        let mut b = d.encode().unwrap().to_vec();
        assert_eq!(Datagram::decode(&b).unwrap(), d);
        b.push(0);
        assert!(matches!(Datagram::decode(&b), Err(WireError::Body(_))));
    }

    #[test]
    fn other_versions_are_named() {
        let mut b = Datagram::new(NodeId(1), Body::Unreliable(Message::Goodbye))
            .encode()
            .unwrap()
            .to_vec();
        b[2] = 9;
        let e = Datagram::decode(&b).unwrap_err();
        assert_eq!(e, WireError::Version { got: 9 });
        assert_eq!(
            e.to_string(),
            "peer speaks protocol version 9, this build speaks 1"
        );
        b[2] = PROTOCOL_VERSION;
        b[3] = 1;
        assert_eq!(
            Datagram::decode(&b).unwrap_err(),
            WireError::UnknownEnvelope(1)
        );
        assert!(matches!(
            Datagram::decode(b"XX\x01\x00aaaaaaaa"),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn a_full_video_datagram_fits_and_oversize_is_refused() {
        let d = Datagram::new(
            NodeId(u64::MAX),
            Body::Video(VideoPacket {
                channel: ChannelId(u64::MAX),
                seq: u64::MAX,
                flags: 0xFF,
                payload: Bytes::from(vec![0x47; 1316]),
            }),
        );
        assert!(d.encode().unwrap().len() <= MAX_DATAGRAM_LEN);
        let big = Datagram::new(
            NodeId(1),
            Body::Video(VideoPacket {
                channel: ChannelId(1),
                seq: 1,
                flags: 0,
                payload: Bytes::from(vec![0; MAX_DATAGRAM_LEN]),
            }),
        );
        assert!(matches!(big.encode(), Err(WireError::TooLarge { .. })));
        assert!(matches!(
            Datagram::decode(&vec![0; MAX_DATAGRAM_LEN + 1]),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn once_per_peer() {
        let mut o = OncePerPeer::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(o.first(a));
        assert!(!o.first(a));
        assert!(o.first("127.0.0.2:1".parse().unwrap()));
    }

    #[test]
    fn channel_ids_depend_on_name_only() {
        assert_eq!(ChannelId::of_name("news"), ChannelId::of_name("news"));
        assert_ne!(ChannelId::of_name("news"), ChannelId::of_name("sport"));
    }
}
