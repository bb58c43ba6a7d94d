//! Consistent hashing for the sharder (book ch. 6): rendezvous (highest random weight) hashing
//! of a key over the shards. Every key ranks every shard by a fixed hash of (key, shard) and goes
//! to the healthy shard it ranks highest. So a key always lands on one shard; when a shard is
//! unhealthy (or removed) only its own keys move, each to its next-ranked healthy shard, spread
//! over all the others; and they move back when it recovers. The hash is xxh3 with a fixed seed,
//! never std's `DefaultHasher`, whose algorithm may change between Rust releases.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The seed of every weight: changing it would move every key.
const SEED: u64 = 0x6d65_6469_6166_6c6f; // "mediaflo"

/// `shards` shards, numbered from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    shards: u32,
}

impl Ring {
    /// A ring of `shards` shards (at least one).
    pub fn new(shards: u32) -> Self {
        Self {
            shards: shards.max(1),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The weight `key` gives `shard`.
    fn weight(key: &[u8], shard: u32) -> u64 {
        // The shard number mixed into the seed: one pass over the key per shard.
        xxh3_64_with_seed(
            key,
            SEED ^ u64::from(shard).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )
    }

    /// The shard of `key` when every shard is healthy.
    pub fn shard(&self, key: &[u8]) -> u32 {
        // A ring has at least one shard, so there always is a highest.
        self.shard_among(key, |_| true).unwrap_or(0)
    }

    /// The shard of `key` among those `healthy` says yes to; None when none is.
    pub fn shard_among(&self, key: &[u8], healthy: impl Fn(u32) -> bool) -> Option<u32> {
        (0..self.shards)
            .filter(|&s| healthy(s))
            .max_by_key(|&s| (Self::weight(key, s), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> impl Iterator<Item = String> {
        (0..10_000).map(|i| format!("user-{i}"))
    }

    #[test]
    fn a_key_always_lands_on_one_shard_and_the_spread_is_even() {
        let ring = Ring::new(4);
        let mut counts = [0usize; 4];
        for key in keys() {
            let shard = ring.shard(key.as_bytes());
            assert_eq!(ring.shard(key.as_bytes()), shard, "stable for {key}");
            counts[shard as usize] += 1;
        }
        // Within 10% of an even 2,500 each.
        for (shard, n) in counts.iter().enumerate() {
            assert!(
                (2_250..=2_750).contains(n),
                "shard {shard}: {n} of 10,000 ({counts:?})"
            );
        }
    }

    #[test]
    fn an_unhealthy_shard_s_keys_move_to_the_others_and_back() {
        let ring = Ring::new(4);
        let down = 2;
        let mut moved_to = [0usize; 4];
        for key in keys() {
            let home = ring.shard(key.as_bytes());
            let now = ring.shard_among(key.as_bytes(), |s| s != down).unwrap();
            if home == down {
                assert_ne!(now, down);
                moved_to[now as usize] += 1;
            } else {
                assert_eq!(now, home, "{key} moved although its shard is healthy");
            }
            // Recovery: back home.
            assert_eq!(ring.shard_among(key.as_bytes(), |_| true), Some(home));
        }
        // Its keys spread over every other shard, not onto one neighbour.
        for s in [0, 1, 3] {
            assert!(moved_to[s] > 600, "{moved_to:?}");
        }
        // Down to one healthy shard, every key still has a home.
        for key in keys().take(100) {
            assert_eq!(ring.shard_among(key.as_bytes(), |s| s == 3), Some(3));
        }
        assert_eq!(ring.shard_among(b"k", |_| false), None);
    }

    #[test]
    fn removing_a_shard_moves_about_one_in_n_keys() {
        let (five, four) = (Ring::new(5), Ring::new(4));
        let moved = keys()
            .filter(|k| five.shard(k.as_bytes()) != four.shard(k.as_bytes()))
            .count();
        let fraction = moved as f64 / 10_000.0;
        eprintln!("removing one of 5 shards moved {moved} of 10,000 keys ({fraction:.3})");
        assert!((0.17..=0.23).contains(&fraction), "{fraction}");
        // And only keys of the removed shard moved.
        for k in keys() {
            let before = five.shard(k.as_bytes());
            if before != 4 {
                assert_eq!(four.shard(k.as_bytes()), before);
            }
        }
    }
}
