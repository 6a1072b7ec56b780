//! Batched UDP I/O under [`Port`](crate::port::Port): many datagrams, each to (or from) its
//! own address, in one system call — `sendmmsg(2)` and `recvmmsg(2)` on Linux (a loop of
//! `sendto`/`recvfrom` elsewhere). A relay's fan-out of one video datagram to its subscribers
//! is one call instead of one per subscriber, and a burst of arrivals (a GOP burst, or a flood
//! of junk) is read [`BATCH`] at a time.
//!
//! Both are synchronous and non-blocking: the caller runs them inside the tokio socket's
//! `try_io`, so a full send buffer or an empty receive queue is `WouldBlock` and the readiness
//! is cleared for the next `writable()`/`readable()`.

use bytes::Bytes;
use std::io;
use std::net::SocketAddr;

/// Datagrams per system call at most.
pub const BATCH: usize = 64;

/// Reusable buffers of a batched send.
#[derive(Default)]
pub struct SendBatch {
    #[cfg(target_os = "linux")]
    names: Vec<libc::sockaddr_storage>,
    #[cfg(target_os = "linux")]
    iovs: Vec<libc::iovec>,
    #[cfg(target_os = "linux")]
    msgs: Vec<libc::mmsghdr>,
}

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
    /// Sends the first datagrams of `items` (at most [`BATCH`]) in one system call. Returns
    /// how many the kernel took, from the front; an error means the first one failed
    /// (`WouldBlock`: the send buffer is full; anything else concerns that datagram only).
    #[cfg(target_os = "linux")]
    pub fn send(
        &mut self,
        socket: &impl std::os::fd::AsRawFd,
        items: &[(SocketAddr, Bytes)],
    ) -> io::Result<usize> {
        let n = items.len().min(BATCH);
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: all-zero is a valid value of these plain C structures.
        let zero = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        self.names.clear();
        self.names.resize(n, zero);
        self.iovs.clear();
        self.msgs.clear();
        for (i, (to, bytes)) in items[..n].iter().enumerate() {
            let len = sockaddr(*to, &mut self.names[i]);
            self.iovs.push(libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            });
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_namelen = len;
            self.msgs.push(m);
        }
        // The vectors are complete: take the pointers now (they do not move any more).
        for i in 0..n {
            let m = &mut self.msgs[i].msg_hdr;
            m.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_iov = &mut self.iovs[i];
            m.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds `n` headers pointing at live names, iovecs and the callers'
        // buffers (borrowed for this call).
        let r = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

/// Reusable buffers of a batched receive, and the datagrams of the last one.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    /// (from, length) of each datagram received, in order.
    got: Vec<(SocketAddr, usize)>,
    /// The next one to hand out.
    next: usize,
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
            .field("pending", &(self.got.len() - self.next))
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// Room for [`BATCH`] datagrams of up to `max_len` bytes each.
    pub fn new(max_len: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; max_len].into_boxed_slice())
                .collect(),
            got: Vec::with_capacity(BATCH),
            next: 0,
            #[cfg(target_os = "linux")]
            names: Vec::new(),
            #[cfg(target_os = "linux")]
            iovs: Vec::new(),
            #[cfg(target_os = "linux")]
            msgs: Vec::new(),
        }
    }

    /// The next datagram of the last receive not handed out yet.
    pub fn pop(&mut self) -> Option<(SocketAddr, &[u8])> {
        let &(from, len) = self.got.get(self.next)?;
        let i = self.next;
        self.next += 1;
        Some((from, &self.bufs[i][..len]))
    }

    /// Whether every datagram received was handed out.
    pub fn is_empty(&self) -> bool {
        self.next >= self.got.len()
    }

    /// Receives up to [`BATCH`] waiting datagrams in one system call (call when
    /// [`is_empty`](Self::is_empty)). Returns how many; `WouldBlock` when none waits.
    #[cfg(target_os = "linux")]
    pub fn recv(&mut self, socket: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
        self.got.clear();
        self.next = 0;
        let n = self.bufs.len();
        // SAFETY: all-zero is a valid value of these plain C structures.
        let zero = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
        self.names.clear();
        self.names.resize(n, zero);
        self.iovs.clear();
        for b in &mut self.bufs {
            self.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
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
        // SAFETY: `msgs` holds `n` headers pointing at live names and buffers of ours.
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
            // A datagram longer than the buffer is cut (MSG_TRUNC): report it one byte
            // longer than any valid datagram, as a plain recv into the buffer would.
            let len = (m.msg_len as usize).min(self.bufs[i].len());
            if let Some(from) = from_sockaddr(&self.names[i]) {
                self.got.push((from, len));
            }
        }
        // Entries without an address (never for UDP) are skipped, keeping buffers aligned.
        if self.got.len() != r as usize {
            self.got.clear();
        }
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
