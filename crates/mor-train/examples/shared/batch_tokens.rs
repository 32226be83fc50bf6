//! The token ids of the parity examples' batches (`model_parity`, `bf16_error`): one generator, so
//! the study reproduces exactly the batch the GPU parity run uses.

/// `n` ids below `vocab` from an xorshift64 stream seeded by `seed`.
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}
