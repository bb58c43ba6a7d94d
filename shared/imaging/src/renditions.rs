//! Renditions: several sizes, shapes and formats of one image from a single decode, made in
//! parallel (rayon), plus the image's tags.
//!
//! The source is decoded once, at the smallest scale that still serves the largest rendition
//! (shrink-on-load for JPEGs), then each rendition is cut and resampled from it.

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GenericImageView};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::tags::Tags;
use crate::{DecodeLimits, ImagingError, Small, jpeg, jpeg_exif};

/// How a rendition's box is filled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The whole image, scaled to fit inside the box, aspect kept; never enlarged.
    #[default]
    Fit,
    /// The box exactly: the image scaled to cover it, then centred and cut to it.
    Fill,
    /// The box exactly, cut from the centre of the image at full resolution (smaller when the
    /// image is).
    Crop,
}

/// Output format of a rendition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Jpeg,
    Webp,
    Png,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Webp => "image/webp",
            Format::Png => "image/png",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Jpeg => "jpg",
            Format::Webp => "webp",
            Format::Png => "png",
        }
    }
}

/// What a JPEG rendition carries of the source's EXIF. Renditions of other formats carry none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metadata {
    /// Nothing: no camera, no time, no place.
    #[default]
    None,
    /// The source's EXIF fields (not its orientation, maker note or thumbnail), GPS included.
    Exif,
    /// The source's EXIF fields without GPS: where the photo was taken does not travel.
    ExifWithoutGps,
}

/// One rendition to make.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenditionSpec {
    /// Unique per stage: part of the output key (`thumb-256`).
    pub name: String,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub format: Format,
    /// Encoder quality, 1 to 100 (JPEG and WebP).
    #[serde(default = "default_quality")]
    pub quality: u8,
    /// EXIF carried into a JPEG rendition.
    #[serde(default)]
    pub metadata: Metadata,
}

fn default_quality() -> u8 {
    85
}

impl RenditionSpec {
    /// A JPEG named `name` fitting a `side` x `side` box, at `quality`, without metadata: the
    /// default thumbnail of the stages.
    pub fn thumbnail(name: &str, side: u32, quality: u8) -> Self {
        Self {
            name: name.to_owned(),
            width: side,
            height: side,
            mode: Mode::Fit,
            format: Format::Jpeg,
            quality,
            metadata: Metadata::None,
        }
    }
}

/// Checks a list of renditions: at least one; names unique, made of letters, digits, `.`, `_`
/// and `-`; sides from 1 to `max_side`; quality from 1 to 100.
pub fn check_specs(specs: &[RenditionSpec], max_side: u32) -> Result<(), String> {
    if specs.is_empty() {
        return Err("renditions is empty: at least one is needed".into());
    }
    let mut seen = std::collections::HashSet::new();
    for r in specs {
        let name = &r.name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "rendition name `{name}` is not allowed (letters, digits, `.`, `_`, `-`)"
            ));
        }
        if !seen.insert(name) {
            return Err(format!("rendition name `{name}` is used twice"));
        }
        if !(1..=max_side).contains(&r.width) || !(1..=max_side).contains(&r.height) {
            return Err(format!(
                "rendition `{name}`: sides must be 1 to {max_side} px"
            ));
        }
        if !(1..=100).contains(&r.quality) {
            return Err(format!("rendition `{name}`: quality must be 1 to 100"));
        }
    }
    Ok(())
}

/// A finished rendition.
#[derive(Clone, Debug)]
pub struct Rendition {
    pub name: String,
    pub bytes: Vec<u8>,
    pub format: Format,
    pub mode: Mode,
    pub width: u32,
    pub height: u32,
}

/// Everything made from one image.
#[derive(Clone, Debug)]
pub struct Processed {
    pub renditions: Vec<Rendition>,
    pub tags: Tags,
}

/// How much of the source (as a fraction of its size, at most 1) `spec` needs.
fn scale_needed(spec: &RenditionSpec, w: u32, h: u32) -> f64 {
    let (sx, sy) = (
        f64::from(spec.width) / f64::from(w),
        f64::from(spec.height) / f64::from(h),
    );
    match spec.mode {
        Mode::Fit => sx.min(sy),
        Mode::Fill => sx.max(sy),
        Mode::Crop => 1.0,
    }
    .min(1.0)
}

/// Makes every rendition of `specs` and the tags of `bytes`, decoding within `limits` once.
pub fn process(
    bytes: &[u8],
    specs: &[RenditionSpec],
    limits: &DecodeLimits,
) -> Result<Processed, ImagingError> {
    let (decoded, exif) = decode_working(bytes, limits, |w, h| working_size(specs, w, h, 256))?;
    let renditions = render_all(&decoded, specs, exif)?;
    let tags = tags_of(&decoded, exif)?;
    Ok(Processed { renditions, tags })
}

