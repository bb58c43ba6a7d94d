//! A decoded frame, and what is made of it: upright RGB at a size (swscale, then a quarter turn if
//! the stream says so) and the grey statistics that tell black, blank and blurred frames apart.

use ffmpeg_next::format::Pixel;
use ffmpeg_next::software::scaling;
use ffmpeg_next::util::frame;
use image::RgbImage;
use mediaflow_imaging::Small;

use crate::VideoError;

/// One decoded frame of the video stream.
#[derive(Clone)]
pub struct Picture {
    frame: frame::Video,
    /// Presentation time, in seconds from the start of the stream.
    pub time_s: f64,
    /// Whether it is a keyframe.
    pub keyframe: bool,
    /// Clockwise quarter turns that make it upright: 0, 90, 180 or 270.
    pub rotation: u32,
}

impl std::fmt::Debug for Picture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picture")
            .field("time_s", &self.time_s)
            .field("keyframe", &self.keyframe)
            .field("size", &(self.frame.width(), self.frame.height()))
            .field("rotation", &self.rotation)
            .finish()
    }
}

/// A frame made into an upright RGB image, with when it was shown.
#[derive(Clone, Debug)]
pub struct Still {
    pub time_s: f64,
    pub keyframe: bool,
    pub image: RgbImage,
}

/// Grey-level statistics of a small copy of a frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Mean grey level, 0 to 255.
    pub mean: f64,
    /// Standard deviation of the grey level.
    pub stddev: f64,
    /// Variance of the Laplacian: low when blurred.
    pub sharpness: f64,
}

/// Below this mean grey level a frame is black.
const BLACK_MEAN: f64 = 32.0;
/// Below this deviation a frame is one flat colour (a blank card, a fade).
const BLANK_STDDEV: f64 = 10.0;

impl Stats {
    /// Black or one flat colour: never a representative frame.
    pub fn is_empty(&self) -> bool {
        self.mean < BLACK_MEAN || self.stddev < BLANK_STDDEV
    }

    /// How good a thumbnail it makes: contrast times detail; 0 when empty.
    pub fn score(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.stddev.min(64.0) * self.sharpness.sqrt()
        }
    }
}

impl Picture {
    pub(crate) fn new(frame: frame::Video, time_s: f64, keyframe: bool, rotation: u32) -> Self {
        Self {
            frame,
            time_s,
            keyframe,
            rotation,
        }
    }

    /// Bytes of pixel data it holds (every plane).
    pub(crate) fn pixel_bytes(&self) -> usize {
        (0..self.frame.planes())
            .map(|i| self.frame.data(i).len())
            .sum()
    }

    /// The size it is shown at: turned a quarter, width and height swap.
    pub fn display_size(&self) -> (u32, u32) {
        let (w, h) = (self.frame.width(), self.frame.height());
        if self.rotation % 180 == 90 {
            (h, w)
        } else {
            (w, h)
        }
    }

    /// Upright RGB of exactly `width` x `height` (display orientation).
    pub fn to_rgb(&self, width: u32, height: u32) -> Result<RgbImage, VideoError> {
        let (w, h) = if self.rotation % 180 == 90 {
            (height, width)
        } else {
            (width, height)
        };
        let rgb = self.scale(Pixel::RGB24, w, h, 3)?;
        let image = RgbImage::from_raw(w, h, rgb)
            .ok_or_else(|| VideoError::Internal("scaled frame has the wrong size".into()))?;
        Ok(match self.rotation {
            90 => image::imageops::rotate90(&image),
            180 => image::imageops::rotate180(&image),
            270 => image::imageops::rotate270(&image),
            _ => image,
        })
    }

    /// Upright RGB fitting in a `max_w` x `max_h` box, aspect kept, never upscaled.
    pub fn fit(&self, max_w: u32, max_h: u32) -> Result<RgbImage, VideoError> {
        let (w, h) = fit_size(self.display_size(), (max_w, max_h));
        self.to_rgb(w, h)
    }

    /// The frame as a still fitting in `max_w` x `max_h`.
    pub fn still(&self, max_w: u32, max_h: u32) -> Result<Still, VideoError> {
        Ok(Still {
            time_s: self.time_s,
            keyframe: self.keyframe,
            image: self.fit(max_w, max_h)?,
        })
    }

    /// The frame at `size` with the display size recorded, for cutting renditions from.
    pub fn small(&self, size: (u32, u32)) -> Result<Small, VideoError> {
        let (sw, sh) = self.display_size();
        Ok(Small {
            image: image::DynamicImage::ImageRgb8(self.to_rgb(size.0, size.1)?),
            source_width: sw,
            source_height: sh,
        })
    }

    /// Grey statistics of a copy at most 96 px wide.
    pub fn stats(&self) -> Result<Stats, VideoError> {
        let (w, h) = fit_size((self.frame.width(), self.frame.height()), (96, 96));
        let grey = self.scale(Pixel::GRAY8, w, h, 1)?;
        Ok(stats(&grey, w as usize, h as usize))
    }

