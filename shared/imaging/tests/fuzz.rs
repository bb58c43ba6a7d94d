//! A bounded mutation fuzzer over sniffing, header probing and decoding (`thumbnail`), on stable
//! Rust: it mutates the hostile samples and small valid images (bit flips, interesting bytes,
//! overwritten header fields, truncation, spliced and repeated ranges) and asserts that every
//! input gives a thumbnail or an error, without a panic and quickly.
//!
//! `MEDIAFLOW_FUZZ_SECS` (default 20) bounds the run. `MEDIAFLOW_FUZZ_SEED` picks the sequence:
//! the default one makes CI runs repeatable, `./x fuzz` explores with a new seed each time. A
//! failing input is written to the system temp folder and named in the failure.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use image::ImageFormat;
use mediaflow_imaging::samples::{encode, hostile, photo};
use mediaflow_imaging::{DecodeLimits, thumbnail};

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = hostile().into_iter().map(|s| s.bytes).collect();
    let small = photo(40, 24);
    for format in [
        ImageFormat::Jpeg,
        ImageFormat::Png,
        ImageFormat::Gif,
        ImageFormat::WebP,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
    ] {
        seeds.push(encode(&small, format));
    }
    seeds.retain(|s| !s.is_empty());
    seeds
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            break;
        }
        let at = rng.below(b.len());
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE][rng.below(6)],
            // A header field (a size, a length) set to an extreme.
            2 => {
                let v = [0u16, 1, 0x7FFF, 0xFFFF, 0x8000][rng.below(5)].to_be_bytes();
                let end = (at + 2).min(b.len());
                b[at..end].copy_from_slice(&v[..end - at]);
            }
            3 => b.truncate(at),
            4 => {
                // Repeat a range (chunks, segments) in place.
                let len = rng.below(64).min(b.len() - at);
                let copy = b[at..at + len].to_vec();
                b.splice(at..at, copy);
            }
            5 => {
                // Splice in bytes from another seed.
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                let len = rng.below(128).min(other.len() - from);
                b.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => {
                let len = rng.below(32).min(b.len() - at);
                b.drain(at..at + len);
            }
        }
    }
    b
}

#[test]
fn mutated_images_never_panic_and_never_hang() {
    let secs: u64 = std::env::var("MEDIAFLOW_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("MEDIAFLOW_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_6469_6166_6c6f);
    // Small limits keep every decode small, as the stage's limits keep it bounded.
    let limits = DecodeLimits {
        max_side: 4_000,
        max_pixels: 4_000_000,
        max_alloc: 64 << 20,
        max_frames: 100,
    };
    let seeds = seeds();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut runs, mut thumbs) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(secs) {
        let input = mutate(&mut rng, &seeds);
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| thumbnail(&input, 64, &limits)));
        let took = start.elapsed();
        let failure = match &outcome {
            Err(_) => Some("panicked".to_owned()),
            Ok(_) if took > Duration::from_secs(3) => Some(format!("took {took:?}")),
            Ok(_) => None,
        };
        if let Some(what) = failure {
            let path = std::env::temp_dir().join(format!("mediaflow-fuzz-{seed}-{runs}.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "input {runs} of seed {seed} {what}; saved as {}",
                path.display()
            );
        }
        thumbs += u64::from(matches!(outcome, Ok(Ok(_))));
        runs += 1;
    }
    println!(
        "fuzz: {runs} inputs in {secs} s (seed {seed}): {thumbs} thumbnails, {} errors, 0 panics",
        runs - thumbs
    );
    assert!(runs > 100, "too few inputs ran: {runs}");
}
