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
    /// Keyframes (fast: where they are farther apart than the interval, a tile stands for the
    /// range up to the next keyframe shown) or the exact frame at each tile's middle.
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

/// A tile to make: its time range, and the time of the frame it shows and how it is found.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Planned {
    start_s: f64,
    end_s: f64,
    at_s: f64,
    seek: Seek,
}

/// Tiles from keyframes (`keys`, in order) over the regular `grid` of ranges: each range shows
/// the keyframe in it nearest its middle; a range holding no keyframe is added to the tile
/// before it (the first tile starts at the first range). Keyframes farther apart than the
/// interval so give fewer, longer tiles, each showing a frame of its own range, and no frame is
/// decoded but keyframes. Empty when there is no keyframe at all.
fn from_keyframes(grid: &[(f64, f64)], keys: &[f64]) -> Vec<Planned> {
    let mut tiles: Vec<Planned> = Vec::with_capacity(grid.len());
    let mut first_start = None;
    for &(start_s, end_s) in grid {
        let from = keys.partition_point(|&k| k < start_s);
        let to = keys.partition_point(|&k| k < end_s);
        let middle = (start_s + end_s) / 2.0;
        let nearest = keys[from..to]
            .iter()
            .copied()
            .min_by(|a, b| (a - middle).abs().total_cmp(&(b - middle).abs()));
        match (nearest, tiles.last_mut()) {
            (Some(at_s), _) => tiles.push(Planned {
                start_s: first_start.take().unwrap_or(start_s),
                end_s,
                at_s,
                seek: Seek::Keyframe,
            }),
            (None, Some(last)) => last.end_s = end_s,
            (None, None) => {
                first_start.get_or_insert(start_s);
            }
        }
    }
    tiles
}

/// Makes the storyboard of `video`.
///
/// With `seek: keyframe` the tiles show keyframes only: where keyframes are farther apart than
/// the interval, a tile stands for the whole range up to the next keyframe shown (the WebVTT
/// says so), so the cost is one keyframe decode per tile however long the video. With
/// `seek: accurate` every tile shows the frame at the middle of its range, decoded exactly.
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
    let grid: Vec<(f64, f64)> = (0..count)
        .map(|i| {
            let start_s = f64::from(i) * interval;
            (start_s, (start_s + interval).min(duration))
        })
        .collect();
    let accurate = |&(start_s, end_s): &(f64, f64)| Planned {
        start_s,
        end_s,
        at_s: (start_s + end_s) / 2.0,
        seek: Seek::Accurate,
    };
    let mut plan = match spec.seek {
        Seek::Keyframe => from_keyframes(&grid, &video.keyframe_times()?),
        Seek::Accurate => Vec::new(),
    };
    if plan.is_empty() {
        plan = grid.iter().map(accurate).collect();
    }
    let count = u32::try_from(plan.len()).unwrap_or(u32::MAX);
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
    let mut tiles = Vec::with_capacity(plan.len());
    for (i, p) in (0u32..).zip(&plan) {
        let mut picture = video.frame_at(p.at_s, p.seek)?;
        // A keyframe the index placed in the range but the decoder shows earlier: decode the
        // range's own time instead, so that the tile never shows another range.
        if picture.time_s + 1e-6 < p.start_s {
            picture = video.frame_at(p.at_s, Seek::Accurate)?;
        }
        let image = picture.to_rgb(tw, th)?;
        let (x, y) = ((i % columns) * tw, (i / columns) * th);
        image::imageops::replace(&mut sprite, &image, i64::from(x), i64::from(y));
        tiles.push(Tile {
            start_s: p.start_s,
            end_s: p.end_s,
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
    fn keyframes_farther_apart_than_the_interval_make_longer_tiles_of_their_own_range() {
        let grid: Vec<_> = (0..10).map(|i| (f64::from(i), f64::from(i + 1))).collect();
        // Keyframes at 0.2, 4.5 and 8.4 s: three tiles, 0-4, 4-8, 8-10.
        let plan = from_keyframes(&grid, &[0.2, 4.5, 8.4]);
        let ranges: Vec<_> = plan.iter().map(|p| (p.start_s, p.end_s, p.at_s)).collect();
        assert_eq!(ranges, [(0.0, 4.0, 0.2), (4.0, 8.0, 4.5), (8.0, 10.0, 8.4)]);
        assert!(plan.iter().all(|p| p.seek == Seek::Keyframe));
        // None in the first ranges: the first tile starts at 0 anyway.
        let plan = from_keyframes(&grid, &[2.5, 7.0]);
        let ranges: Vec<_> = plan.iter().map(|p| (p.start_s, p.end_s)).collect();
        assert_eq!(ranges, [(0.0, 7.0), (7.0, 10.0)]);
        // Dense keyframes: one per range, the nearest its middle.
        let keys: Vec<_> = (0..40).map(|i| f64::from(i) * 0.25).collect();
        let plan = from_keyframes(&grid, &keys);
        assert_eq!(plan.len(), 10);
        assert!(
            plan.iter()
                .all(|p| (p.at_s - (p.start_s + 0.5)).abs() <= 0.25)
        );
        assert!(from_keyframes(&grid, &[]).is_empty());
    }

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
