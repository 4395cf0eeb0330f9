//! The allocator's policy for a training process: freed memory is kept for the next step.
//!
//! A step frees and allocates the same large buffers again and again (every CPU op's output is a
//! fresh tensor). glibc hands blocks over its mmap threshold back to the kernel when they are
//! freed, and trims the heap's top, so each step page-faults its activations in anew: 276,069
//! page faults in a 12-step `dcl bench train --model resnet-mini --batch-size 64`, 30,575 with
//! freed memory kept, and 17% more images/s (results/bench). The memory a run holds is then its
//! peak, which it reaches on every step anyway.

/// Keeps blocks up to glibc's largest mmap threshold (32 MiB, a batch-64 `resnet-mini`
/// activation is 17 MB) on the heap, and the heap untrimmed. A no-op off glibc (the page's wasm
/// allocator never returns memory).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
