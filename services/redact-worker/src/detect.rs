//! Detection with OpenCV's `CascadeClassifier`, and blurring what it found.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use image::{DynamicImage, RgbImage, imageops};
use mediaflow_events::Detection;
use mediaflow_runtime::StageError;
use opencv::core::{Mat, Rect, Size, Vector};
use opencv::prelude::*;
use opencv::{imgproc, objdetect};
use serde::{Deserialize, Serialize};

use crate::Redacted;

/// A label and the cascade file that finds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSpec {
    pub label: String,
    /// A file under `cascades_dir` (OpenCV's cascade XML).
    pub cascade: String,
}

/// The cascades and how they are run; cheap to clone, usable from any thread (each thread loads
/// its own classifiers once: the process's CPU threads, one per core, live as long as it).
#[derive(Clone, Debug)]
pub struct Detector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cascades: Vec<(String, PathBuf)>,
    scale_factor: f64,
    min_neighbors: i32,
    min_size: u32,
    max_side: u32,
}

thread_local! {
    /// This thread's classifiers, by cascade file: loading one parses megabytes of XML.
    static CLASSIFIERS: RefCell<HashMap<PathBuf, objdetect::CascadeClassifier>> =
        RefCell::new(HashMap::new());
}

fn cv(what: &str) -> impl FnOnce(opencv::Error) -> StageError + '_ {
    move |e| StageError::permanent(format!("OpenCV {what}: {e}"))
}

impl Detector {
    pub fn new(
        cascades: Vec<(String, PathBuf)>,
        scale_factor: f64,
        min_neighbors: i32,
        min_size: u32,
        max_side: u32,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cascades,
                scale_factor,
                min_neighbors,
                min_size,
                max_side,
            }),
        }
    }

    /// Every box each cascade finds in `rgb`, in its pixels; boxes of one label in OpenCV's order.
    pub fn detect(&self, rgb: &RgbImage) -> Result<Vec<Detection>, StageError> {
        let d = &*self.inner;
        let (width, height) = rgb.dimensions();
        let flat = Mat::from_slice(rgb.as_raw()).map_err(cv("wrapping the pixels"))?;
        let pixels = flat
            .reshape(3, height as i32)
            .map_err(cv("shaping the pixels"))?;
        let mut grey = Mat::default();
        imgproc::cvt_color_def(&pixels, &mut grey, imgproc::COLOR_RGB2GRAY)
            .map_err(cv("converting to grey"))?;
        // Searched at most `max_side` wide or high; boxes are scaled back.
        let longest = width.max(height);
        let scale = if longest > d.max_side {
            f64::from(longest) / f64::from(d.max_side)
        } else {
            1.0
        };
        if scale > 1.0 {
            let mut small = Mat::default();
            let size = Size::new(
                (f64::from(width) / scale).round().max(1.0) as i32,
                (f64::from(height) / scale).round().max(1.0) as i32,
            );
            imgproc::resize(&grey, &mut small, size, 0.0, 0.0, imgproc::INTER_AREA)
                .map_err(cv("resizing"))?;
            grey = small;
        }
        let mut equalised = Mat::default();
        imgproc::equalize_hist(&grey, &mut equalised).map_err(cv("equalising"))?;

        let mut found = Vec::new();
        CLASSIFIERS.with(|cell| {
            let mut classifiers = cell.borrow_mut();
            for (label, path) in &d.cascades {
                let classifier = match classifiers.get_mut(path) {
                    Some(c) => c,
                    None => {
                        let file = path.display();
                        let c = objdetect::CascadeClassifier::new(path)
                            .map_err(cv("loading a cascade"))?;
                        if c.empty().map_err(cv("loading a cascade"))? {
                            return Err(StageError::permanent(format!(
                                "OpenCV could not read the cascade {file}"
                            )));
                        }
                        classifiers.entry(path.clone()).or_insert(c)
                    }
                };
                let mut boxes: Vector<Rect> = Vector::new();
                let min = d.min_size as i32;
                classifier
                    .detect_multi_scale(
                        &equalised,
                        &mut boxes,
                        d.scale_factor,
                        d.min_neighbors,
                        0,
                        Size::new(min, min),
                        Size::new(0, 0),
                    )
                    .map_err(cv("detecting"))?;
                for r in boxes {
                    found.push(scaled(label, r, scale, width, height));
                }
            }
            Ok::<_, StageError>(())
        })?;
        Ok(found)
    }
}

/// A box found at 1/`scale` size, in the full image's pixels, clipped to it.
fn scaled(label: &str, r: Rect, scale: f64, width: u32, height: u32) -> Detection {
    let at = |v: i32| (f64::from(v.max(0)) * scale).round() as u32;
    let x = at(r.x).min(width.saturating_sub(1));
    let y = at(r.y).min(height.saturating_sub(1));
    Detection {
        label: label.to_owned(),
        x,
        y,
        width: at(r.width).clamp(1, width - x),
        height: at(r.height).clamp(1, height - y),
    }
}

/// Finds every box in `image` and blurs it (a box blur strong enough that nothing in it stays
/// recognisable); pixels outside the boxes are left exactly as they were.
pub fn detect_and_blur(detector: &Detector, image: DynamicImage) -> Result<Redacted, StageError> {
    let mut rgb = image.into_rgb8();
    let detections = detector.detect(&rgb)?;
    for d in &detections {
        let patch = imageops::crop_imm(&rgb, d.x, d.y, d.width, d.height).to_image();
        let sigma = (d.width.max(d.height) as f32 / 4.0).max(2.0);
        let blurred = imageops::fast_blur(&patch, sigma);
        imageops::replace(&mut rgb, &blurred, i64::from(d.x), i64::from(d.y));
    }
    Ok(Redacted {
        image: DynamicImage::ImageRgb8(rgb),
        detections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_scale_back_and_stay_inside_the_image() {
        let d = scaled("face", Rect::new(10, 20, 30, 30), 2.0, 100, 100);
        assert_eq!((d.x, d.y, d.width, d.height), (20, 40, 60, 60));
        let d = scaled("face", Rect::new(40, 40, 30, 30), 2.0, 100, 100);
        assert_eq!((d.x, d.y, d.width, d.height), (80, 80, 20, 20));
    }
}
