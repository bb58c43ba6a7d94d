//! Which frames to take: planned times (N evenly spaced, every T seconds, explicit offsets) or
//! picked by content (representative frames, scene changes).

use serde::{Deserialize, Serialize};

use crate::picture::{Picture, histogram_distance};
use crate::{Seek, Video, VideoError};

/// Most frames one selection may take.
pub const MAX_FRAMES: usize = 1000;
/// Most frames a selection by content may take: they are held until the choice is made.
pub const MAX_PICKED: usize = 100;
/// Frames per second looked at when searching for scene changes.
const SCENE_SAMPLES_PER_S: f64 = 4.0;

/// How frames are chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// `count` frames evenly spaced, the first and last a gap away from the ends (black
    /// openings and credits are at the ends). Like every planned strategy it takes what the seek
    /// mode finds: with keyframe seeking, times within one keyframe interval give that keyframe.
    Count { count: u32 },
    /// A frame every `every_s` seconds, from the start.
    Interval { every_s: f64 },
    /// Frames at the given offsets: seconds (`12.5`, `"12.5s"`, `"1:02.5"`) or percent of the
    /// duration (`"25%"`).
    Offsets { at: Vec<Offset> },
    /// `count` frames, one per equal stretch of the video, each the best of a few candidates:
    /// black, blank (one flat colour) and blurred frames are passed over.
    Representative { count: u32 },
    /// Up to `count` frames where the picture changes most (histogram distance over
    /// `threshold`, 0 to 1), plus the opening scene.
    Scenes {
        count: u32,
        #[serde(default = "default_threshold")]
        threshold: f64,
    },
}

fn default_threshold() -> f64 {
    0.3
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Count { count: 10 }
    }
}

/// A point in a video: seconds from the start, or a percentage of the duration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "OffsetText", into = "OffsetText")]
pub enum Offset {
    Seconds(f64),
    Percent(f64),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum OffsetText {
    Number(f64),
    Text(String),
}

impl TryFrom<OffsetText> for Offset {
    type Error = String;

    fn try_from(value: OffsetText) -> Result<Self, String> {
        match value {
            OffsetText::Number(s) => Offset::seconds(s),
            OffsetText::Text(t) => t.parse(),
        }
    }
}

impl From<Offset> for OffsetText {
    fn from(value: Offset) -> Self {
        match value {
            Offset::Seconds(s) => OffsetText::Number(s),
            Offset::Percent(p) => OffsetText::Text(format!("{p}%")),
        }
    }
}

impl Offset {
    fn seconds(s: f64) -> Result<Self, String> {
        if s.is_finite() && s >= 0.0 {
            Ok(Offset::Seconds(s))
        } else {
            Err(format!("offset {s} is not a time (seconds from 0)"))
        }
    }

    /// Seconds from the start in a video of `duration` seconds.
    pub fn at(self, duration: f64) -> f64 {
        match self {
            Offset::Seconds(s) => s,
            Offset::Percent(p) => duration * p / 100.0,
        }
    }
}

impl std::str::FromStr for Offset {
    type Err = String;

    /// `12.5`, `12.5s`, `1:02.5`, `01:02:03.25` or `25%`.
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let bad = || {
            format!(
                "`{text}` is not an offset (seconds like 12.5, 1:02.5, or a percentage like 25%)"
            )
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            return if (0.0..=100.0).contains(&p) {
                Ok(Offset::Percent(p))
            } else {
                Err(format!("`{text}`: a percentage must be 0 to 100"))
            };
        }
        let t = t.strip_suffix('s').unwrap_or(t);
        let mut seconds = 0.0;
        let parts: Vec<&str> = t.split(':').collect();
        if parts.len() > 3 {
            return Err(bad());
        }
        for (i, part) in parts.iter().enumerate() {
            let v: f64 = part.trim().parse().map_err(|_| bad())?;
            if i + 1 < parts.len() && (v.fract() != 0.0 || v < 0.0) {
                return Err(bad());
            }
            seconds = seconds * 60.0 + v;
        }
        Offset::seconds(seconds).map_err(|_| bad())
    }
}

impl Strategy {
    /// Checks the numbers before any work.
    pub fn check(&self) -> Result<(), VideoError> {
        let bad = |m: String| Err(VideoError::BadRequest(m));
        match self {
            Strategy::Count { count }
            | Strategy::Representative { count }
            | Strategy::Scenes { count, .. }
                if *count == 0 || *count as usize > MAX_FRAMES =>
            {
                bad(format!("count must be 1 to {MAX_FRAMES}, not {count}"))
            }
            Strategy::Interval { every_s } if !(every_s.is_finite() && *every_s >= 0.01) => {
                bad(format!("every_s must be at least 0.01 s, not {every_s}"))
            }
            Strategy::Offsets { at } if at.is_empty() || at.len() > MAX_FRAMES => {
                bad(format!("offsets: give 1 to {MAX_FRAMES}"))
            }
            Strategy::Representative { count } | Strategy::Scenes { count, .. }
                if *count as usize > MAX_PICKED =>
            {
                bad(format!(
                    "frames chosen by content: count must be 1 to {MAX_PICKED}, not {count}"
                ))
            }
            Strategy::Scenes { threshold, .. } if !(0.0..=1.0).contains(threshold) => {
                bad(format!("scene threshold must be 0 to 1, not {threshold}"))
            }
            _ => Ok(()),
        }
    }

