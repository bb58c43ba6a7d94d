//! What a video is, from its container and stream headers: nothing is decoded.

use std::path::Path;

use ffmpeg_next::codec;
use ffmpeg_next::format::context::Input;
use ffmpeg_next::media;
use serde::{Deserialize, Serialize};

use crate::source::kind_name;
use crate::{Limits, Video, VideoError};

/// A probed input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// The demuxer that reads it (`mov,mp4,m4a,3gp,3g2,mj2`, `matroska,webm`, ...).
    pub format: String,
    /// Duration of the whole input, in seconds.
    pub duration_s: f64,
    /// Overall bit rate, bits per second (0 when unknown).
    pub bit_rate: i64,
    /// Size of the file, in bytes.
    pub size_bytes: u64,
    /// The video stream frames are taken from.
    pub video: VideoStream,
    /// Every stream, in container order.
    pub streams: Vec<StreamInfo>,
}

/// The video stream used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoStream {
    pub index: usize,
    /// FFmpeg's codec name (`h264`, `hevc`, `vp9`, `av1`, ...).
    pub codec: String,
    /// Coded size.
    pub width: u32,
    pub height: u32,
    /// Size as shown, after rotation.
    pub display_width: u32,
    pub display_height: u32,
    /// Clockwise turn the stream asks for: 0, 90, 180 or 270.
    pub rotation: u32,
    /// Average frames per second (0 when unknown).
    pub frame_rate: f64,
    /// Whether the frame rate varies (average and nominal rates differ).
    pub variable_frame_rate: bool,
    /// Frames, when the container says.
    pub frames: Option<u64>,
    /// The stream's own duration, in seconds, when the container says.
    pub duration_s: Option<f64>,
    /// FFmpeg's pixel format name (`yuv420p`, ...).
    pub pixel_format: String,
}

/// One stream of the container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub index: usize,
    /// `video`, `audio`, `subtitle`, `data`, `attachment` or `unknown`.
    pub kind: String,
    pub codec: String,
}

/// Probes `path` within `limits`.
pub fn probe(path: &Path, limits: &Limits) -> Result<Probe, VideoError> {
    Ok(Video::open(path, limits)?.probe().clone())
}

fn rate(r: ffmpeg_next::Rational) -> f64 {
    if r.denominator() == 0 || r.numerator() <= 0 {
        0.0
    } else {
        f64::from(r)
    }
}

/// Clockwise degrees (0, 90, 180, 270) of a display matrix (nine 32-bit values, 16.16 fixed point
/// but for the last column), as FFmpeg's `-autorotate` reads it.
pub fn rotation_of_display_matrix(bytes: &[u8]) -> u32 {
    if bytes.len() < 36 {
        return 0;
    }
    let m: Vec<f64> = bytes
        .chunks_exact(4)
        .take(9)
        .map(|c| f64::from(i32::from_ne_bytes([c[0], c[1], c[2], c[3]])) / 65536.0)
        .collect();
    let (s0, s1) = (m[0].hypot(m[3]), m[1].hypot(m[4]));
    if s0 == 0.0 || s1 == 0.0 {
        return 0;
    }
    // av_display_rotation_get returns the negation of this angle; ffmpeg's autorotate turns the
    // picture clockwise by minus that, i.e. by this.
    let cw = (m[1] / s1)
        .atan2(m[0] / s0)
        .to_degrees()
        .round()
        .rem_euclid(360.0);
    (((cw + 45.0) / 90.0).floor() as u32 % 4) * 90
}

