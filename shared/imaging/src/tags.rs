//! What an image is, as tags: its EXIF fields (camera, lens, exposure, capture time, GPS), its
//! dominant colours (named, with hex and share), a perceptual hash for near-duplicate detection,
//! a sharpness score, its orientation and its size class.
//!
//! Computed on the small decoded image (`Small`), so tagging costs little beyond the thumbnail.

use exif::{In, Tag, Value};
use image::{DynamicImage, GenericImageView};
use serde::Serialize;

use crate::Small;

/// Every tag of one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tags {
    /// Size as shown (after EXIF orientation).
    pub width: u32,
    pub height: u32,
    /// `landscape`, `portrait` or `square` (sides within 2% of each other).
    pub orientation: &'static str,
    /// By megapixels: `tiny` (< 0.1), `small` (< 1), `medium` (< 4), `large` (< 16), `huge`.
    pub size_class: &'static str,
    pub exif: Option<ExifTags>,
    /// The named palette colours covering at least 5% of the image, largest share first.
    pub colours: Vec<Colour>,
    /// 64-bit DCT perceptual hash (the `phash` of Python's `imagehash`), 16 hex digits.
    pub phash: String,
    /// Variance of the Laplacian of the grey image at thumbnail size: higher is sharper.
    pub sharpness: f64,
}

/// EXIF fields, as the camera wrote them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExifTags {
    pub make: Option<String>,
    pub model: Option<String>,
    pub lens: Option<String>,
    /// `DateTimeOriginal` as RFC 3339 local time (`2013-12-17T14:04:24`), with the offset when
    /// the camera recorded one.
    pub taken_at: Option<String>,
    /// Seconds, as a fraction when the camera wrote one (`1/50`).
    pub exposure_time: Option<String>,
    pub f_number: Option<f64>,
    pub iso: Option<u32>,
    pub focal_length_mm: Option<f64>,
    /// The EXIF orientation value, 1 to 8.
    pub orientation: Option<u32>,
    pub gps: Option<Gps>,
}

/// Where the photo was taken, in decimal degrees (south and west negative).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Gps {
    pub latitude: f64,
    pub longitude: f64,
    /// Metres above sea level (negative below).
    pub altitude_m: Option<f64>,
}

/// One dominant colour.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Colour {
    /// The nearest colour of the named palette.
    pub name: &'static str,
    /// The mean of the pixels in it, `#rrggbb`.
    pub hex: String,
    /// Fraction of the image, 0 to 1.
    pub share: f64,
}

/// Tags of `small`, with the EXIF of `exif` (a TIFF structure, as in a JPEG's APP1 segment).
pub fn tags(small: &Small, exif: Option<&[u8]>) -> Tags {
    let (width, height) = (small.source_width, small.source_height);
    let orientation = if width.abs_diff(height) * 50 <= width.max(height) {
        "square"
    } else if width > height {
        "landscape"
    } else {
        "portrait"
    };
    let megapixels = f64::from(width) * f64::from(height) / 1e6;
    let size_class = match megapixels {
        m if m < 0.1 => "tiny",
        m if m < 1.0 => "small",
        m if m < 4.0 => "medium",
        m if m < 16.0 => "large",
        _ => "huge",
    };
    Tags {
        width,
        height,
        orientation,
        size_class,
        exif: exif.and_then(exif_tags),
        colours: colours(&small.image),
        phash: format!("{:016x}", phash(&small.image)),
        sharpness: sharpness(&small.image),
    }
}

fn ascii(exif: &exif::Exif, tag: Tag) -> Option<String> {
    match &exif.get_field(tag, In::PRIMARY)?.value {
        Value::Ascii(parts) => parts
            .iter()
            .map(|p| String::from_utf8_lossy(p).trim().to_owned())
            .find(|s| !s.is_empty()),
        _ => None,
    }
}

fn rational(exif: &exif::Exif, tag: Tag) -> Option<f64> {
    match &exif.get_field(tag, In::PRIMARY)?.value {
        Value::Rational(v) => v.first().filter(|r| r.denom != 0).map(|r| r.to_f64()),
        Value::SRational(v) => v.first().filter(|r| r.denom != 0).map(|r| r.to_f64()),
        _ => None,
    }
}

