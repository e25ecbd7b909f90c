//! Proves that a hostile length prefix costs no memory: a counting global
//! allocator records the largest single allocation made while the codec
//! refuses a frame that claims 4 GiB. This binary holds only this test so
//! no other test's allocations blur the measurement.

// A `GlobalAlloc` can only be written with `unsafe`; the workspace denies it,
// and this test-only allocator is the one place that needs it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, BytesMut};
use surveil_proto::{Codec, CodecError, DEFAULT_MAX_FRAME};
use tokio_util::codec::Decoder;

struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// only addition is an atomic update that neither allocates nor panics.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Anything bigger than this during a refused decode would be the codec
/// reserving room for the claimed frame.
const SMALL: usize = 64 * 1024;

#[test]
fn refusing_an_oversized_prefix_allocates_nothing_near_its_claim() {
    for (prefix, max) in [
        (u32::MAX, DEFAULT_MAX_FRAME),
        (DEFAULT_MAX_FRAME as u32 + 1, DEFAULT_MAX_FRAME),
        (u32::MAX, 1024),
    ] {
        let mut codec = Codec::with_max_frame(max);
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u32(prefix);
        buf.extend_from_slice(b"partial body");

        LARGEST.store(0, Ordering::Relaxed);
        let result = codec.decode(&mut buf);
        let largest = LARGEST.load(Ordering::Relaxed);

        assert!(
            matches!(result, Err(CodecError::FrameTooLarge { len, max: m }) if len == u64::from(prefix) && m == max),
            "prefix {prefix}: {result:?}"
        );
        assert!(
            largest < SMALL,
            "prefix {prefix}: decode allocated {largest} bytes at once"
        );
    }

    // The allocator does see the codec's allocations: a frame at the limit
    // that is still arriving gets its room reserved (it is allowed).
    let mut codec = Codec::with_max_frame(1 << 20);
    let mut buf = BytesMut::new();
    buf.put_u32(1 << 20);
    LARGEST.store(0, Ordering::Relaxed);
    assert!(matches!(codec.decode(&mut buf), Ok(None)));
    assert!(LARGEST.load(Ordering::Relaxed) >= 1 << 20);
}
