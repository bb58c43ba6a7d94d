//! A bounded mutation fuzzer over sniffing, header probing and decoding (`thumbnail`), on stable
//! Rust: it mutates the hostile samples and small valid images (bit flips, interesting bytes,
//! overwritten header fields, truncation, spliced and repeated ranges) and asserts that every
//! input gives a thumbnail or an error, without a panic and quickly.
//!
//! `MEDIAFLOW_FUZZ_SECS` (default 20) bounds the run. `MEDIAFLOW_FUZZ_SEED` picks the sequence:
//! the default one makes CI runs repeatable, `./x fuzz` explores with a new seed each time. A
//! failing input is written to the system temp folder and named in the failure.

use std::time::Duration;

use image::ImageFormat;
use mediaflow_imaging::samples::mutate::fuzz;
use mediaflow_imaging::samples::{encode, hostile, photo};
use mediaflow_imaging::{DecodeLimits, thumbnail};

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

#[test]
fn mutated_images_never_panic_and_never_hang() {
    // Small limits keep every decode small, as the stage's limits keep it bounded.
    let limits = DecodeLimits {
        max_side: 4_000,
        max_pixels: 4_000_000,
        max_alloc: 64 << 20,
        max_frames: 100,
    };
    let r = fuzz(
        "fuzz",
        &seeds(),
        0x6d65_6469_6166_6c6f,
        Duration::from_secs(3),
        |input| Ok(thumbnail(input, 64, &limits).is_ok()),
    );
    println!(
        "fuzz: {} inputs in {} s (seed {}): {} thumbnails, {} errors, 0 panics",
        r.runs,
        r.secs,
        r.seed,
        r.accepted,
        r.runs - r.accepted
    );
    assert!(r.runs > 100, "too few inputs ran: {}", r.runs);
}