fn uint(exif: &exif::Exif, tag: Tag) -> Option<u32> {
    exif.get_field(tag, In::PRIMARY)?.value.get_uint(0)
}

/// Degrees, minutes, seconds as decimal degrees, signed by the reference (`S`, `W`).
fn coordinate(exif: &exif::Exif, value: Tag, reference: Tag) -> Option<f64> {
    let Value::Rational(dms) = &exif.get_field(value, In::PRIMARY)?.value else {
        return None;
    };
    if dms.len() < 3 || dms.iter().any(|r| r.denom == 0) {
        return None;
    }
    let degrees = dms[0].to_f64() + dms[1].to_f64() / 60.0 + dms[2].to_f64() / 3600.0;
    let sign = match ascii(exif, reference).as_deref() {
        Some("S" | "W") => -1.0,
        _ => 1.0,
    };
    (degrees <= 180.0).then_some(sign * degrees)
}

/// The EXIF fields of a TIFF structure; `None` when it cannot be read.
pub fn exif_tags(tiff: &[u8]) -> Option<ExifTags> {
    let exif = exif::Reader::new().read_raw(tiff.to_vec()).ok()?;
    let taken_at = ascii(&exif, Tag::DateTimeOriginal).and_then(|t| {
        // `YYYY:MM:DD HH:MM:SS`
        let (date, time) = t.split_once(' ')?;
        let date = date.replace(':', "-");
        let offset = ascii(&exif, Tag::OffsetTimeOriginal).unwrap_or_default();
        (date.len() == 10 && time.len() >= 8).then(|| format!("{date}T{}{offset}", &time[..8]))
    });
    let exposure_time = match &exif
        .get_field(Tag::ExposureTime, In::PRIMARY)
        .map(|f| &f.value)
    {
        Some(Value::Rational(v)) => v.first().filter(|r| r.denom != 0).map(|r| {
            if r.num == 1 || r.num == 0 {
                format!("{}/{}", r.num, r.denom)
            } else if r.num % r.denom == 0 {
                (r.num / r.denom).to_string()
            } else if r.num < r.denom && r.denom % r.num == 0 {
                format!("1/{}", r.denom / r.num)
            } else {
                format!("{}", r.to_f64())
            }
        }),
        _ => None,
    };
    let gps = match (
        coordinate(&exif, Tag::GPSLatitude, Tag::GPSLatitudeRef),
        coordinate(&exif, Tag::GPSLongitude, Tag::GPSLongitudeRef),
    ) {
        (Some(latitude), Some(longitude)) if latitude.abs() <= 90.0 => Some(Gps {
            latitude,
            longitude,
            altitude_m: rational(&exif, Tag::GPSAltitude).map(|a| {
                if uint(&exif, Tag::GPSAltitudeRef) == Some(1) {
                    -a
                } else {
                    a
                }
            }),
        }),
        _ => None,
    };
    Some(ExifTags {
        make: ascii(&exif, Tag::Make),
        model: ascii(&exif, Tag::Model),
        lens: ascii(&exif, Tag::LensModel),
        taken_at,
        exposure_time,
        f_number: rational(&exif, Tag::FNumber),
        iso: uint(&exif, Tag::PhotographicSensitivity),
        focal_length_mm: rational(&exif, Tag::FocalLength),
        orientation: uint(&exif, Tag::Orientation),
        gps,
    })
}

