//! Mutations for bounded fuzzing on stable Rust: bit flips, interesting bytes, header fields set
//! to extremes, truncation, repeated and spliced ranges. Used by the image and video fuzz tests.

/// xorshift64*: small, fast, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One input: a seed, mutated one to four times.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
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

/// What a fuzz run did.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub seed: u64,
    pub secs: u64,
    pub runs: u64,
    /// Inputs `check` accepted (made something of).
    pub accepted: u64,
}

/// Runs `check` on mutations of `seeds` for `MEDIAFLOW_FUZZ_SECS` seconds (default 20), in the
/// sequence of `MEDIAFLOW_FUZZ_SEED` (default `default_seed`, so CI runs repeat). `check` returns
/// `Ok(true)` for an input it made something of, `Ok(false)` for one it refused, and `Err` for a
/// failure. A failure, a panic, or an input taking longer than `max_time` stops the run: the
/// input is saved in the system temp folder as `mediaflow-<name>-<seed>-<n>.bin` and named in the
/// panic.
pub fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    default_seed: u64,
    max_time: std::time::Duration,
    mut check: impl FnMut(&[u8]) -> Result<bool, String>,
) -> Report {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::time::{Duration, Instant};
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let secs = env("MEDIAFLOW_FUZZ_SECS").unwrap_or(20);
    let seed = env("MEDIAFLOW_FUZZ_SEED").unwrap_or(default_seed);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut report = Report {
        seed,
        secs,
        runs: 0,
        accepted: 0,
    };
    while started.elapsed() < Duration::from_secs(secs) {
        let input = mutate(&mut rng, seeds);
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = start.elapsed();
        let failure = match &outcome {
            Err(_) => Some("panicked".to_owned()),
            Ok(Err(e)) => Some(format!("failed: {e}")),
            Ok(_) if took > max_time => Some(format!("took {took:?}")),
            Ok(_) => None,
        };
        if let Some(what) = failure {
            let path =
                std::env::temp_dir().join(format!("mediaflow-{name}-{seed}-{}.bin", report.runs));
            std::fs::write(&path, &input).expect("saving the failing input");
            panic!(
                "input {} of seed {seed} {what}; saved as {}",
                report.runs,
                path.display()
            );
        }
        report.accepted += u64::from(matches!(outcome, Ok(Ok(true))));
        report.runs += 1;
    }
    report
}
