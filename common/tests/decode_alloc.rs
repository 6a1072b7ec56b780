//! Decoding allocates only for what a datagram really contains, never from a claimed length:
//! checked with a counting global allocator (this test binary only) on hostile and random inputs.

use common::rng::Rng;
use common::wire::{decode_as, BootstrapResponse, Datagram, MAGIC, PROTOCOL_VERSION};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;
static TRACK: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LOCK: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACK.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Largest single allocation made while decoding `bytes` (as datagram and as bootstrap frame).
fn largest_alloc_decoding(bytes: &[u8]) -> usize {
    let _g = LOCK.lock().unwrap();
    LARGEST.store(0, Ordering::SeqCst);
    TRACK.store(true, Ordering::SeqCst);
    let _ = std::hint::black_box(Datagram::decode(bytes));
    let _ = std::hint::black_box(decode_as::<BootstrapResponse>(bytes));
    TRACK.store(false, Ordering::SeqCst);
    LARGEST.load(Ordering::SeqCst)
}

fn header() -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&[PROTOCOL_VERSION, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    v
}

#[test]
fn hostile_length_prefixes_allocate_at_most_the_datagram_size() {
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for tag in 0u8..6 {
        for prefix in [
            vec![0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            vec![0xFC, 0xFF, 0xFF, 0xFF, 0x7F],
            vec![0xFB, 0xFF, 0xFF],
            vec![200],
        ] {
            // Try the hostile length at every position of a few plausible bodies.
            for lead in 0..6 {
                let mut b = header();
                b.push(tag);
                b.extend(std::iter::repeat_n(1u8, lead));
                b.extend_from_slice(&prefix);
                b.extend(std::iter::repeat_n(0u8, 16));
                cases.push(b);
            }
        }
    }
    let mut rng = Rng::seeded(42);
    for _ in 0..5000 {
        let mut b = header();
        let n = rng.below(300) as usize;
        b.extend((0..n).map(|_| rng.next_u64() as u8));
        cases.push(b);
    }
    for b in &cases {
        let largest = largest_alloc_decoding(b);
        // A decoded u64 takes 8 bytes of memory for as little as 1 byte of varint, so what is
        // bounded is memory per input byte (×2 for Vec doubling); error messages get a fixed slack.
        assert!(
            largest <= (16 * b.len()).max(256),
            "decoding {} bytes allocated {largest} bytes at once: {:02x?}",
            b.len(),
            &b[..b.len().min(40)]
        );
    }
}
