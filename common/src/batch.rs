//! Batched UDP I/O under [`Port`](crate::port::Port): many datagrams, each to (or from) its
//! own address, in one system call — `sendmmsg(2)` and `recvmmsg(2)` on Linux (a loop of
//! `sendto`/`recvfrom` elsewhere). A relay's fan-out of one video datagram to its subscribers
//! is one call instead of one per subscriber, and a burst of arrivals (a GOP burst, or a flood
//! of junk) is read [`BATCH`] at a time.
//!
//! Datagrams to one peer that follow each other in a batch (a GOP burst, a retransmission
//! run, a burst of live video sorted by destination) go out as one UDP GSO message: the kernel
//! builds the datagrams from one call (`UDP_SEGMENT`; off for good if refused).
//!
//! On the way in, UDP GRO ([`RecvBatch::with_gro`], Linux ≥ 5.0, what every [`Port`](crate::port::Port) asks for): a run of datagrams from one
//! peer (a GSO send on loopback; coalesced by the NIC's GRO on a real network) arrives as one
//! buffer with its segment size, and is cut here into the same datagrams, each its own
//! `BytesMut` over the shared buffer as with `recvmmsg`: one kernel buffer and one wake-up per
//! run instead of one per datagram, on both sides of loopback.
//!
//! Both are synchronous and non-blocking: the caller runs them inside the tokio socket's
//! `try_io`, so a full send buffer or an empty receive queue is `WouldBlock` and the readiness
//! is cleared for the next `writable()`/`readable()`.

use bytes::{Bytes, BytesMut};
use std::io;
use std::net::SocketAddr;

/// Datagrams per system call at most.
pub const BATCH: usize = 64;

/// Datagrams in the first slice of a large fan-out handed to the kernel: a driver that seals
/// as it sends gives the kernel growing slices (each [`next_slice`] of the previous), so the
/// first peers' copies leave while the later ones are still being sealed.
pub const FIRST_SLICE: usize = 8;

/// The slice after one of `slice` datagrams: twice as many, up to [`BATCH`].
pub fn next_slice(slice: usize) -> usize {
    (slice * 2).min(BATCH)
}

/// Reusable buffers of a batched send.
pub struct SendBatch {
    /// Coalesce runs of datagrams to one peer into one UDP GSO message (`UDP_SEGMENT`);
    /// turned off for good when the kernel refuses it.
    gso: bool,
    #[cfg(target_os = "linux")]
    names: Vec<libc::sockaddr_storage>,
    #[cfg(target_os = "linux")]
    iovs: Vec<libc::iovec>,
    #[cfg(target_os = "linux")]
    msgs: Vec<libc::mmsghdr>,
    /// Per message: how many datagrams it carries.
    counts: Vec<usize>,
    /// Per message: room for one `UDP_SEGMENT` control message (8-byte aligned).
    #[cfg(target_os = "linux")]
    controls: Vec<[u64; 4]>,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            gso: true,
            #[cfg(target_os = "linux")]
            names: Vec::new(),
            #[cfg(target_os = "linux")]
            iovs: Vec::new(),
            #[cfg(target_os = "linux")]
            msgs: Vec::new(),
            counts: Vec::new(),
            #[cfg(target_os = "linux")]
            controls: Vec::new(),
        }
    }
}

/// Datagrams per GSO message at most (the kernel's `UDP_MAX_SEGMENTS`).
const GSO_SEGMENTS: usize = 64;
/// Bytes per GSO message at most (one IP datagram before segmentation).
const GSO_BYTES: usize = 65_000;

// SAFETY: the raw pointers inside point only into the batch's own vectors and the caller's
// buffers during one `send` call; nothing is kept between calls.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch").finish_non_exhaustive()
    }
}

