//! Pure image kernels over bytes: bounded decoding (dimensions are checked before any pixel is
//! decoded), EXIF orientation, and thumbnails. No I/O, no async: services call these on a
//! blocking pool, benches and fuzzers call them directly.

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
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_side: 20_000,
            max_pixels: 100_000_000,
            max_alloc: 1 << 30,
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
    #[error("corrupt or truncated {format} image: {message}")]
    Corrupt {
        format: &'static str,
        message: String,
    },
    #[error("could not encode the thumbnail: {0}")]
    Encode(String),
}

/// Output format of a thumbnail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThumbFormat {
    Jpeg,
    Png,
}

impl ThumbFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ThumbFormat::Jpeg => "image/jpeg",
            ThumbFormat::Png => "image/png",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ThumbFormat::Jpeg => "jpg",
            ThumbFormat::Png => "png",
        }
    }
}

/// A finished thumbnail.
#[derive(Clone, Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub format: ThumbFormat,
    pub width: u32,
    pub height: u32,
    /// Size of the source after orientation.
    pub source_width: u32,
    pub source_height: u32,
}

fn format_name(format: ImageFormat) -> &'static str {
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

    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills a truncated scan with grey instead of failing.
        return Err(ImagingError::Corrupt {
            format: name,
            message: "the file is truncated: its image data has no end-of-image marker".into(),
        });
    }
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
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
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => {
                i += 1;
                continue;
            }
            // Standalone markers without a length.
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            0xD9 => return false, // EOI before any scan
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        let end = i + 2 + len;
        if marker == 0xDA {
            return bytes
                .get(end..)
                .is_some_and(|scan| scan.windows(2).any(|w| w == [0xFF, 0xD9]));
        }
        i = end;
    }
    false
}

/// Scales `image` to fit in a `max_side` square, keeping its aspect ratio; never upscales.
/// Images with transparency become PNG, the rest JPEG.
pub fn thumbnail_of(image: &DynamicImage, max_side: u32) -> Result<Thumbnail, ImagingError> {
    let (sw, sh) = (image.width(), image.height());
    let small = if sw <= max_side && sh <= max_side {
        image.clone()
    } else {
        image.thumbnail(max_side, max_side)
    };
    let has_alpha = small.color().has_alpha();
    let format = if has_alpha {
        ThumbFormat::Png
    } else {
        ThumbFormat::Jpeg
    };
    let mut out = Cursor::new(Vec::new());
    let encoded = match format {
        ThumbFormat::Png => small.write_to(&mut out, ImageFormat::Png),
        ThumbFormat::Jpeg => {
            let rgb = DynamicImage::ImageRgb8(small.to_rgb8());
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85);
            rgb.write_with_encoder(encoder)
        }
    };
    encoded.map_err(|e| ImagingError::Encode(e.to_string()))?;
    Ok(Thumbnail {
        bytes: out.into_inner(),
        format,
        width: small.width(),
        height: small.height(),
        source_width: sw,
        source_height: sh,
    })
}

/// Decodes `bytes` within `limits` and makes a thumbnail fitting in `max_side`.
pub fn thumbnail(
    bytes: &[u8],
    max_side: u32,
    limits: &DecodeLimits,
) -> Result<Thumbnail, ImagingError> {
    thumbnail_of(&decode(bytes, limits)?, max_side)
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
        assert_eq!(t.format, ThumbFormat::Jpeg);
        let back = image::load_from_memory(&t.bytes).unwrap();
        assert_eq!((back.width(), back.height()), (256, 128));
    }

    #[test]
    fn transparent_png_stays_png() {
        let img = DynamicImage::ImageRgba8(RgbaImage::from_pixel(300, 600, Rgba([1, 2, 3, 100])));
        let t = thumbnail(
            &encode(img, ImageFormat::Png),
            256,
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(t.format, ThumbFormat::Png);
        assert_eq!((t.width, t.height), (128, 256));
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
