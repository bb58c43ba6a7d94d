//! Stills: renditions of a frame (the image stage's fit/fill/crop and JPEG/WebP/PNG encoders,
//! cut from one scaled copy of the frame), and plain JPEG/WebP encoding.

use image::RgbImage;
use mediaflow_imaging::renditions::{Rendition, RenditionSpec, render_all, working_size};

use crate::{Picture, VideoError};

fn encoding(e: impl std::fmt::Display) -> VideoError {
    VideoError::Internal(format!("encoding: {e}"))
}

/// Every rendition of `specs` from `picture`: scaled once (swscale) to the size the largest
/// needs, then cut and encoded in parallel.
pub fn renditions(
    picture: &Picture,
    specs: &[RenditionSpec],
) -> Result<Vec<Rendition>, VideoError> {
    let (w, h) = picture.display_size();
    let small = picture.small(working_size(specs, w, h, 0))?;
    render_all(&small, specs, None).map_err(encoding)
}

/// JPEG of `quality` (1 to 100).
pub fn jpeg(image: &RgbImage, quality: u8) -> Result<Vec<u8>, VideoError> {
    mediaflow_imaging::jpeg::encode_rgb_quality(
        image.as_raw(),
        image.width(),
        image.height(),
        i32::from(quality.clamp(1, 100)),
    )
    .map_err(encoding)
}

/// Lossy WebP of `quality` (1 to 100).
pub fn webp(image: &RgbImage, quality: u8) -> Vec<u8> {
    webp::Encoder::from_rgb(image.as_raw(), image.width(), image.height())
        .encode(f32::from(quality.clamp(1, 100)))
        .to_vec()
}
