//! The JPEG fast path: shrink-on-load in the DCT domain (libjpeg-turbo decodes at 1/8 .. 8/8
//! scale, so a 12 MP photo bound for a 256 px thumbnail is never decoded at full size), SIMD
//! resampling of the small result, and libjpeg-turbo encoding. At 1/8 scale baseline JPEGs go
//! through `dc`, which reads only what that scale needs.

pub mod dc;

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;
use image::metadata::Orientation;

use crate::{DecodeLimits, ImagingError, Small, check_dimensions};

/// Quality of the default JPEG thumbnail (`crate::thumbnail`, the image stage's `thumb-256`).
pub const JPEG_QUALITY: u8 = 85;

fn corrupt(e: turbojpeg::Error) -> ImagingError {
    ImagingError::Corrupt {
        format: "JPEG",
        message: e.to_string(),
    }
}

/// The smallest libjpeg-turbo scale (`num`/8, num 1..=8) at which a `width` x `height` image is
/// still at least `want_w` x `want_h`, and the size it decodes to.
pub fn shrink_on_load(width: u32, height: u32, want_w: u32, want_h: u32) -> (u32, u32, u32) {
    let scaled = |side: u32, num: u32| (side * num).div_ceil(8);
    (1..=8)
        .map(|num| (num, scaled(width, num), scaled(height, num)))
        .find(|&(_, w, h)| w >= want_w && h >= want_h)
        .unwrap_or((8, width, height))
}

/// The JPEG `bytes` decoded at the smallest DCT scale that still covers `target(width, height)`
/// of the image as shown, oriented; resampled to exactly that size when `exact`. `None` when
/// the fast path does not apply (CMYK and YCCK JPEGs).
pub fn decode_for(
    bytes: &[u8],
    limits: &DecodeLimits,
    orientation: Option<Orientation>,
    target: impl Fn(u32, u32) -> (u32, u32),
    exact: bool,
) -> Result<Option<Small>, ImagingError> {
    let mut decompressor = turbojpeg::Decompressor::new().map_err(corrupt)?;
    let header = decompressor.read_header(bytes).map_err(corrupt)?;
    if matches!(
        header.colorspace,
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
    ) {
        return Ok(None);
    }
    let (width, height) = (
        u32::try_from(header.width).unwrap_or(u32::MAX),
        u32::try_from(header.height).unwrap_or(u32::MAX),
    );
    check_dimensions(width, height, limits)?;
    // Orientation swaps the sides of the source as shown; the box is fitted to that.
    let swapped = orientation.is_some_and(swaps_sides);
    let (shown_w, shown_h) = if swapped {
        (height, width)
    } else {
        (width, height)
    };
    let (tw, th) = target(shown_w, shown_h);
    let (tw_stored, th_stored) = if swapped { (th, tw) } else { (tw, th) };
    let (num, dw, dh) = shrink_on_load(width, height, tw_stored, th_stored);

    let dc_only = (num == 1)
        .then(|| dc::decode_dc(bytes))
        .flatten()
        .filter(|&(w, h, _)| (w, h) == (dw, dh));
    let pixels = match dc_only {
        Some((_, _, pixels)) => pixels,
        None => {
            let mut decoded = turbojpeg::Image {
                pixels: vec![0u8; dw as usize * dh as usize * 3],
                width: dw as usize,
                pitch: dw as usize * 3,
                height: dh as usize,
                format: turbojpeg::PixelFormat::RGB,
            };
            // Given a smaller output than the image, libjpeg-turbo picks the DCT scale that
            // fits it.
            decompressor
                .decompress(bytes, decoded.as_deref_mut())
                .map_err(corrupt)?;
            decoded.pixels
        }
    };
    let (ow, oh) = if exact {
        (tw_stored, th_stored)
    } else {
        (dw, dh)
    };
    let rgb = if (dw, dh) == (ow, oh) {
        pixels
    } else {
        resize_rgb(pixels, (dw, dh), (ow, oh))?
    };
    let mut image = DynamicImage::ImageRgb8(
        image::RgbImage::from_raw(ow, oh, rgb)
            .ok_or_else(|| ImagingError::Encode("resized buffer has the wrong size".into()))?,
    );
    if let Some(o) = orientation {
        image.apply_orientation(o);
    }
    Ok(Some(Small {
        image,
        source_width: shown_w,
        source_height: shown_h,
    }))
}

/// Encodes packed RGB8 `pixels` as a JPEG of `quality` (4:2:0) with libjpeg-turbo.
pub fn encode_rgb_quality(
    pixels: &[u8],
    width: u32,
    height: u32,
    quality: i32,
) -> Result<Vec<u8>, ImagingError> {
    let encode = |e: turbojpeg::Error| ImagingError::Encode(e.to_string());
    let mut compressor = turbojpeg::Compressor::new().map_err(encode)?;
    compressor.set_quality(quality);
    compressor.set_subsamp(turbojpeg::Subsamp::Sub2x2);
    compressor
        .compress_to_vec(turbojpeg::Image {
            pixels,
            width: width as usize,
            pitch: width as usize * 3,
            height: height as usize,
            format: turbojpeg::PixelFormat::RGB,
        })
        .map_err(encode)
}

fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Resamples packed RGB8 `pixels` of size `from` to `to` with a Lanczos3 filter (SIMD).
pub fn resize_rgb(
    pixels: Vec<u8>,
    from: (u32, u32),
    to: (u32, u32),
) -> Result<Vec<u8>, ImagingError> {
    resize(pixels, from, to, PixelType::U8x3)
}

/// Resamples packed RGBA8 `pixels` (colour weighted by alpha while resampling).
pub fn resize_rgba(
    pixels: Vec<u8>,
    from: (u32, u32),
    to: (u32, u32),
) -> Result<Vec<u8>, ImagingError> {
    resize(pixels, from, to, PixelType::U8x4)
}

fn resize(
    pixels: Vec<u8>,
    from: (u32, u32),
    to: (u32, u32),
    pixel: PixelType,
) -> Result<Vec<u8>, ImagingError> {
    let src = FirImage::from_vec_u8(from.0, from.1, pixels, pixel)
        .map_err(|e| ImagingError::Encode(format!("resampling: {e}")))?;
    let mut dst = FirImage::new(to.0, to.1, pixel);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .map_err(|e| ImagingError::Encode(format!("resampling: {e}")))?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrink_on_load_keeps_at_least_the_target() {
        // 4000x3000 to 256x192: 1/8 gives 500x375.
        assert_eq!(shrink_on_load(4000, 3000, 256, 192), (1, 500, 375));
        // 1000x750 to 256x192: 1/8 is 125 wide, too small; 3/8 is 375.
        assert_eq!(shrink_on_load(1000, 750, 256, 192), (3, 375, 282));
        // Already small: full size.
        assert_eq!(shrink_on_load(200, 100, 200, 100), (8, 200, 100));
        // Odd sizes round up, as libjpeg-turbo does.
        assert_eq!(shrink_on_load(4001, 3001, 256, 192), (1, 501, 376));
    }
}