impl Probe {
    /// Reads what the container and the chosen video stream say.
    pub(crate) fn of(input: &Input, size_bytes: u64) -> Result<Self, VideoError> {
        let streams: Vec<StreamInfo> = input
            .streams()
            .map(|s| StreamInfo {
                index: s.index(),
                kind: kind_name(s.parameters().medium()).into(),
                codec: s.parameters().id().name().into(),
            })
            .collect();
        // Cover art (an attached picture, as in audio files) is not a video stream.
        let moving = |s: &ffmpeg_next::Stream| {
            s.parameters().medium() == media::Type::Video
                && !s
                    .disposition()
                    .contains(ffmpeg_next::format::stream::Disposition::ATTACHED_PIC)
        };
        let best = input
            .streams()
            .best(media::Type::Video)
            .filter(moving)
            .or_else(|| input.streams().find(moving))
            .ok_or_else(|| VideoError::NoVideo {
                streams: if streams.is_empty() {
                    "none".into()
                } else {
                    streams
                        .iter()
                        .map(|s| format!("{} {}", s.kind, s.codec))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?;
        let decoder = codec::context::Context::from_parameters(best.parameters())
            .and_then(|c| c.decoder().video())
            .map_err(|e| {
                VideoError::Unreadable(format!(
                    "the video stream ({}) cannot be decoded by this FFmpeg ({e})",
                    best.parameters().id().name()
                ))
            })?;
        let (width, height) = (decoder.width(), decoder.height());
        if width == 0 || height == 0 {
            return Err(VideoError::Unreadable(
                "the video stream declares no picture size".into(),
            ));
        }
        let rotation = best
            .side_data()
            .find(|d| d.kind() == codec::packet::side_data::Type::DisplayMatrix)
            .map_or(0, |d| rotation_of_display_matrix(d.data()));
        let (display_width, display_height) = if rotation % 180 == 90 {
            (height, width)
        } else {
            (width, height)
        };
        let tb = f64::from(best.time_base());
        let stream_duration = (best.duration() > 0
            && best.duration() != ffmpeg_next::ffi::AV_NOPTS_VALUE)
            .then(|| best.duration() as f64 * tb);
        let avg = rate(best.avg_frame_rate());
        let nominal = rate(best.rate());
        let container = input.duration();
        let duration_s = if container > 0 && container != ffmpeg_next::ffi::AV_NOPTS_VALUE {
            container as f64 / f64::from(ffmpeg_next::ffi::AV_TIME_BASE)
        } else {
            stream_duration.unwrap_or(0.0)
        };
        Ok(Self {
            format: input.format().name().into(),
            duration_s,
            bit_rate: input.bit_rate().max(0),
            size_bytes,
            video: VideoStream {
                index: best.index(),
                codec: best.parameters().id().name().into(),
                width,
                height,
                display_width,
                display_height,
                rotation,
                frame_rate: if avg > 0.0 { avg } else { nominal },
                variable_frame_rate: avg > 0.0
                    && nominal > 0.0
                    && (avg - nominal).abs() / nominal > 0.01,
                frames: (best.frames() > 0).then_some(best.frames() as u64),
                duration_s: stream_duration,
                pixel_format: format!("{:?}", decoder.format()).to_lowercase(),
            },
            streams,
        })
    }

    /// Refuses what is over `limits`.
    pub fn check(&self, limits: &Limits) -> Result<(), VideoError> {
        let over =
            |what, value: String, limit: String| Err(VideoError::OverLimit { what, value, limit });
        if self.streams.len() > limits.max_streams as usize {
            return over(
                "stream count",
                self.streams.len().to_string(),
                limits.max_streams.to_string(),
            );
        }
        let v = &self.video;
        if v.width.max(v.height) > limits.max_side {
            return over(
                "size",
                format!("{}x{}", v.width, v.height),
                format!("{} px a side", limits.max_side),
            );
        }
        if u64::from(v.width) * u64::from(v.height) > limits.max_pixels {
            return over(
                "pixel count",
                format!("{}x{}", v.width, v.height),
                format!("{} pixels", limits.max_pixels),
            );
        }
        let longest = self.duration_s.max(v.duration_s.unwrap_or(0.0));
        if longest > limits.max_duration_s {
            return over(
                "duration",
                format!("{longest:.1} s"),
                format!("{:.1} s", limits.max_duration_s),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(a: i32, b: i32, c: i32, d: i32) -> Vec<u8> {
        [a, b, 0, c, d, 0, 0, 0, 1 << 30]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect()
    }

    #[test]
    fn display_matrices_give_quarter_turns() {
        let one = 1 << 16;
        assert_eq!(rotation_of_display_matrix(&matrix(one, 0, 0, one)), 0);
        // Counter-clockwise 270 (av_display_rotation_get: -90): turned clockwise 90 to show.
        assert_eq!(rotation_of_display_matrix(&matrix(0, one, -one, 0)), 90);
        assert_eq!(rotation_of_display_matrix(&matrix(-one, 0, 0, -one)), 180);
        assert_eq!(rotation_of_display_matrix(&matrix(0, -one, one, 0)), 270);
        assert_eq!(rotation_of_display_matrix(&[0; 8]), 0);
    }
}