/// Decodes `bytes` within `limits`, oriented as shown: JPEGs by shrink-on-load at no less than
/// `target(width, height)` of the oriented source (never larger than it), the rest at full size.
/// Also returns a JPEG's EXIF (TIFF) block.
pub fn decode_working<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
    target: impl Fn(u32, u32) -> (u32, u32),
) -> Result<(Small, Option<&'a [u8]>), ImagingError> {
    let mut exif = None;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        crate::require_complete_jpeg(bytes)?;
        exif = jpeg_exif(bytes);
        let orientation = exif.and_then(image::metadata::Orientation::from_exif_chunk);
        if let Some(decoded) = jpeg::decode_for(bytes, limits, orientation, target, false)? {
            return Ok((decoded, exif));
        }
    }
    let image = crate::decode(bytes, limits)?;
    let image = if image.color().has_alpha() {
        DynamicImage::ImageRgba8(image.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(image.to_rgb8())
    };
    let decoded = Small {
        source_width: image.width(),
        source_height: image.height(),
        image,
    };
    Ok((decoded, exif))
}

/// The tags of an image decoded at any size (`decoded`), with its EXIF block.
pub fn tags_of(decoded: &Small, exif: Option<&[u8]>) -> Result<Tags, ImagingError> {
    let for_tags = crate::small_of(&decoded.image, 256)?;
    Ok(crate::tags::tags(
        &Small {
            image: for_tags.image,
            source_width: decoded.source_width,
            source_height: decoded.source_height,
        },
        exif,
    ))
}

/// The size to decode a `w`x`h` source at (never larger than it) so that every rendition of
/// `specs`, and an image of `at_least` pixels on its longer side, can be cut from it.
pub fn working_size(specs: &[RenditionSpec], w: u32, h: u32, at_least: u32) -> (u32, u32) {
    let s = specs
        .iter()
        .map(|spec| scale_needed(spec, w, h))
        .fold(f64::from(at_least) / f64::from(w.max(h).max(1)), f64::max)
        .min(1.0);
    (
        ((f64::from(w) * s).ceil() as u32).clamp(1, w.max(1)),
        ((f64::from(h) * s).ceil() as u32).clamp(1, h.max(1)),
    )
}

/// Makes every rendition of `specs` from `decoded` (the source, or a scaled-down decode of it at
/// least [`working_size`]), in parallel. `exif` is the source's TIFF block, for JPEG renditions
/// that keep metadata.
pub fn render_all(
    decoded: &Small,
    specs: &[RenditionSpec],
    exif: Option<&[u8]>,
) -> Result<Vec<Rendition>, ImagingError> {
    specs
        .par_iter()
        .map(|spec| render(decoded, spec, exif))
        .collect()
}

/// Cuts and resamples one rendition from `decoded` (which may be a scaled-down decode of the
/// source).
fn render(
    decoded: &Small,
    spec: &RenditionSpec,
    exif: Option<&[u8]>,
) -> Result<Rendition, ImagingError> {
    let (sw, sh) = (decoded.source_width, decoded.source_height);
    let (dw, dh) = decoded.image.dimensions();
    // Source pixels per decoded pixel.
    let k = f64::from(sw) / f64::from(dw);
    let (bw, bh) = (spec.width.max(1), spec.height.max(1));
    // The region of the decoded image to use, and the output size.
    let (crop, out) = match spec.mode {
        Mode::Fit => {
            let s = (f64::from(bw) / f64::from(sw))
                .min(f64::from(bh) / f64::from(sh))
                .min(1.0);
            let out = (
                ((f64::from(sw) * s).round() as u32).max(1),
                ((f64::from(sh) * s).round() as u32).max(1),
            );
            ((0.0, 0.0, f64::from(dw), f64::from(dh)), out)
        }
        Mode::Fill => {
            // The largest centred region of the box's aspect.
            let aspect = f64::from(bw) / f64::from(bh);
            let (cw, ch) = if f64::from(dw) / f64::from(dh) > aspect {
                (f64::from(dh) * aspect, f64::from(dh))
            } else {
                (f64::from(dw), f64::from(dw) / aspect)
            };
            (
                (
                    (f64::from(dw) - cw) / 2.0,
                    (f64::from(dh) - ch) / 2.0,
                    cw,
                    ch,
                ),
                (bw, bh),
            )
        }
        Mode::Crop => {
            let (cw, ch) = (f64::from(bw.min(sw)) / k, f64::from(bh.min(sh)) / k);
            (
                (
                    (f64::from(dw) - cw) / 2.0,
                    (f64::from(dh) - ch) / 2.0,
                    cw,
                    ch,
                ),
                (bw.min(sw), bh.min(sh)),
            )
        }
    };
    let alpha = decoded.image.color().has_alpha();
    let (pixel, raw) = if alpha {
        (PixelType::U8x4, decoded.image.to_rgba8().into_raw())
    } else {
        (PixelType::U8x3, decoded.image.to_rgb8().into_raw())
    };
    let wrong = |e: String| ImagingError::Encode(format!("resampling: {e}"));
    let src = FirImage::from_vec_u8(dw, dh, raw, pixel).map_err(|e| wrong(e.to_string()))?;
    let mut dst = FirImage::new(out.0, out.1, pixel);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new()
                .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
                .crop(crop.0, crop.1, crop.2, crop.3),
        )
        .map_err(|e| wrong(e.to_string()))?;
    let pixels = dst.into_vec();
    let quality = spec.quality.clamp(1, 100);
    let bytes = match spec.format {
        Format::Jpeg => {
            let rgb = if alpha {
                flatten_on_white(&pixels)
            } else {
                pixels
            };
            let jpeg = jpeg::encode_rgb_quality(&rgb, out.0, out.1, i32::from(quality))?;
            let keep = match spec.metadata {
                Metadata::None => None,
                Metadata::Exif => Some(true),
                Metadata::ExifWithoutGps => Some(false),
            };
            match keep
                .zip(exif)
                .and_then(|(gps, tiff)| crate::tags::rendition_exif(tiff, gps))
            {
                Some(tiff) => crate::tags::with_exif(jpeg, &tiff),
                None => jpeg,
            }
        }
        Format::Webp => {
            let encoder = if alpha {
                webp::Encoder::from_rgba(&pixels, out.0, out.1)
            } else {
                webp::Encoder::from_rgb(&pixels, out.0, out.1)
            };
            encoder.encode(f32::from(quality)).to_vec()
        }
        Format::Png => {
            let image = if alpha {
                image::RgbaImage::from_raw(out.0, out.1, pixels).map(DynamicImage::ImageRgba8)
            } else {
                image::RgbImage::from_raw(out.0, out.1, pixels).map(DynamicImage::ImageRgb8)
            }
            .ok_or_else(|| ImagingError::Encode("resampled buffer has the wrong size".into()))?;
            let mut buf = std::io::Cursor::new(Vec::new());
            image
                .write_to(&mut buf, image::ImageFormat::Png)
                .map_err(|e| ImagingError::Encode(e.to_string()))?;
            buf.into_inner()
        }
    };
    Ok(Rendition {
        name: spec.name.clone(),
        bytes,
        format: spec.format,
        mode: spec.mode,
        width: out.0,
        height: out.1,
    })
}