/// EXIF for a rendition made from an image with EXIF `tiff`: the primary image's fields, without
/// the orientation (renditions are already turned), the maker note (its offsets point into the
/// original file) and the embedded thumbnail, and without GPS unless `keep_gps`. `None` when
/// nothing is left or it cannot be read.
pub fn rendition_exif(tiff: &[u8], keep_gps: bool) -> Option<Vec<u8>> {
    let exif = exif::Reader::new().read_raw(tiff.to_vec()).ok()?;
    let fields: Vec<&exif::Field> = exif
        .fields()
        .filter(|f| {
            f.ifd_num == In::PRIMARY
                && f.tag != Tag::Orientation
                && f.tag != Tag::MakerNote
                && (keep_gps || f.tag.context() != exif::Context::Gps)
                && !matches!(f.value, Value::Unknown(..))
        })
        .collect();
    if fields.is_empty() {
        return None;
    }
    let mut writer = exif::experimental::Writer::new();
    for f in &fields {
        writer.push_field(f);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    writer.write(&mut out, exif.little_endian()).ok()?;
    Some(out.into_inner())
}

/// `jpeg` with an APP1 segment holding EXIF `tiff` right after its start-of-image marker
/// (unchanged when the EXIF does not fit in one segment).
pub fn with_exif(jpeg: Vec<u8>, tiff: &[u8]) -> Vec<u8> {
    let len = tiff.len() + 8; // length field, "Exif\0\0", data
    if len > usize::from(u16::MAX) || !jpeg.starts_with(&[0xFF, 0xD8]) {
        return jpeg;
    }
    let mut out = Vec::with_capacity(jpeg.len() + len + 2);
    out.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE1]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(tiff);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// The named palette dominant colours are reported in.
const PALETTE: &[(&str, [u8; 3])] = &[
    ("black", [0, 0, 0]),
    ("grey", [128, 128, 128]),
    ("silver", [192, 192, 192]),
    ("white", [255, 255, 255]),
    ("red", [220, 30, 30]),
    ("maroon", [128, 0, 0]),
    ("orange", [255, 140, 0]),
    ("brown", [139, 90, 43]),
    ("beige", [225, 205, 165]),
    ("yellow", [250, 220, 30]),
    ("olive", [128, 128, 0]),
    ("green", [40, 160, 40]),
    ("dark green", [0, 90, 0]),
    ("teal", [0, 128, 128]),
    ("cyan", [0, 220, 220]),
    ("sky blue", [120, 180, 240]),
    ("blue", [30, 60, 220]),
    ("navy", [0, 0, 110]),
    ("purple", [128, 40, 160]),
    ("magenta", [220, 40, 200]),
    ("pink", [250, 170, 190]),
];

/// sRGB to CIE L*a*b* (D65), where distances follow perceived differences.
fn lab([r, g, b]: [u8; 3]) -> [f64; 3] {
    let lin = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (lin(r), lin(g), lin(b));
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f64| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Each pixel to its nearest palette colour (in L*a*b*); colours covering 5% or more, with the
/// mean of their pixels.
fn colours(image: &DynamicImage) -> Vec<Colour> {
    let palette: Vec<[f64; 3]> = PALETTE.iter().map(|(_, c)| lab(*c)).collect();
    // At most 64x64 samples: enough for shares to the percent.
    let step = (image.width().max(image.height()) / 64).max(1);
    let mut sums = vec![([0u64; 3], 0u64); PALETTE.len()];
    let mut cache = std::collections::HashMap::new();
    for (x, y, px) in image.pixels() {
        if x % step != 0 || y % step != 0 || px.0[3] < 128 {
            continue;
        }
        let rgb = [px.0[0], px.0[1], px.0[2]];
        // Quantised to 4 bits a channel for the cache; the mean uses the exact pixel.
        let key = [rgb[0] >> 4, rgb[1] >> 4, rgb[2] >> 4];
        let nearest = *cache.entry(key).or_insert_with(|| {
            let l = lab(rgb);
            palette
                .iter()
                .enumerate()
                .map(|(i, p)| (i, (0..3).map(|k| (l[k] - p[k]).powi(2)).sum::<f64>()))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(i, _)| i)
        });
        let (sum, n) = &mut sums[nearest];
        for k in 0..3 {
            sum[k] += u64::from(rgb[k]);
        }
        *n += 1;
    }
    let total: u64 = sums.iter().map(|(_, n)| n).sum();
    let mut out: Vec<Colour> = sums
        .iter()
        .enumerate()
        .filter(|(_, (_, n))| total > 0 && *n * 20 >= total)
        .map(|(i, (sum, n))| Colour {
            name: PALETTE[i].0,
            hex: format!("#{:02x}{:02x}{:02x}", sum[0] / n, sum[1] / n, sum[2] / n),
            share: (*n as f64 / total as f64 * 1000.0).round() / 1000.0,
        })
        .collect();
    out.sort_by(|a, b| b.share.total_cmp(&a.share));
    out
}

/// Grey levels as PIL's `L` mode computes them (ITU-R 601-2 luma).
fn grey(image: &DynamicImage, width: u32, height: u32) -> Vec<f64> {
    let rgb = image.to_rgb8();
    let pixels = if rgb.dimensions() == (width, height) {
        rgb.into_raw()
    } else {
        let (w, h) = rgb.dimensions();
        crate::jpeg::resize_rgb(rgb.into_raw(), (w, h), (width, height))
            .unwrap_or_else(|_| vec![0; (width * height * 3) as usize])
    };
    pixels
        .chunks_exact(3)
        .map(|p| {
            (f64::from(p[0]) * 299.0 + f64::from(p[1]) * 587.0 + f64::from(p[2]) * 114.0) / 1000.0
        })
        .collect()
}

/// The DCT perceptual hash: the grey image at 32x32, its 2-D DCT-II, and one bit per
/// coefficient of the top-left 8x8 block, set when above their median (as `imagehash.phash`).
pub fn phash(image: &DynamicImage) -> u64 {
    const N: usize = 32;
    let g = grey(image, N as u32, N as u32);
    let cos: Vec<f64> = (0..8 * N)
        .map(|i| {
            let (u, x) = (i / N, i % N);
            (std::f64::consts::PI * (2 * x + 1) as f64 * u as f64 / (2 * N) as f64).cos()
        })
        .collect();
    // Rows, then columns; only the 8 lowest frequencies of each are needed.
    let mut rows = vec![0.0; N * 8];
    for y in 0..N {
        for u in 0..8 {
            rows[y * 8 + u] = (0..N).map(|x| g[y * N + x] * cos[u * N + x]).sum();
        }
    }
    let mut low = [0.0f64; 64];
    for v in 0..8 {
        for u in 0..8 {
            low[v * 8 + u] = (0..N).map(|y| rows[y * 8 + u] * cos[v * N + y]).sum();
        }
    }
    let mut sorted = low;
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[31] + sorted[32]) / 2.0;
    low.iter()
        .fold(0u64, |hash, &c| (hash << 1) | u64::from(c > median))
}