    /// A tightly packed copy in `format` (`bytes_per_pixel` each) at `w` x `h`.
    fn scale(
        &self,
        format: Pixel,
        w: u32,
        h: u32,
        bytes_per_pixel: usize,
    ) -> Result<Vec<u8>, VideoError> {
        let src = &self.frame;
        let mut scaler = scaling::Context::get(
            src.format(),
            src.width(),
            src.height(),
            format,
            w.max(1),
            h.max(1),
            scaling::Flags::AREA,
        )
        .map_err(|e| {
            VideoError::Unreadable(format!(
                "frames in pixel format {:?} cannot be converted: {e}",
                src.format()
            ))
        })?;
        let mut out = frame::Video::empty();
        scaler
            .run(src, &mut out)
            .map_err(|e| VideoError::Internal(format!("scaling: {e}")))?;
        let row = w as usize * bytes_per_pixel;
        let stride = out.stride(0);
        let data = out.data(0);
        let mut packed = Vec::with_capacity(row * h as usize);
        for y in 0..h as usize {
            packed.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        Ok(packed)
    }
}

/// `size` scaled to fit in `bounds`, aspect kept, never upscaled, at least 1 px.
pub fn fit_size(size: (u32, u32), bounds: (u32, u32)) -> (u32, u32) {
    let (w, h) = (f64::from(size.0.max(1)), f64::from(size.1.max(1)));
    let s = (f64::from(bounds.0) / w)
        .min(f64::from(bounds.1) / h)
        .min(1.0);
    (
        ((w * s).round() as u32).max(1),
        ((h * s).round() as u32).max(1),
    )
}

/// Mean, deviation and Laplacian variance of a `w` x `h` grey image.
pub(crate) fn stats(grey: &[u8], w: usize, h: usize) -> Stats {
    let n = (w * h).max(1) as f64;
    let mean = grey.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = grey
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let mut lap = Vec::with_capacity(w.saturating_sub(2) * h.saturating_sub(2));
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let at = |dx: isize, dy: isize| {
                f64::from(grey[(y as isize + dy) as usize * w + (x as isize + dx) as usize])
            };
            lap.push(at(-1, 0) + at(1, 0) + at(0, -1) + at(0, 1) - 4.0 * at(0, 0));
        }
    }
    let sharpness = if lap.is_empty() {
        0.0
    } else {
        let m = lap.iter().sum::<f64>() / lap.len() as f64;
        lap.iter().map(|v| (v - m).powi(2)).sum::<f64>() / lap.len() as f64
    };
    Stats {
        mean,
        stddev: var.sqrt(),
        sharpness,
    }
}

/// Grey histogram distance of two equally sized grey images: half the L1 distance of their
/// 32-bin histograms, 0 (same) to 1 (disjoint).
pub(crate) fn histogram_distance(a: &[u8], b: &[u8]) -> f64 {
    let hist = |g: &[u8]| {
        let mut h = [0f64; 32];
        for &v in g {
            h[usize::from(v >> 3)] += 1.0;
        }
        let n = g.len().max(1) as f64;
        h.map(|c| c / n)
    };
    let (ha, hb) = (hist(a), hist(b));
    ha.iter().zip(&hb).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0
}

impl Picture {
    /// A small grey copy (at most 64 px wide) for comparing frames.
    pub(crate) fn grey_small(&self) -> Result<Vec<u8>, VideoError> {
        self.scale(Pixel::GRAY8, 64, 36, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn black_flat_and_detailed_frames_are_told_apart() {
        let black = stats(&[16u8; 64 * 36], 64, 36);
        assert!(black.is_empty() && black.score() == 0.0);
        let flat = stats(&[120u8; 64 * 36], 64, 36);
        assert!(flat.is_empty());
        let checks: Vec<u8> = (0..64 * 36)
            .map(|i| {
                if (i % 64 / 8 + i / 64 / 8) % 2 == 0 {
                    30
                } else {
                    220
                }
            })
            .collect();
        let detailed = stats(&checks, 64, 36);
        assert!(
            !detailed.is_empty() && detailed.score() > 0.0,
            "{detailed:?}"
        );
        // A blurred copy of the same scores lower.
        let blurred: Vec<u8> = (0..64 * 36)
            .map(|i| {
                let (x, y) = (i % 64, i / 64);
                let near: Vec<u32> = [(0i32, 0i32), (1, 0), (-1, 0), (0, 1), (0, -1)]
                    .iter()
                    .map(|&(dx, dy)| {
                        let (nx, ny) = ((x + dx).clamp(0, 63), (y + dy).clamp(0, 35));
                        u32::from(checks[(ny * 64 + nx) as usize])
                    })
                    .collect();
                (near.iter().sum::<u32>() / 5) as u8
            })
            .collect();
        assert!(stats(&blurred, 64, 36).score() < detailed.score());
    }

    #[test]
    fn sizes_fit_without_upscaling() {
        assert_eq!(fit_size((1920, 1080), (320, 320)), (320, 180));
        assert_eq!(fit_size((1080, 1920), (320, 320)), (180, 320));
        assert_eq!(fit_size((100, 50), (320, 320)), (100, 50));
        assert_eq!(fit_size((321, 241), (160, 160)), (160, 120));
    }

    #[test]
    fn histograms_measure_change() {
        let a = vec![10u8; 100];
        let b = vec![250u8; 100];
        assert_eq!(histogram_distance(&a, &a), 0.0);
        assert_eq!(histogram_distance(&a, &b), 1.0);
    }
}