/// RGBA8 composited on white, as RGB8.
fn flatten_on_white(rgba: &[u8]) -> Vec<u8> {
    rgba.chunks_exact(4)
        .flat_map(|p| {
            let a = u16::from(p[3]);
            [0, 1, 2].map(|i| ((u16::from(p[i]) * a + 255 * (255 - a) + 127) / 255) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{encode, photo};
    use image::ImageFormat;

    fn spec(name: &str, w: u32, h: u32, mode: Mode, format: Format) -> RenditionSpec {
        RenditionSpec {
            name: name.into(),
            width: w,
            height: h,
            mode,
            format,
            quality: 80,
            metadata: Metadata::None,
        }
    }

    #[test]
    fn modes_and_formats_from_one_decode() {
        let jpeg = encode(&photo(1600, 1000), ImageFormat::Jpeg);
        let specs = [
            spec("fit", 256, 256, Mode::Fit, Format::Jpeg),
            spec("fill", 300, 300, Mode::Fill, Format::Webp),
            spec("crop", 200, 100, Mode::Crop, Format::Png),
            spec("wide", 640, 200, Mode::Fill, Format::Jpeg),
            spec("big", 4000, 4000, Mode::Fit, Format::Jpeg),
        ];
        let p = process(&jpeg, &specs, &DecodeLimits::default()).unwrap();
        let sizes: Vec<(&str, u32, u32)> = p
            .renditions
            .iter()
            .map(|r| (r.name.as_str(), r.width, r.height))
            .collect();
        assert_eq!(
            sizes,
            [
                ("fit", 256, 160),
                ("fill", 300, 300),
                ("crop", 200, 100),
                ("wide", 640, 200),
                ("big", 1600, 1000), // never enlarged
            ]
        );
        for (r, format) in p.renditions.iter().zip([
            ImageFormat::Jpeg,
            ImageFormat::WebP,
            ImageFormat::Png,
            ImageFormat::Jpeg,
            ImageFormat::Jpeg,
        ]) {
            let back = image::load_from_memory_with_format(&r.bytes, format).unwrap();
            assert_eq!(back.dimensions(), (r.width, r.height), "{}", r.name);
        }
        assert_eq!((p.tags.width, p.tags.height), (1600, 1000));
        assert_eq!(p.tags.orientation, "landscape");
    }

    #[test]
    fn a_crop_is_taken_at_full_resolution_from_the_centre() {
        // Left half black, right half white: a centred crop straddles the edge.
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(1000, 600, |x, _| {
            if x < 500 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        }));
        let png = encode(&img, ImageFormat::Png);
        let p = process(
            &png,
            &[spec("c", 100, 50, Mode::Crop, Format::Png)],
            &DecodeLimits::default(),
        )
        .unwrap();
        let back = image::load_from_memory(&p.renditions[0].bytes)
            .unwrap()
            .to_rgb8();
        assert_eq!(back.dimensions(), (100, 50));
        assert!(back.get_pixel(10, 25).0[0] < 20 && back.get_pixel(90, 25).0[0] > 235);
    }
}