/// How many of 64 bits two hashes differ in.
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// Variance of the 4-neighbour Laplacian of the grey image.
fn sharpness(image: &DynamicImage) -> f64 {
    let (w, h) = image.dimensions();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let g = grey(image, w, h);
    let (w, h) = (w as usize, h as usize);
    let mut values = Vec::with_capacity((w - 2) * (h - 2));
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let c = y * w + x;
            values.push(g[c - 1] + g[c + 1] + g[c - w] + g[c + w] - 4.0 * g[c]);
        }
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    (var * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn small(image: DynamicImage) -> Small {
        Small {
            source_width: image.width(),
            source_height: image.height(),
            image,
        }
    }

    #[test]
    fn colours_are_named_with_shares() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(100, 100, |x, _| {
            if x < 75 {
                Rgb([20, 40, 200])
            } else {
                Rgb([250, 250, 250])
            }
        }));
        let t = tags(&small(img), None);
        assert_eq!(t.colours.len(), 2, "{:?}", t.colours);
        assert_eq!((t.colours[0].name, t.colours[1].name), ("blue", "white"));
        assert!((t.colours[0].share - 0.75).abs() < 0.03, "{:?}", t.colours);
        assert_eq!(t.colours[0].hex, "#1428c8");
        assert_eq!((t.orientation, t.size_class), ("square", "tiny"));
    }

    #[test]
    fn phash_is_stable_under_resizing_and_differs_between_pictures() {
        let a = DynamicImage::ImageRgb8(RgbImage::from_fn(300, 200, |x, y| {
            Rgb([(x % 256) as u8, (y * 2 % 256) as u8, ((x * y) % 256) as u8])
        }));
        let b = DynamicImage::ImageRgb8(RgbImage::from_fn(300, 200, |x, y| {
            Rgb([((y * 5) % 256) as u8, (x % 97) as u8, 40])
        }));
        let a_small = a.resize_exact(150, 100, image::imageops::FilterType::Lanczos3);
        assert!(hamming(phash(&a), phash(&a_small)) <= 6);
        assert!(hamming(phash(&a), phash(&b)) >= 16);
    }

    #[test]
    fn sharp_images_score_higher_than_blurred_ones() {
        let sharp = DynamicImage::ImageRgb8(RgbImage::from_fn(128, 128, |x, y| {
            if (x / 8 + y / 8) % 2 == 0 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        }));
        let blurred = sharp.blur(3.0);
        assert!(sharpness(&sharp) > 10.0 * sharpness(&blurred));
    }
}
