//! What an image is, from its headers alone: format, declared size, orientation and frame count.
//! Nothing is decoded, so a bomb is refused in microseconds, before any allocation its header
//! asks for.

use std::io::Cursor;

use image::{ImageDecoder, ImageFormat, ImageReader};

use crate::{DecodeLimits, ImagingError, check_dimensions};

/// An image's headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// `jpeg`, `png`, `gif`, `webp`, `tiff` or `bmp`.
    pub format: &'static str,
    /// Size as stored (before orientation).
    pub width: u32,
    pub height: u32,
    /// EXIF orientation (1 to 8), when the image has one.
    pub orientation: Option<u8>,
    /// Frames of an animation (GIF, WebP, APNG); 1 for a still image.
    pub frames: u32,
}

fn format_key(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::Gif => "gif",
        ImageFormat::WebP => "webp",
        ImageFormat::Tiff => "tiff",
        ImageFormat::Bmp => "bmp",
        _ => "other",
    }
}

/// Reads the headers of `bytes`.
pub fn probe(bytes: &[u8]) -> Result<Probe, ImagingError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| ImagingError::UnknownFormat)?;
    let format = reader.format().ok_or(ImagingError::UnknownFormat)?;
    let mut decoder = reader.into_decoder().map_err(|e| ImagingError::Corrupt {
        format: crate::format_name(format),
        message: e.to_string(),
    })?;
    let (width, height) = decoder.dimensions();
    let orientation = decoder.orientation().ok().map(|o| o.to_exif());
    let frames = match format {
        ImageFormat::Gif => gif_frames(bytes),
        ImageFormat::WebP => webp_frames(bytes),
        ImageFormat::Png => apng_frames(bytes),
        _ => 1,
    };
    Ok(Probe {
        format: format_key(format),
        width,
        height,
        orientation: orientation.filter(|&o| o != 1),
        frames,
    })
}

/// Refuses what `probe` says is over `limits`: size, pixels, frames.
pub fn check(probe: &Probe, limits: &DecodeLimits) -> Result<(), ImagingError> {
    check_dimensions(probe.width, probe.height, limits)?;
    if probe.frames > limits.max_frames {
        return Err(ImagingError::TooManyFrames {
            frames: probe.frames,
            limit: limits.max_frames,
        });
    }
    Ok(())
}

/// Image descriptors in a GIF: walks the blocks without decoding any.
fn gif_frames(b: &[u8]) -> u32 {
    let Some(&flags) = b.get(10) else { return 0 };
    let mut i = 13;
    if flags & 0x80 != 0 {
        i += 3 << ((flags & 7) + 1);
    }
    let skip_sub_blocks = |mut i: usize| {
        while let Some(&len) = b.get(i) {
            i += 1 + usize::from(len);
            if len == 0 {
                return Some(i);
            }
        }
        None
    };
    let mut frames = 0;
    while let Some(&block) = b.get(i) {
        match block {
            0x2C => {
                frames += 1;
                let Some(&local) = b.get(i + 9) else { break };
                i += 10;
                if local & 0x80 != 0 {
                    i += 3 << ((local & 7) + 1);
                }
                // LZW minimum code size, then the data sub-blocks.
                match skip_sub_blocks(i + 1) {
                    Some(next) => i = next,
                    None => break,
                }
            }
            0x21 => match skip_sub_blocks(i + 2) {
                Some(next) => i = next,
                None => break,
            },
            _ => break, // trailer (0x3B) or garbage
        }
    }
    frames
}

/// `ANMF` chunks of a WebP (1 for a still image).
fn webp_frames(b: &[u8]) -> u32 {
    let mut i = 12;
    let mut frames = 0;
    while let Some(header) = b.get(i..i + 8) {
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if &header[..4] == b"ANMF" {
            frames += 1;
        }
        i += 8 + size + size % 2;
    }
    frames.max(1)
}

/// The frame count of an APNG's `acTL` chunk (1 for a still PNG).
fn apng_frames(b: &[u8]) -> u32 {
    let mut i = 8;
    while let Some(header) = b.get(i..i + 8) {
        let size = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        match &header[4..] {
            b"acTL" => {
                return b
                    .get(i + 8..i + 12)
                    .map_or(1, |n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]));
            }
            b"IDAT" | b"IEND" => return 1,
            _ => i += 12 + size,
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{animated_gif, animated_webp, encode, jpeg_declaring, photo};

    #[test]
    fn headers_tell_format_size_and_frames() {
        let p = probe(&encode(&photo(30, 20), ImageFormat::Png)).unwrap();
        assert_eq!((p.format, p.width, p.height, p.frames), ("png", 30, 20, 1));
        let gif = animated_gif(40, 10, &[[1, 2, 3], [4, 5, 6], [7, 8, 9]]);
        assert_eq!(probe(&gif).unwrap().frames, 3);
        let webp = animated_webp(40, 10, &[[1, 2, 3], [4, 5, 6]]);
        let p = probe(&webp).unwrap();
        assert_eq!((p.format, p.width, p.height, p.frames), ("webp", 40, 10, 2));
        let p = probe(&jpeg_declaring(64_250, 64_250)).unwrap();
        assert_eq!((p.format, p.width, p.height), ("jpeg", 64_250, 64_250));
        assert!(matches!(
            check(&p, &DecodeLimits::default()),
            Err(ImagingError::TooLarge { .. })
        ));
    }

    #[test]
    fn animations_over_the_frame_limit_are_refused() {
        let gif = animated_gif(8, 8, &[[0, 0, 0]; 5]);
        let limits = DecodeLimits {
            max_frames: 4,
            ..DecodeLimits::default()
        };
        let err = check(&probe(&gif).unwrap(), &limits).unwrap_err();
        assert!(err.to_string().contains("5 frames"), "{err}");
    }
}
