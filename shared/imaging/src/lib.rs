//! Pure image kernels over bytes: bounded decoding (dimensions are checked before any pixel is
//! decoded), EXIF orientation, and thumbnails. No I/O, no async: services call these on the
//! process's CPU threads (`mediaflow_runtime::on_cpu`), benches and fuzzers call them directly.
//!
//! JPEGs take the fast path (`jpeg`): shrink-on-load in the DCT domain, SIMD resampling and
//! libjpeg-turbo encoding. Other formats, and CMYK JPEGs, go through the `image` crate.

pub mod jpeg;
pub mod probe;
pub mod renditions;
#[cfg(feature = "samples")]
pub mod samples;
pub mod tags;

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

/// Bounds on what the decoder accepts: protection against decompression bombs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted width x height.
    pub max_pixels: u64,
    /// Largest allocation the decoder may make, in bytes.
    pub max_alloc: u64,
    /// Most frames an animation (GIF, WebP, APNG) may declare.
    pub max_frames: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_side: 20_000,
            max_pixels: 100_000_000,
            max_alloc: 1 << 30,
            max_frames: 1_000,
        }
    }
}

/// Why an image could not be turned into a thumbnail. Every variant is the input's fault.
#[derive(Debug, thiserror::Error)]
pub enum ImagingError {
    #[error("not an image in a supported format (JPEG, PNG, GIF, WebP, TIFF, BMP)")]
    UnknownFormat,
    #[error("image is {width}x{height} pixels, over the limit ({limit})")]
    TooLarge {
        width: u32,
        height: u32,
        limit: String,
    },
    #[error("image has zero width or height")]
    Empty,
    #[error("animation has {frames} frames, over the limit ({limit})")]
    TooManyFrames { frames: u32, limit: u32 },
    #[error("corrupt or truncated {format} image: {message}")]
    Corrupt {
        format: &'static str,
        message: String,
    },
    #[error("could not encode the thumbnail: {0}")]
    Encode(String),
}

/// A thumbnail made as the image stage makes its default one (see [`thumbnail`]).
#[derive(Clone, Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub format: renditions::Format,
    pub width: u32,
    pub height: u32,
    /// Size of the source after orientation.
    pub source_width: u32,
    pub source_height: u32,
    /// The image's tags, made from the same decode.
    pub tags: tags::Tags,
}

pub(crate) fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::Gif => "GIF",
        ImageFormat::WebP => "WebP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Bmp => "BMP",
        _ => "image",
    }
}

/// Refuses empty images and images whose declared size exceeds `limits`.
pub(crate) fn check_dimensions(
    width: u32,
    height: u32,
    limits: &DecodeLimits,
) -> Result<(), ImagingError> {
    if width == 0 || height == 0 {
        return Err(ImagingError::Empty);
    }
    if width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(ImagingError::TooLarge {
            width,
            height,
            limit: format!(
                "{} px per side, {} pixels",
                limits.max_side, limits.max_pixels
            ),
        });
    }
    Ok(())
}

/// The size of a `width` x `height` image scaled to fit in a `max_side` square, keeping its
/// aspect ratio (at least 1 px a side); never larger than the image.
pub fn fit_within(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    if width <= max_side && height <= max_side {
        return (width, height);
    }
    let scale = f64::from(max_side) / f64::from(width.max(height));
    let side = |s: u32| ((f64::from(s) * scale).round() as u32).clamp(1, max_side);
    (side(width), side(height))
}

/// The marker segments of a JPEG, from after SOI up to and including its first start-of-scan:
/// `(marker, data, end)`, `end` being the offset just past the segment. Fill bytes and
/// standalone markers are skipped; the walk ends at EOI or at anything that is not a marker.
fn jpeg_segments(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8], usize)> {
    let mut i = 2; // after SOI
    let mut done = false;
    std::iter::from_fn(move || {
        while !done && i + 4 <= bytes.len() && bytes[i] == 0xFF {
            let marker = bytes[i + 1];
            match marker {
                // Fill bytes before a marker.
                0xFF => i += 1,
                // Standalone markers without a length.
                0x01 | 0xD0..=0xD7 => i += 2,
                0xD9 => break,
                _ => {
                    let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                    let end = i + 2 + len;
                    let data = bytes.get(i + 4..end)?;
                    i = end;
                    done = marker == 0xDA;
                    return Some((marker, data, end));
                }
            }
        }
        None
    })
}

/// The TIFF data of a JPEG's EXIF segment (APP1 `Exif\0\0`), if it has one.
pub fn jpeg_exif(bytes: &[u8]) -> Option<&[u8]> {
    jpeg_segments(bytes)
        .take_while(|(marker, _, _)| *marker != 0xDA)
        .find_map(|(marker, data, _)| {
            (marker == 0xE1)
                .then(|| data.strip_prefix(b"Exif\0\0"))
                .flatten()
        })
}

