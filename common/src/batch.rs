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
//! Both are synchronous and non-blocking: the caller runs them inside the tokio socket's
//! `try_io`, so a full send buffer or an empty receive queue is `WouldBlock` and the readiness
//! is cleared for the next `writable()`/`readable()`.

use bytes::{Bytes, BytesMut};
use std::io;
use std::net::SocketAddr;

/// Datagrams per system call at most.
pub const BATCH: usize = 64;

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
pub struct RecvBatch {
    /// Bytes of one slot (the largest datagram taken whole, plus one to tell an oversize one).
    slot: usize,
    /// The slots not used yet (initialised memory: zeroed when allocated).
    chunk: BytesMut,
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
            got: std::collections::VecDeque::with_capacity(BATCH),
            #[cfg(target_os = "linux")]
            names: Vec::new(),
            #[cfg(target_os = "linux")]
            iovs: Vec::new(),
            #[cfg(target_os = "linux")]
            msgs: Vec::new(),
        }
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
}

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