    /// The times (seconds) a planned strategy takes frames at in a video of `duration` seconds;
    /// `None` for the strategies that choose by content.
    pub fn planned_times(&self, duration: f64) -> Result<Option<Vec<f64>>, VideoError> {
        self.check()?;
        let times = match self {
            Strategy::Count { count } => {
                let n = f64::from(*count);
                (1..=*count)
                    .map(|i| duration * f64::from(i) / (n + 1.0))
                    .collect()
            }
            Strategy::Interval { every_s } => {
                let n = (duration / every_s).ceil().max(1.0);
                if n as usize > MAX_FRAMES {
                    return Err(VideoError::BadRequest(format!(
                        "a frame every {every_s} s of {duration:.1} s is {n} frames, over {MAX_FRAMES}"
                    )));
                }
                (0..n as usize)
                    .map(|i| i as f64 * every_s)
                    .filter(|t| *t < duration)
                    .collect()
            }
            Strategy::Offsets { at } => {
                let mut times = Vec::with_capacity(at.len());
                for o in at {
                    let t = o.at(duration);
                    if t > duration {
                        return Err(VideoError::BadRequest(format!(
                            "offset {t:.3} s is past the end ({duration:.3} s)"
                        )));
                    }
                    times.push(t);
                }
                times
            }
            Strategy::Representative { .. } | Strategy::Scenes { .. } => return Ok(None),
        };
        Ok(Some(times))
    }
}

/// The frames `strategy` chooses, in time order, found with `seek`.
pub fn select(
    video: &mut Video,
    strategy: &Strategy,
    seek: Seek,
) -> Result<Vec<Picture>, VideoError> {
    let mut frames = Vec::new();
    select_each(video, strategy, seek, |p| {
        frames.push(p);
        Ok(())
    })?;
    Ok(frames)
}

/// Hands each frame `strategy` chooses to `visit`, in time order, as soon as it is known: frames
/// at planned times are never held together (a thousand 8K frames would not fit in memory);
/// frames chosen by content (at most [`MAX_PICKED`]) are handed over once chosen. The job's
/// time limit is checked after each.
pub fn select_each(
    video: &mut Video,
    strategy: &Strategy,
    seek: Seek,
    mut visit: impl FnMut(Picture) -> Result<(), VideoError>,
) -> Result<(), VideoError> {
    let duration = video.probe().duration_s;
    let picked = match strategy.planned_times(duration)? {
        Some(mut times) => {
            // In time order, so that the demuxer mostly moves forward.
            times.sort_by(f64::total_cmp);
            for t in times {
                visit(video.frame_at(t, seek)?)?;
                video.check_time()?;
            }
            return Ok(());
        }
        None => match strategy {
            Strategy::Representative { count } => representative(video, *count, seek)?,
            Strategy::Scenes { count, threshold } => scenes(video, *count, *threshold)?,
            _ => unreachable!("planned strategies return above"),
        },
    };
    for p in picked {
        visit(p)?;
        video.check_time()?;
    }
    Ok(())
}

/// One frame per stretch: the best scoring of three candidates in it; when all three are black or
/// blank, later positions are tried. Frames are distinct: where keyframe seeking would give a
/// frame already taken, the candidate is decoded exactly.
fn representative(video: &mut Video, count: u32, seek: Seek) -> Result<Vec<Picture>, VideoError> {
    let duration = video.probe().duration_s;
    let slot = duration / f64::from(count);
    let mut chosen: Vec<Picture> = Vec::new();
    for i in 0..count {
        let start = slot * f64::from(i);
        let mut positions: Vec<f64> = [0.5, 0.2, 0.8].iter().map(|f| start + slot * f).collect();
        // Further on, for a stretch that is all black or blank.
        let step = (slot / 2.0).max(video.frame_interval());
        positions.extend(
            (1..=8)
                .map(|k| start + slot + step * f64::from(k))
                .filter(|t| *t < duration),
        );
        let mut best: Option<(f64, Picture)> = None;
        for (n, t) in positions.into_iter().enumerate() {
            if n >= 3 && best.as_ref().is_some_and(|(score, _)| *score > 0.0) {
                break;
            }
            let taken = |p: &Picture| {
                chosen.iter().any(|c| (c.time_s - p.time_s).abs() < 1e-6)
                    || best
                        .as_ref()
                        .is_some_and(|(_, b)| (b.time_s - p.time_s).abs() < 1e-6)
            };
            let mut p = video.frame_at(t, seek)?;
            // Keyframes far apart (one per clip, in short ones) would give the same frame for
            // every stretch: decode to the time itself instead.
            if taken(&p) && seek == Seek::Keyframe {
                p = video.frame_at(t, Seek::Accurate)?;
            }
            if taken(&p) {
                continue;
            }
            let score = p.stats()?.score();
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, p));
            }
        }
        if let Some((_, p)) = best {
            chosen.push(p);
        }
    }
    chosen.sort_by(|a, b| a.time_s.total_cmp(&b.time_s));
    if chosen.is_empty() {
        return Err(VideoError::NoFrame("anywhere in the video".into()));
    }
    Ok(chosen)
}

