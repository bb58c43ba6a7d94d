//! Pure video kernels on the system FFmpeg (through `ffmpeg-next`), in process:
//!
//! - [`probe`]: duration, codecs, dimensions, rotation, frame rate, streams — checked against
//!   [`Limits`] before anything is decoded;
//! - [`Video`]: one opened input; frames at a time with keyframe ([`Seek::Keyframe`]: the
//!   keyframe at or before it, nothing else decoded) or accurate ([`Seek::Accurate`]: decoded on
//!   to the frame shown at that time) seeking, scaled with swscale and turned upright;
//! - [`select`]: which frames — N evenly spaced, every T seconds, explicit offsets (seconds or
//!   percent), representative frames that skip black, blank and blurred ones, scene changes;
//! - [`storyboard`]: a sprite sheet of tiles and the WebVTT index players use for hover previews;
//! - [`preview`]: a short animated WebP or GIF;
//! - [`encode`]: JPEG and WebP stills.
//!
//! Safety: only the `file` protocol, and only the demuxers of [`ALLOWED_FORMATS`], so a container
//! that references other files or URLs (an HLS or concat playlist, an image sequence) reads
//! nothing else; limits on duration, dimensions, stream count and time per job.

mod error;
mod picture;
mod source;

pub mod encode;
pub mod preview;
pub mod probe;
pub mod select;
pub mod storyboard;

pub use error::VideoError;
pub use picture::{Picture, Still};
pub use probe::{Probe, StreamInfo};
pub use source::{Seek, Video};

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The demuxers an input may be read by: containers and elementary streams that carry their
/// media inside the one file. Playlist and reference formats (HLS, DASH, concat, image
/// sequences, SDP/RTSP) are left out: they open other files or URLs.
pub const ALLOWED_FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,\
mpegvideo,ogg,asf,nut,mxf,dv,ivf,h264,hevc,m4v,vc1,mjpeg,yuv4mpegpipe,gif,apng,webp_pipe,obu,av1";

/// Bounds on what one job may make the kernel do. Checked on the headers, before decoding, and
/// (time) while decoding.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest accepted duration, in seconds.
    pub max_duration_s: f64,
    /// Largest accepted width or height of the video stream, in pixels.
    pub max_side: u32,
    /// Largest accepted width x height.
    pub max_pixels: u64,
    /// Most streams a container may hold.
    pub max_streams: u32,
    /// Longest one job may decode for, in seconds.
    pub max_job_s: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_duration_s: 6.0 * 3600.0,
            max_side: 8192,
            max_pixels: 8192 * 4320,
            max_streams: 32,
            max_job_s: 300.0,
        }
    }
}

impl Limits {
    pub(crate) fn job_time(&self) -> Duration {
        Duration::try_from_secs_f64(self.max_job_s.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// Checks that every limit is a number that can bound something.
    pub fn check(&self) -> Result<(), VideoError> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(VideoError::BadRequest(format!(
                    "limits.{name} must be a number of seconds (0 or more), not {v}"
                )))
            }
        };
        positive("max_duration_s", self.max_duration_s)?;
        positive("max_job_s", self.max_job_s)?;
        if self.max_side == 0 || self.max_pixels == 0 || self.max_streams == 0 {
            return Err(VideoError::BadRequest(
                "limits.max_side, max_pixels and max_streams must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// Initialises FFmpeg once per process and keeps its own logging to errors that matter (ours
/// are returned as values).
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Registration is automatic in FFmpeg 5; init only sets up what remains.
        let _ = ffmpeg_next::init();
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
    });
}
