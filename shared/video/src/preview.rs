//! Animated previews: a few seconds of the video as an animated WebP or GIF.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::select::Offset;
use crate::{Video, VideoError};

/// The animation's format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviewFormat {
    #[default]
    Webp,
    Gif,
}

impl PreviewFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            PreviewFormat::Webp => "image/webp",
            PreviewFormat::Gif => "image/gif",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            PreviewFormat::Webp => "webp",
            PreviewFormat::Gif => "gif",
        }
    }
}

/// What preview to make.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviewSpec {
    /// Where it starts; by default a third of the way in (past openings and titles), or the
    /// keyframe up to 10 s before that.
    pub start: Option<Offset>,
    /// How long it lasts, in seconds (shorter if the video is).
    pub duration_s: f64,
    /// Frames per second.
    pub fps: u32,
    /// Largest width or height, in pixels.
    pub max_side: u32,
    pub format: PreviewFormat,
    /// WebP quality, 1 to 100.
    pub quality: u8,
}

impl Default for PreviewSpec {
    fn default() -> Self {
        Self {
            start: None,
            duration_s: 3.0,
            fps: 8,
            max_side: 320,
            format: PreviewFormat::Webp,
            quality: 70,
        }
    }
}

impl PreviewSpec {
    pub fn check(&self) -> Result<(), VideoError> {
        let bad = |m: &str| Err(VideoError::BadRequest(format!("preview: {m}")));
        if !(self.duration_s.is_finite() && (0.1..=30.0).contains(&self.duration_s)) {
            return bad("duration_s must be 0.1 to 30");
        }
        if !(1..=30).contains(&self.fps) {
            return bad("fps must be 1 to 30");
        }
        if self.duration_s * f64::from(self.fps) > 240.0 {
            return bad("at most 240 frames (duration_s x fps)");
        }
        if !(16..=1280).contains(&self.max_side) {
            return bad("max_side must be 16 to 1280");
        }
        Ok(())
    }
}

/// A made preview.
#[derive(Clone, Debug)]
pub struct Preview {
    pub bytes: Vec<u8>,
    pub format: PreviewFormat,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub start_s: f64,
    pub duration_s: f64,
}

/// How far back from the default start the preview moves to begin at a keyframe, in seconds.
const KEYFRAME_REACH: f64 = 10.0;

/// Makes the animated preview of `video`.
pub fn preview(video: &mut Video, spec: &PreviewSpec) -> Result<Preview, VideoError> {
    spec.check()?;
    let total = video.probe().duration_s;
    let length = spec.duration_s.min(total);
    let start = match spec.start {
        Some(offset) => offset.at(total),
        // A third of the way in, moved back to the keyframe there when one is near: decoding
        // starts at that keyframe anyway, and the frames up to the third would be decoded for
        // nothing.
        None => {
            let third = total / 3.0;
            video
                .keyframe_before(third)?
                .filter(|k| (third - KEYFRAME_REACH..=third).contains(k))
                .unwrap_or(third)
        }
    }
    .clamp(0.0, (total - length).max(0.0));
    let (w, h) = crate::picture::fit_size(
        (
            video.probe().video.display_width,
            video.probe().video.display_height,
        ),
        (spec.max_side, spec.max_side),
    );
    let step = 1.0 / f64::from(spec.fps);
    let end = start + length;
    // One frame per step of the preview's clock: the frame shown at each step. Where the video
    // has fewer frames (a low or variable rate), a frame is held over several steps.
    let mut frames: Vec<(f64, RgbImage)> = Vec::new();
    let mut next = start;
    // Where the video has at least three frames per step of the preview, non-reference frames
    // (most B-frames) are not decoded: each preview frame is then the first decoded one at or
    // after its time, a frame or two late at most, for about half the decoding. Slower videos
    // are decoded whole, so that no step loses its frame.
    let fast = video.frame_interval() * 3.0 <= step + 1e-9;
    video.scan(start, fast, |p| {
        if p.time_s >= end - 1e-6 {
            return Ok(false);
        }
        if p.time_s + 1e-6 >= next {
            frames.push((p.time_s, p.to_rgb(w, h)?));
            next = start + step * ((p.time_s - start) / step + 1e-6).floor() + step;
        }
        Ok(true)
    })?;
    if frames.is_empty() {
        return Err(VideoError::NoFrame(format!("from {start:.3} s on")));
    }
    // Each frame lasts until the next one's time (the last until the end), in whole ms.
    let ms = |t: f64| ((t - start) * 1000.0).round().max(0.0) as i32;
    let shown_at: Vec<i32> = frames.iter().map(|(t, _)| ms(*t)).collect();
    let durations: Vec<u32> = shown_at
        .iter()
        .zip(shown_at.iter().skip(1).chain(std::iter::once(&ms(end))))
        .map(|(a, b)| (b - a).max(10) as u32)
        .collect();
    let bytes = match spec.format {
        PreviewFormat::Webp => {
            let mut config = webp::WebPConfig::new()
                .map_err(|()| VideoError::Internal("libwebp configuration".into()))?;
            config.quality = f32::from(spec.quality.clamp(1, 100));
            config.lossless = 0;
            let mut encoder = webp::AnimEncoder::new(w, h, &config);
            encoder.set_loop_count(0);
            for ((_, image), at) in frames.iter().zip(&shown_at) {
                encoder.add_frame(webp::AnimFrame::from_rgb(image.as_raw(), w, h, *at));
            }
            encoder
                .try_encode()
                .map_err(|e| VideoError::Internal(format!("animated WebP: {e:?}")))?
                .to_vec()
        }
        PreviewFormat::Gif => {
            let mut out = Vec::new();
            {
                let mut encoder = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 10);
                encoder
                    .set_repeat(image::codecs::gif::Repeat::Infinite)
                    .map_err(|e| VideoError::Internal(format!("GIF: {e}")))?;
                for ((_, image), ms) in frames.iter().zip(&durations) {
                    let rgba = image::DynamicImage::ImageRgb8(image.clone()).into_rgba8();
                    let frame = image::Frame::from_parts(
                        rgba,
                        0,
                        0,
                        image::Delay::from_numer_denom_ms(*ms, 1),
                    );
                    encoder
                        .encode_frame(frame)
                        .map_err(|e| VideoError::Internal(format!("GIF: {e}")))?;
                }
            }
            out
        }
    };
    Ok(Preview {
        bytes,
        format: spec.format,
        width: w,
        height: h,
        frames: frames.len() as u32,
        start_s: frames[0].0,
        duration_s: length,
    })
}