/// Frames where the picture changes most: the whole video is decoded (non-reference frames
/// skipped) and sampled a few times a second.
fn scenes(video: &mut Video, count: u32, threshold: f64) -> Result<Vec<Picture>, VideoError> {
    let gap = 1.0 / SCENE_SAMPLES_PER_S;
    let mut last: Option<(f64, Vec<u8>)> = None;
    let mut opening: Option<Picture> = None;
    // (distance, picture), the `count` largest.
    let mut cuts: Vec<(f64, Picture)> = Vec::new();
    video.scan(0.0, true, |p| {
        if last.as_ref().is_some_and(|(t, _)| p.time_s < t + gap) {
            return Ok(true);
        }
        let grey = p.grey_small()?;
        match &last {
            None => {
                last = Some((p.time_s, grey));
                opening = Some(p);
            }
            Some((_, previous)) => {
                let d = histogram_distance(previous, &grey);
                last = Some((p.time_s, grey));
                if d >= threshold {
                    cuts.push((d, p));
                    cuts.sort_by(|a, b| b.0.total_cmp(&a.0));
                    cuts.truncate(count as usize);
                }
            }
        }
        Ok(true)
    })?;
    let mut frames: Vec<Picture> = cuts.into_iter().map(|(_, p)| p).collect();
    if (frames.len() as u32) < count {
        frames.extend(opening);
    }
    if frames.is_empty() {
        return Err(VideoError::NoFrame("anywhere in the video".into()));
    }
    frames.sort_by(|a, b| a.time_s.total_cmp(&b.time_s));
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_from_seconds_clock_times_and_percentages() {
        assert_eq!("12.5".parse(), Ok(Offset::Seconds(12.5)));
        assert_eq!("12.5s".parse(), Ok(Offset::Seconds(12.5)));
        assert_eq!("1:02.5".parse(), Ok(Offset::Seconds(62.5)));
        assert_eq!("01:00:01".parse(), Ok(Offset::Seconds(3601.0)));
        assert_eq!("25%".parse(), Ok(Offset::Percent(25.0)));
        assert!("150%".parse::<Offset>().is_err());
        assert!("-3".parse::<Offset>().is_err());
        assert!("1:2:3:4".parse::<Offset>().is_err());
        assert!("soon".parse::<Offset>().is_err());
        let parsed: Strategy =
            serde_json::from_str(r#"{"strategy":"offsets","at":[3,"50%","0:04"]}"#).unwrap();
        assert_eq!(
            parsed,
            Strategy::Offsets {
                at: vec![
                    Offset::Seconds(3.0),
                    Offset::Percent(50.0),
                    Offset::Seconds(4.0)
                ]
            }
        );
    }

    #[test]
    fn planned_times_are_spread_and_bounded() {
        let t = Strategy::Count { count: 4 }
            .planned_times(10.0)
            .unwrap()
            .unwrap();
        assert_eq!(t, vec![2.0, 4.0, 6.0, 8.0]);
        let t = Strategy::Interval { every_s: 3.0 }
            .planned_times(10.0)
            .unwrap()
            .unwrap();
        assert_eq!(t, vec![0.0, 3.0, 6.0, 9.0]);
        let t = Strategy::Offsets {
            at: vec![Offset::Percent(50.0), Offset::Seconds(1.0)],
        }
        .planned_times(10.0)
        .unwrap()
        .unwrap();
        assert_eq!(t, vec![5.0, 1.0]);
        assert!(
            Strategy::Offsets {
                at: vec![Offset::Seconds(11.0)]
            }
            .planned_times(10.0)
            .is_err()
        );
        assert!(
            Strategy::Interval { every_s: 0.001 }
                .planned_times(10.0)
                .is_err()
        );
        assert!(
            Strategy::Interval { every_s: 0.01 }
                .planned_times(3600.0)
                .is_err()
        );
        assert!(Strategy::Count { count: 0 }.planned_times(10.0).is_err());
        assert_eq!(
            Strategy::Representative { count: 3 }
                .planned_times(10.0)
                .unwrap(),
            None
        );
    }
}