#[cfg(target_os = "linux")]
fn sockaddr(a: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    // SAFETY: sockaddr_storage is large and aligned enough for either address family.
    unsafe {
        match a {
            SocketAddr::V4(v4) => {
                let s = &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                s.sin_family = libc::AF_INET as libc::sa_family_t;
                s.sin_port = v4.port().to_be();
                s.sin_addr = libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                };
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(v6) => {
                let s = &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                s.sin6_port = v6.port().to_be();
                s.sin6_flowinfo = v6.flowinfo();
                s.sin6_addr = libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                };
                s.sin6_scope_id = v6.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family field says which structure the kernel wrote.
    unsafe {
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(SocketAddr::from((
                    a.sin_addr.s_addr.to_ne_bytes(),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    a.sin6_addr.s6_addr.into(),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

impl SendBatch {
    /// A batch that never coalesces (one message per datagram), for comparison.
    pub fn without_gso() -> SendBatch {
        SendBatch {
            gso: false,
            ..SendBatch::default()
        }
    }

    /// Whether runs of datagrams to one peer go out as one GSO message.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Sends the first datagrams of `items` (at most [`BATCH`] messages) in one system call. A run of
    /// consecutive datagrams to the same peer, all of one size (the last may be shorter), is
    /// one UDP GSO message (the kernel cuts it into the same datagrams). Returns how many
    /// datagrams the kernel took, from the front; an error means the first one failed
    /// (`WouldBlock`: the send buffer is full; anything else concerns that datagram only).
    #[cfg(target_os = "linux")]
    pub fn send(
        &mut self,
        socket: &impl std::os::fd::AsRawFd,
        items: &[(SocketAddr, Bytes)],
    ) -> io::Result<usize> {
        let n = items.len();
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid value of these plain C structures.
        let zero = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        self.names.clear();
        self.iovs.clear();
        self.msgs.clear();
        self.counts.clear();
        self.controls.clear();
        let mut i = 0;
        while i < n && self.msgs.len() < BATCH {
            let (to, first) = &items[i];
            let size = first.len();
            let mut run = 1;
            if self.gso && size > 0 {
                let mut bytes = size;
                while i + run < n
                    && run < GSO_SEGMENTS
                    && items[i + run].0 == *to
                    && bytes + items[i + run].1.len() <= GSO_BYTES
                {
                    let len = items[i + run].1.len();
                    if len > size || len == 0 {
                        break;
                    }
                    bytes += len;
                    run += 1;
                    if len < size {
                        break; // a shorter one can only be the last
                    }
                }
            }
            self.names.push(zero);
            let namelen = sockaddr(*to, self.names.last_mut().expect("pushed"));
            for (_, b) in &items[i..i + run] {
                self.iovs.push(libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                });
            }
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_namelen = namelen;
            self.msgs.push(m);
            self.counts.push(run);
            let mut control = [0u64; 4];
            if run > 1 {
                // SAFETY: `control` is 32 bytes, 8-byte aligned: room for one cmsghdr with a
                // u16 (CMSG_SPACE(2) = 24); the header's fields are written through the
                // CMSG macros on a msghdr that points at it.
                unsafe {
                    let mut h: libc::msghdr = std::mem::zeroed();
                    h.msg_control = control.as_mut_ptr().cast();
                    h.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
                }
            }
            self.controls.push(control);
            i += run;
        }
        // The vectors are complete: take the pointers now (they do not move any more).
        let mut iov = 0;
        for k in 0..self.msgs.len() {
            let count = self.counts[k];
            let m = &mut self.msgs[k].msg_hdr;
            m.msg_name = (&mut self.names[k] as *mut libc::sockaddr_storage).cast();
            m.msg_iov = &mut self.iovs[iov];
            m.msg_iovlen = count;
            if count > 1 {
                m.msg_control = self.controls[k].as_mut_ptr().cast();
                // SAFETY: a pure computation.
                m.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
            }
            iov += count;
        }
        // SAFETY: `msgs` holds headers pointing at live names, iovecs, control buffers and the
        // callers' buffers (borrowed for this call).
        let r = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                self.msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let gso_refused = self.counts[0] > 1
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
                );
            if gso_refused {
                // This kernel or device does not segment for us: send them one by one.
                tracing::debug!(error = %e, "UDP GSO refused; sending datagrams one by one");
                self.gso = false;
                return Ok(0);
            }
            return Err(e);
        }
        Ok(self.counts[..r as usize].iter().sum())
    }
}

/// A batched receive: the datagrams land side by side in one shared buffer (a *chunk* of
/// [`BATCH`] slots), and each is handed out as its own [`BytesMut`] over its slot (no copy): a
/// relay opens, parses and forwards it in that very buffer. A chunk is freed when the last
/// datagram in it is dropped; slots left over by a short batch serve the next receive, so a
/// chunk is used up slot by slot whatever the batch sizes.
///
/// With UDP GRO ([`RecvBatch::with_gro`]) a receive is one `recvmsg` into the chunk's free
/// tail (room for the largest GRO buffer, [`GRO_MAX`]; chunks of [`GRO_CHUNK`]), which takes
/// exactly the bytes received, so chunks stay as densely used as without GRO; the buffer is
/// cut into its datagrams by the segment size the kernel reports.
pub struct RecvBatch {
    /// Bytes of one slot (the largest datagram taken whole, plus one to tell an oversize one).
    slot: usize,
    /// The slots not used yet (initialised memory: zeroed when allocated).
    chunk: BytesMut,
    /// UDP GRO is on for the socket: one receive per call, cut into datagrams.
    gro: bool,
    /// The datagrams of the last receive not handed out yet, in order.
    got: std::collections::VecDeque<(SocketAddr, BytesMut)>,
    #[cfg(target_os = "linux")]
    names: Vec<libc::sockaddr_storage>,
    #[cfg(target_os = "linux")]
    iovs: Vec<libc::iovec>,
    #[cfg(target_os = "linux")]
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: as for `SendBatch`: the pointers refer to the batch's own heap buffers, rebuilt for
// every call.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("pending", &self.got.len())
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// Room for [`BATCH`] datagrams of up to `max_len` bytes each per receive.
    pub fn new(max_len: usize) -> RecvBatch {
        RecvBatch {
            slot: max_len,
            chunk: BytesMut::new(),
            gro: false,
            got: std::collections::VecDeque::with_capacity(BATCH),
            #[cfg(target_os = "linux")]
            names: Vec::new(),
            #[cfg(target_os = "linux")]
            iovs: Vec::new(),
            #[cfg(target_os = "linux")]
            msgs: Vec::new(),
        }
    }

    /// As [`new`](Self::new), for `socket`, on which UDP GRO is turned on if the kernel takes it
    /// (Linux ≥ 5.0; otherwise receives stay `recvmmsg` batches).
    pub fn with_gro(max_len: usize, socket: &impl std::os::fd::AsRawFd) -> RecvBatch {
        let mut b = RecvBatch::new(max_len);
        match set_gro(socket) {
            Ok(()) => b.gro = true,
            Err(e) => tracing::debug!(error = %e, "UDP GRO refused; recvmmsg batches"),
        }
        b
    }

    /// Whether UDP GRO is on (see [`with_gro`](Self::with_gro)).
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// The next datagram of the last receive not handed out yet.
    pub fn pop(&mut self) -> Option<(SocketAddr, BytesMut)> {
        self.got.pop_front()
    }

    /// Whether every datagram received was handed out.
    pub fn is_empty(&self) -> bool {
        self.got.is_empty()
    }

    /// Receives up to [`BATCH`] waiting datagrams in one system call (call when
    /// [`is_empty`](Self::is_empty)). Returns how many; `WouldBlock` when none waits.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, socket: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
        if self.gro {
            return self.recv_gro(socket);
        }
        if self.chunk.len() < self.slot {
            // The last chunk is used up (its datagrams free it when dropped).
            self.chunk = BytesMut::zeroed(BATCH * self.slot);
        }
        let n = (self.chunk.len() / self.slot).min(BATCH);
        // SAFETY: all-zero is a valid value of these plain C structures.
        let zero = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        self.names.clear();
        self.names.resize(n, zero);
        self.iovs.clear();
        for slot in self.chunk.chunks_mut(self.slot).take(n) {
            self.iovs.push(libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: slot.len(),
            });
        }
        self.msgs.clear();
        for i in 0..n {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_iov = &mut self.iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        // SAFETY: `msgs` holds `n` headers pointing at live names and at `n` disjoint slots of
        // `chunk`, which is not touched until the call returns.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        for i in 0..r as usize {
            let m = &self.msgs[i];
            // A datagram longer than the slot is cut (MSG_TRUNC): report it one byte
            // longer than any valid datagram, as a plain recv into the slot would.
            let len = (m.msg_len as usize).min(self.slot);
            let mut d = self.chunk.split_to(self.slot);
            d.truncate(len);
            // Entries without an address (never for UDP) are skipped.
            if let Some(from) = from_sockaddr(&self.names[i]) {
                self.got.push_back((from, d));
            }
        }
        Ok(r as usize)
    }

    /// One `recvmsg` with UDP GRO into the chunk's tail; the buffer cut into its datagrams.
    #[cfg(target_os = "linux")]
    fn recv_gro(&mut self, socket: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
        if self.chunk.len() < GRO_MAX {
            // The last chunk's tail is too short for a whole GRO buffer (its datagrams free it
            // when dropped).
            self.chunk = BytesMut::zeroed(GRO_CHUNK);
        }
        // SAFETY: all-zero is a valid value of these plain C structures.
        let mut name = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        let mut iov = libc::iovec {
            iov_base: self.chunk.as_mut_ptr().cast(),
            iov_len: GRO_MAX,
        };
        // Room for one cmsghdr with an int (CMSG_SPACE(4) = 24), 8-byte aligned.
        let mut control = [0u64; 4];
        // SAFETY: as above.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = control.as_mut_ptr().cast();
        h.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `h` points at a live name, one iovec over the first GRO_MAX bytes of `chunk`
        // (at least that long), and a control buffer; none is touched until the call returns.
        let r = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut h, libc::MSG_DONTWAIT) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = r as usize;
        let mut size = len;
        // SAFETY: the kernel filled `h.msg_control` / `msg_controllen`; the CMSG macros walk
        // it within those bounds.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let s = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    size = usize::try_from(s).unwrap_or(0);
                }
                c = libc::CMSG_NXTHDR(&h, c);
            }
        }
        if size == 0 {
            size = len;
        }
        let mut data = self.chunk.split_to(len);
        // An entry without an address (never for UDP) is skipped.
        let Some(from) = from_sockaddr(&name) else {
            return Ok(0);
        };
        if data.is_empty() {
            self.got.push_back((from, data));
            return Ok(1);
        }
        let mut n = 0;
        while !data.is_empty() {
            let mut d = data.split_to(size.min(data.len()));
            // A datagram longer than a slot is reported one byte longer than any valid one,
            // as without GRO.
            d.truncate(self.slot);
            self.got.push_back((from, d));
            n += 1;
        }
        Ok(n)
    }
}