/// Decodes `bytes`, refusing inputs whose declared dimensions exceed `limits` before decoding any
/// pixel, and applies the EXIF orientation.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, ImagingError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| ImagingError::UnknownFormat)?;
    let format = reader.format().ok_or(ImagingError::UnknownFormat)?;
    let name = format_name(format);
    let corrupt = |e: image::ImageError| ImagingError::Corrupt {
        format: name,
        message: e.to_string(),
    };

    if format == ImageFormat::Jpeg {
        require_complete_jpeg(bytes)?;
    }
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    if matches!(
        format,
        ImageFormat::Gif | ImageFormat::WebP | ImageFormat::Png
    ) {
        // Animations: their frame count, from the headers, before anything is decoded.
        probe::check(&probe::probe(bytes)?, limits)?;
    }
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_alloc);
    decoder.set_limits(decoder_limits).map_err(corrupt)?;
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    if let Some(o) = orientation {
        image.apply_orientation(o);
    }
    Ok(image)
}

/// Whether a JPEG's entropy-coded data runs to an end-of-image marker. Walks the marker segments
/// (skipping APPn segments, which may hold a whole thumbnail JPEG) to the first start-of-scan,
/// then looks for EOI: inside scan data a 0xFF byte is always stuffed, so `FF D9` is the real
/// marker.
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    jpeg_segments(bytes)
        .find(|(marker, _, _)| *marker == 0xDA)
        .and_then(|(_, _, end)| bytes.get(end..))
        .is_some_and(|scan| scan.windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// Refuses a JPEG whose data stops before its end-of-image marker: decoders fill a truncated
/// scan with grey instead of failing.
pub(crate) fn require_complete_jpeg(bytes: &[u8]) -> Result<(), ImagingError> {
    if jpeg_is_complete(bytes) {
        Ok(())
    } else {
        Err(ImagingError::Corrupt {
            format: "JPEG",
            message: "the file is truncated: its image data has no end-of-image marker".into(),
        })
    }
}

/// An image decoded and scaled to fit its box, oriented as shown: what thumbnails are encoded
/// from and tags are computed on.
#[derive(Clone, Debug)]
pub struct Small {
    /// RGB8, or RGBA8 when the source has transparency.
    pub image: DynamicImage,
    /// Size of the source after orientation.
    pub source_width: u32,
    pub source_height: u32,
}

/// Scales `image` to fit in a `max_side` square, keeping its aspect ratio; never upscales.
pub fn small_of(image: &DynamicImage, max_side: u32) -> Result<Small, ImagingError> {
    let (sw, sh) = (image.width(), image.height());
    let (tw, th) = fit_within(sw, sh, max_side);
    let wrong_size = || ImagingError::Encode("resampled buffer has the wrong size".into());
    let small = if image.color().has_alpha() {
        let pixels = image.to_rgba8().into_raw();
        let pixels = if (tw, th) == (sw, sh) {
            pixels
        } else {
            jpeg::resize_rgba(pixels, (sw, sh), (tw, th))?
        };
        DynamicImage::ImageRgba8(image::RgbaImage::from_raw(tw, th, pixels).ok_or_else(wrong_size)?)
    } else {
        let pixels = image.to_rgb8().into_raw();
        let pixels = if (tw, th) == (sw, sh) {
            pixels
        } else {
            jpeg::resize_rgb(pixels, (sw, sh), (tw, th))?
        };
        DynamicImage::ImageRgb8(image::RgbImage::from_raw(tw, th, pixels).ok_or_else(wrong_size)?)
    };
    Ok(Small {
        image: small,
        source_width: sw,
        source_height: sh,
    })
}

/// What the image stage runs, with one rendition: `renditions::process` making a JPEG (quality
/// 85) that fits a `max_side` square, and the tags, from one decode within `limits`. Tests,
/// fuzzers and benchmarks go through here, so they measure and check the stage's own path.
pub fn thumbnail(
    bytes: &[u8],
    max_side: u32,
    limits: &DecodeLimits,
) -> Result<Thumbnail, ImagingError> {
    let spec = renditions::RenditionSpec::thumbnail("thumbnail", max_side, jpeg::JPEG_QUALITY);
    let renditions::Processed {
        mut renditions,
        tags,
    } = renditions::process(bytes, std::slice::from_ref(&spec), limits)?;
    let r = renditions
        .pop()
        .ok_or_else(|| ImagingError::Encode("no rendition was made".into()))?;
    Ok(Thumbnail {
        bytes: r.bytes,
        format: r.format,
        width: r.width,
        height: r.height,
        source_width: tags.width,
        source_height: tags.height,
        tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        }))
    }

    #[test]
    fn landscape_jpeg_fits_the_box_and_keeps_aspect() {
        let bytes = encode(gradient(1000, 500), ImageFormat::Jpeg);
        let t = thumbnail(&bytes, 256, &DecodeLimits::default()).unwrap();
        assert_eq!((t.width, t.height), (256, 128));
        assert_eq!((t.source_width, t.source_height), (1000, 500));
        assert_eq!(t.format, renditions::Format::Jpeg);
        let back = image::load_from_memory(&t.bytes).unwrap();
        assert_eq!((back.width(), back.height()), (256, 128));
    }

    #[test]
    fn transparency_is_flattened_on_white_in_the_jpeg() {
        let img = DynamicImage::ImageRgba8(RgbaImage::from_pixel(300, 600, Rgba([0, 0, 0, 0])));
        let t = thumbnail(
            &encode(img, ImageFormat::Png),
            256,
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(t.format, renditions::Format::Jpeg);
        assert_eq!((t.width, t.height), (128, 256));
        let back = image::load_from_memory(&t.bytes).unwrap().to_rgb8();
        assert!(back.get_pixel(64, 128).0.iter().all(|&c| c > 250));
    }

    #[test]
    fn small_images_are_not_upscaled() {
        let t = thumbnail(
            &encode(gradient(40, 30), ImageFormat::Png),
            256,
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!((t.width, t.height), (40, 30));
    }

    #[test]
    fn declared_dimensions_are_checked_before_decoding() {
        let bytes = encode(gradient(300, 200), ImageFormat::Png);
        let limits = DecodeLimits {
            max_side: 256,
            ..DecodeLimits::default()
        };
        let err = thumbnail(&bytes, 64, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                ImagingError::TooLarge {
                    width: 300,
                    height: 200,
                    ..
                }
            ),
            "{err}"
        );
        let limits = DecodeLimits {
            max_pixels: 300 * 200 - 1,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            thumbnail(&bytes, 64, &limits),
            Err(ImagingError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_bytes_are_classified() {
        assert!(matches!(
            thumbnail(b"hello, world", 64, &DecodeLimits::default()),
            Err(ImagingError::UnknownFormat)
        ));
        let mut truncated = encode(gradient(300, 200), ImageFormat::Jpeg);
        truncated.truncate(truncated.len() / 3);
        let err = thumbnail(&truncated, 64, &DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, ImagingError::Corrupt { .. }), "{err}");
        let mut truncated = encode(gradient(300, 200), ImageFormat::Png);
        truncated.truncate(truncated.len() / 2);
        let err = thumbnail(&truncated, 64, &DecodeLimits::default()).unwrap_err();
        assert!(matches!(err, ImagingError::Corrupt { .. }), "{err}");
    }

    /// `jpeg` with an APP1 EXIF segment (little-endian TIFF, one IFD entry) saying `orientation`.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = vec![0x49, 0x49, 42, 0, 8, 0, 0, 0, 1, 0];
        tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_le_bytes());
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
        out.extend_from_slice(&((tiff.len() + 8) as u16).to_be_bytes());
        out.extend_from_slice(b"Exif\0\0");
        out.extend_from_slice(&tiff);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied_on_the_jpeg_fast_path() {
        let plain = encode(gradient(1200, 600), ImageFormat::Jpeg);
        assert!(jpeg_exif(&plain).is_none());
        let rotated = with_orientation(&plain, 6); // rotate 90 degrees clockwise to show
        assert!(jpeg_exif(&rotated).is_some());
        let t = thumbnail(&rotated, 256, &DecodeLimits::default()).unwrap();
        assert_eq!((t.width, t.height), (128, 256));
        assert_eq!((t.source_width, t.source_height), (600, 1200));
        let back = image::load_from_memory(&t.bytes).unwrap();
        assert_eq!((back.width(), back.height()), (128, 256));
    }

    #[test]
    fn boxes_keep_the_aspect_ratio() {
        assert_eq!(fit_within(4000, 3000, 256), (256, 192));
        assert_eq!(fit_within(3000, 4000, 256), (192, 256));
        assert_eq!(fit_within(20000, 1, 256), (256, 1));
        assert_eq!(fit_within(100, 50, 256), (100, 50));
    }

    #[test]
    fn jpeg_completeness_sees_past_embedded_thumbnails() {
        let full = encode(gradient(64, 48), ImageFormat::Jpeg);
        assert!(jpeg_is_complete(&full));
        // An APP1 segment carrying a complete JPEG (as EXIF thumbnails do) must not count.
        let inner = encode(gradient(8, 8), ImageFormat::Jpeg);
        let mut with_app1 = vec![0xFF, 0xD8, 0xFF, 0xE1];
        with_app1.extend_from_slice(&((inner.len() + 2) as u16).to_be_bytes());
        with_app1.extend_from_slice(&inner);
        with_app1.extend_from_slice(&full[2..]);
        assert!(jpeg_is_complete(&with_app1));
        let cut = &with_app1[..with_app1.len() - 40];
        assert!(!jpeg_is_complete(cut));
        assert!(!jpeg_is_complete(&full[..full.len() - 2]));
    }
}
