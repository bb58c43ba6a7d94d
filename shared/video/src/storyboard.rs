//! Storyboards: one sprite sheet of small frames taken at a regular interval, and the WebVTT
//! index that maps each time range to its tile (`sprite.jpg#xywh=x,y,w,h`), as video players
//! use for previews while hovering over the timeline.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::{Seek, Video, VideoError};

/// Largest side of a sprite sheet, in pixels.
const MAX_SPRITE_SIDE: u64 = 16_384;

/// What storyboard to make.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoryboardSpec {
    /// Width of a tile in pixels; its height follows the video's aspect.
    pub tile_width: u32,
    /// Tiles per row of the sprite.
    pub columns: u32,
    /// Most tiles; with a long video the interval grows instead.
    pub max_tiles: u32,
    /// Seconds per tile; by default the duration over `max_tiles`, at least 1 s.
    pub interval_s: Option<f64>,
    /// JPEG quality of the sprite.
    pub quality: u8,
    /// Keyframes (fast) or the exact frame at each tile's middle. With keyframes, a tile whose
    /// range holds none is decoded exactly, so that every tile shows its own part of the video.
    pub seek: Seek,
}

impl Default for StoryboardSpec {
    fn default() -> Self {
        Self {
            tile_width: 160,
            columns: 10,
            max_tiles: 100,
            interval_s: None,
            quality: 75,
            seek: Seek::Keyframe,
        }
    }
}

impl StoryboardSpec {
    pub fn check(&self) -> Result<(), VideoError> {
        let bad = |m: &str| Err(VideoError::BadRequest(format!("storyboard: {m}")));
        if !(16..=1024).contains(&self.tile_width) {
            return bad("tile_width must be 16 to 1024");
        }
        if !(1..=100).contains(&self.columns) || !(1..=1000).contains(&self.max_tiles) {
            return bad("columns must be 1 to 100 and max_tiles 1 to 1000");
        }
        if self
            .interval_s
            .is_some_and(|i| !(i.is_finite() && i >= 0.1))
        {
            return bad("interval_s must be at least 0.1");
        }
        Ok(())
    }
}

/// A tile: the time range it stands for and where it is in the sprite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tile {
    pub start_s: f64,
    pub end_s: f64,
    /// When the frame shown in it was presented.
    pub frame_s: f64,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// A made storyboard.
#[derive(Clone, Debug)]
pub struct Storyboard {
    /// The sprite, as JPEG.
    pub sprite: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub tiles: Vec<Tile>,
}

impl Storyboard {
    /// The WebVTT index, each cue pointing into `sprite_url`.
    pub fn vtt(&self, sprite_url: &str) -> String {
        let mut out = String::from("WEBVTT\n");
        for t in &self.tiles {
            out.push_str(&format!(
                "\n{} --> {}\n{sprite_url}#xywh={},{},{},{}\n",
                clock(t.start_s),
                clock(t.end_s),
                t.x,
                t.y,
                t.width,
                t.height
            ));
        }
        out
    }
}

/// `HH:MM:SS.mmm`, as WebVTT wants.
fn clock(seconds: f64) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Makes the storyboard of `video`.
pub fn storyboard(video: &mut Video, spec: &StoryboardSpec) -> Result<Storyboard, VideoError> {
    spec.check()?;
    let duration = video.probe().duration_s;
    let interval = spec
        .interval_s
        .unwrap_or((duration / f64::from(spec.max_tiles)).max(1.0));
    let mut count = (duration / interval).ceil().max(1.0) as u32;
    let interval = if count > spec.max_tiles {
        count = spec.max_tiles;
        duration / f64::from(count)
    } else {
        interval
    };
    let (dw, dh) = (
        video.probe().video.display_width,
        video.probe().video.display_height,
    );
    let tw = spec.tile_width;
    let th = ((f64::from(tw) * f64::from(dh) / f64::from(dw)).round() as u32).clamp(1, 4 * tw);
    let columns = spec.columns.min(count);
    let rows = count.div_ceil(columns);
    // JPEG's own bound is 65535 px a side; a sheet this big is a mistake in the spec.
    if u64::from(tw) * u64::from(columns) > MAX_SPRITE_SIDE
        || u64::from(th) * u64::from(rows) > MAX_SPRITE_SIDE
    {
        return Err(VideoError::BadRequest(format!(
            "storyboard: a sprite of {columns}x{rows} tiles of {tw}x{th} px is over {MAX_SPRITE_SIDE} px a side"
        )));
    }
    let mut sprite = RgbImage::new(tw * columns, th * rows);
    let mut tiles = Vec::with_capacity(count as usize);
    for i in 0..count {
        let start_s = f64::from(i) * interval;
        let end_s = (start_s + interval).min(duration);
        let middle = (start_s + end_s) / 2.0;
        let mut picture = video.frame_at(middle, spec.seek)?;
        // A keyframe from before the tile's range (keyframes far apart) would show an earlier
        // part of the video: decode to the tile's own time instead.
        if spec.seek == Seek::Keyframe && picture.time_s + 1e-6 < start_s {
            picture = video.frame_at(middle, Seek::Accurate)?;
        }
        let image = picture.to_rgb(tw, th)?;
        let (x, y) = ((i % columns) * tw, (i / columns) * th);
        image::imageops::replace(&mut sprite, &image, i64::from(x), i64::from(y));
        tiles.push(Tile {
            start_s,
            end_s,
            frame_s: picture.time_s,
            x,
            y,
            width: tw,
            height: th,
        });
    }
    Ok(Storyboard {
        sprite: crate::encode::jpeg(&sprite, spec.quality)?,
        width: sprite.width(),
        height: sprite.height(),
        tiles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtt_cues_use_clock_times_and_media_fragments() {
        let board = Storyboard {
            sprite: Vec::new(),
            width: 320,
            height: 90,
            tiles: vec![
                Tile {
                    start_s: 0.0,
                    end_s: 5.0,
                    frame_s: 2.5,
                    x: 0,
                    y: 0,
                    width: 160,
                    height: 90,
                },
                Tile {
                    start_s: 5.0,
                    end_s: 3725.5,
                    frame_s: 7.5,
                    x: 160,
                    y: 0,
                    width: 160,
                    height: 90,
                },
            ],
        };
        assert_eq!(
            board.vtt("sb.jpg"),
            "WEBVTT\n\n00:00:00.000 --> 00:00:05.000\nsb.jpg#xywh=0,0,160,90\n\n\
             00:00:05.000 --> 01:02:05.500\nsb.jpg#xywh=160,0,160,90\n"
        );
    }
}