/// Turns UDP GRO on for `socket` (`UDP_GRO`): a run of datagrams from one peer is then
/// received as one buffer (a plain `recv` gets it whole, without its segment size).
pub fn set_gro(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let on: libc::c_int = 1;
        // SAFETY: a plain integer option of a live socket.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// The largest buffer a UDP GRO receive may bring (64 KB, a UDP length), and the free tail a
/// chunk keeps for it.
pub const GRO_MAX: usize = 65_536;

/// Bytes of a receive chunk with UDP GRO.
pub const GRO_CHUNK: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything waiting at `rx` (non-blocking, until nothing more comes for 50 ms).
    fn drain(rx: &std::net::UdpSocket) -> Vec<Vec<u8>> {
        rx.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 2000];
        while let Ok(n) = rx.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    #[test]
    fn runs_to_one_peer_go_out_as_gso_and_arrive_as_the_same_datagrams() {
        let (a, b) = (
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (at_a, at_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        // To a: 5 of 1 316 bytes then a shorter one (one GSO message); to b: 3, then one
        // larger (a new message), then 2 to a again.
        let d = |tag: u8, len: usize| Bytes::from(vec![tag; len]);
        let items = vec![
            (at_a, d(1, 1316)),
            (at_a, d(2, 1316)),
            (at_a, d(3, 1316)),
            (at_a, d(4, 1316)),
            (at_a, d(5, 1316)),
            (at_a, d(6, 700)),
            (at_b, d(7, 1000)),
            (at_b, d(8, 1000)),
            (at_b, d(9, 1000)),
            (at_b, d(10, 1200)),
            (at_a, d(11, 1316)),
            (at_a, d(12, 1316)),
        ];
        for mut batch in [SendBatch::default(), SendBatch::without_gso()] {
            let mut sent = 0;
            while sent < items.len() {
                sent += batch.send(&tx, &items[sent..]).unwrap();
            }
            let want = |to| -> Vec<Vec<u8>> {
                items
                    .iter()
                    .filter(|(a, _)| *a == to)
                    .map(|(_, b)| b.to_vec())
                    .collect()
            };
            assert_eq!(drain(&a), want(at_a), "gso {}", batch.gso());
            assert_eq!(drain(&b), want(at_b), "gso {}", batch.gso());
        }
        // This kernel segments (loopback): GSO stays on.
        let mut batch = SendBatch::default();
        batch.send(&tx, &items).unwrap();
        assert!(batch.gso());
        drain(&a);
        drain(&b);
    }

    #[test]
    fn a_run_received_with_gro_is_cut_back_into_its_datagrams() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut r = RecvBatch::with_gro(1500, &rx);
        assert!(r.gro(), "this kernel takes UDP_GRO (Linux ≥ 5.0)");
        let (tx, tx2) = (
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        let to = rx.local_addr().unwrap();
        let d = |tag: u8, len: usize| Bytes::from(vec![tag; len]);
        // A run of five 1 316-byte datagrams and a shorter one: one GSO message.
        let run: Vec<(SocketAddr, Bytes)> = (1..=5)
            .map(|i| (to, d(i, 1316)))
            .chain([(to, d(6, 700))])
            .collect();
        let mut batch = SendBatch::default();
        assert_eq!(batch.send(&tx, &run).unwrap(), 6);
        // Then two from another peer, and an oversize one.
        tx2.send_to(&[7u8; 40], to).unwrap();
        tx2.send_to(&[8u8; 50], to).unwrap();
        tx.send_to(&[9u8; 3000], to).unwrap();
        let mut got = Vec::new();
        let mut calls = 0;
        while got.len() < 9 {
            match r.recv(&rx) {
                Ok(_) => {
                    calls += 1;
                    while let Some((from, b)) = r.pop() {
                        got.push((from, b.to_vec()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        let (a, b) = (tx.local_addr().unwrap(), tx2.local_addr().unwrap());
        let mut want: Vec<(SocketAddr, Vec<u8>)> =
            run.iter().map(|(_, x)| (a, x.to_vec())).collect();
        want.push((b, vec![7; 40]));
        want.push((b, vec![8; 50]));
        // The oversize one is reported one slot long, as without GRO.
        want.push((a, vec![9; 1500]));
        assert_eq!(got, want);
        assert_eq!(calls, 4, "the run came in one receive");
        assert!(matches!(r.recv(&rx), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order_with_addresses() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx6 = std::net::UdpSocket::bind("[::1]:0").ok();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let items: Vec<(SocketAddr, Bytes)> = (0..100u8)
            .map(|i| (to, Bytes::from(vec![i; 10 + i as usize])))
            .collect();
        let mut batch = SendBatch::default();
        let mut sent = 0;
        while sent < items.len() {
            sent += batch.send(&tx, &items[sent..]).unwrap();
        }
        // An oversize datagram is reported one byte longer than the buffer.
        tx.send_to(&[7u8; 300], to).unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut r = RecvBatch::new(150);
        let mut got = Vec::new();
        while got.len() < 101 {
            match r.recv(&rx) {
                Ok(_) => {
                    while let Some((from, b)) = r.pop() {
                        assert_eq!(from, tx.local_addr().unwrap());
                        got.push(b.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        for (i, b) in got[..100].iter().enumerate() {
            assert_eq!(b, &vec![i as u8; 10 + i]);
        }
        assert_eq!(got[100].len(), 150);
        assert!(matches!(r.recv(&rx), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
        // IPv6 destinations too, where the machine has ::1.
        if let Some(rx6) = rx6 {
            let tx6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
            let items = vec![(rx6.local_addr().unwrap(), Bytes::from_static(b"six"))];
            assert_eq!(batch.send(&tx6, &items).unwrap(), 1);
            let mut buf = [0u8; 8];
            let (n, from) = rx6.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"six"[..], tx6.local_addr().unwrap()));
        }
    }
}
