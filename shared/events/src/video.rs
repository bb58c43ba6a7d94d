//! `mediaflow.video.processed`: what the video stage made of a video.

use serde::{Deserialize, Serialize};

use crate::EventData;
use crate::media::{ObjectRef, RenditionRef, deterministic_id};

/// `mediaflow.video.processed`: the video stage probed a video and wrote its thumbnails,
/// storyboard and animated preview (a result event, on `videos.processed`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoProcessed {
    pub media_id: String,
    /// Lineage: the stage, its version, and the input it read.
    pub stage: String,
    pub stage_version: String,
    pub input: ObjectRef,
    /// What the video is: format, duration, video stream (codec, size, rotation, frame rate),
    /// every stream. Also stored as the `probe` result (`probe.json`).
    pub probe: serde_json::Value,
    /// How the frames were chosen (`count`, `interval`, `offsets`, `representative`, `scenes`)
    /// and sought (`keyframe` or `accurate`).
    pub strategy: String,
    pub seek: String,
    /// The chosen frames, in time order, each in every configured rendition.
    pub frames: Vec<VideoFrame>,
    pub storyboard: Option<StoryboardRef>,
    pub preview: Option<PreviewRef>,
}

/// One chosen frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoFrame {
    /// Presentation time, seconds from the start of the video stream.
    pub time_s: f64,
    pub keyframe: bool,
    pub renditions: Vec<RenditionRef>,
}

/// A storyboard: the sprite and its WebVTT index (whose cues point at the sprite by its file
/// name, beside it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoryboardRef {
    pub sprite: ObjectRef,
    pub vtt: ObjectRef,
    pub width: u32,
    pub height: u32,
    pub tiles: u32,
    pub tile_width: u32,
    pub tile_height: u32,
    pub interval_s: f64,
}

/// An animated preview.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviewRef {
    pub object: ObjectRef,
    /// `webp` or `gif`.
    pub format: String,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub start_s: f64,
    pub duration_s: f64,
}

impl EventData for VideoProcessed {
    const TYPE: &'static str = "mediaflow.video.processed";

    fn subject(&self) -> String {
        self.media_id.clone()
    }

    fn id(&self) -> String {
        deterministic_id(&[Self::TYPE, &self.media_id, &self.stage, &self.stage_version])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn video_processed() -> VideoProcessed {
        let object = |key: &str, content_type: &str| ObjectRef {
            bucket: "media".into(),
            key: key.into(),
            size: 1234,
            sha256: "ab".repeat(32),
            content_type: content_type.into(),
        };
        VideoProcessed {
            media_id: "0190c0de-0000-7000-8000-000000000002".into(),
            stage: "video-worker".into(),
            stage_version: "1".into(),
            input: object("uploads/x/original.mp4", "video/mp4"),
            probe: serde_json::json!({
                "format": "mov,mp4,m4a,3gp,3g2,mj2", "duration_s": 5.3, "bit_rate": 1589000,
                "size_bytes": 1055736,
                "video": {"index": 0, "codec": "h264", "width": 1280, "height": 720,
                          "display_width": 1280, "display_height": 720, "rotation": 0,
                          "frame_rate": 25.0, "variable_frame_rate": false, "frames": 132,
                          "duration_s": 5.28, "pixel_format": "yuv420p"},
                "streams": [{"index": 0, "kind": "video", "codec": "h264"},
                            {"index": 1, "kind": "audio", "codec": "aac"}]
            }),
            strategy: "representative".into(),
            seek: "keyframe".into(),
            frames: vec![VideoFrame {
                time_s: 1.2,
                keyframe: true,
                renditions: vec![RenditionRef {
                    name: "thumb-320".into(),
                    object: object("derived/x/frame-01-thumb-320.jpg", "image/jpeg"),
                    width: 320,
                    height: 180,
                    mode: "fit".into(),
                    format: "jpeg".into(),
                }],
            }],
            storyboard: Some(StoryboardRef {
                sprite: object("derived/x/storyboard.jpg", "image/jpeg"),
                vtt: object("derived/x/storyboard.vtt", "text/vtt"),
                width: 1600,
                height: 90,
                tiles: 6,
                tile_width: 160,
                tile_height: 90,
                interval_s: 1.0,
            }),
            preview: None,
        }
    }

    #[test]
    fn ids_are_deterministic_per_stage_version() {
        let a = video_processed();
        assert_eq!(a.id(), video_processed().id());
        let mut b = video_processed();
        b.stage_version = "2".into();
        assert_ne!(a.id(), b.id());
    }
}
