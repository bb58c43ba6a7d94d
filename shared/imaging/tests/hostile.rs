//! Hostile and odd inputs (`mediaflow_imaging::samples`): each gives a clear error or a correct
//! thumbnail, quickly.

use std::time::{Duration, Instant};

use mediaflow_imaging::samples::{Expect, hostile, jpeg_declaring, near};
use mediaflow_imaging::{DecodeLimits, ImagingError, thumbnail};

#[test]
fn every_hostile_sample_gives_its_expected_outcome() {
    for sample in hostile() {
        let start = Instant::now();
        let got = thumbnail(&sample.bytes, 256, &DecodeLimits::default());
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{}: took {took:?}",
            sample.name
        );
        match (&sample.expect, got) {
            (Expect::Refused(why), Err(e)) => {
                assert!(e.to_string().contains(why), "{}: {e}", sample.name);
            }
            (
                Expect::Thumbnail {
                    width,
                    height,
                    colour,
                },
                Ok(t),
            ) => {
                assert_eq!((t.width, t.height), (*width, *height), "{}", sample.name);
                let back = image::load_from_memory(&t.bytes).unwrap().to_rgb8();
                assert_eq!(back.dimensions(), (*width, *height), "{}", sample.name);
                if let Some((x, y, want)) = colour {
                    let got = back.get_pixel(*x, *y).0;
                    assert!(
                        near(got, *want, 60),
                        "{}: {got:?} is not {want:?}",
                        sample.name
                    );
                }
            }
            (expect, got) => panic!("{}: expected {expect:?}, got {got:?}", sample.name),
        }
    }
}

#[test]
fn a_jpeg_declaring_64250_squared_pixels_is_refused_in_microseconds() {
    let bomb = jpeg_declaring(64_250, 64_250);
    assert!(bomb.len() < 5_000);
    let start = Instant::now();
    let err = thumbnail(&bomb, 256, &DecodeLimits::default()).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            ImagingError::TooLarge {
                width: 64_250,
                height: 64_250,
                ..
            }
        ),
        "{err}"
    );
    println!(
        "a 64250x64250 JPEG of {} bytes refused in {took:?}",
        bomb.len()
    );
    // Only the headers are read: well under a millisecond; the bound leaves room for a loaded
    // machine.
    assert!(took < Duration::from_millis(50), "took {took:?}");
}
