//! The image kernels checked against tools nobody here wrote: thumbnails against
//! `vipsthumbnail`'s by ffmpeg's SSIM, EXIF fields against `exiftool` on real camera photos (from
//! piexif's test images), perceptual hashes against Python's `imagehash`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use image::ImageFormat;
use mediaflow_imaging::tags::{exif_tags, hamming};
use mediaflow_imaging::{DecodeLimits, jpeg_exif, thumbnail};
use serde_json::Value;

fn exif_photos() -> Vec<PathBuf> {
    let dir = support::fixtures().join("exif");
    let mut photos: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run through ./x test)", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    photos.sort();
    assert!(
        photos.len() >= 8,
        "camera photos missing in {}",
        dir.display()
    );
    photos
}

/// `exiftool -json -n` of `tags` for `path`: numbers as numbers, as the camera wrote them.
/// Tags may name their group (`EXIF:ISO`: the EXIF IFD's, not a maker note's).
fn exiftool(path: &Path, tags: &[&str]) -> Result<Value> {
    let out = Command::new("exiftool")
        .args(["-json", "-n"])
        .args(tags.iter().map(|t| format!("-{t}")))
        .arg(path)
        .output()
        .context("running exiftool (Debian package libimage-exiftool-perl)")?;
    ensure!(
        out.status.success(),
        "exiftool failed on {}",
        path.display()
    );
    let mut all: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(all.remove(0))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-3 * b.abs().max(1.0)
}

#[test]
fn exif_fields_agree_with_exiftool_on_camera_photos() -> Result<()> {
    // What the EXIF IFDs say; exiftool also reads maker notes, which mediaflow does not.
    let fields = [
        "EXIF:Make",
        "EXIF:Model",
        "EXIF:LensModel",
        "EXIF:DateTimeOriginal",
        "EXIF:ExposureTime",
        "EXIF:FNumber",
        "EXIF:ISO",
        "EXIF:FocalLength",
        "EXIF:Orientation",
    ];
    let mut checked = 0;
    for photo in exif_photos() {
        let bytes = std::fs::read(&photo)?;
        let ours = exif_tags(jpeg_exif(&bytes).context("no EXIF segment")?)
            .with_context(|| format!("{}: EXIF unreadable", photo.display()))?;
        let theirs = exiftool(&photo, &fields)?;
        let name = photo.file_name().unwrap_or_default().to_string_lossy();
        let text = |k: &str| {
            theirs[k]
                .as_str()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .or_else(|| theirs[k].as_f64().map(|n| n.to_string()))
        };
        assert_eq!(ours.make, text("Make"), "{name}: Make");
        assert_eq!(ours.model, text("Model"), "{name}: Model");
        assert_eq!(ours.lens, text("LensModel"), "{name}: LensModel");
        let taken = text("DateTimeOriginal").map(|t| {
            let (d, time) = t.split_once(' ').unwrap_or((&t, ""));
            format!("{}T{time}", d.replace(':', "-"))
        });
        assert_eq!(ours.taken_at, taken, "{name}: DateTimeOriginal");
        let exposure = ours
            .exposure_time
            .as_deref()
            .map(|e| match e.split_once('/') {
                Some((n, d)) => n.parse::<f64>().unwrap_or(0.0) / d.parse::<f64>().unwrap_or(1.0),
                None => e.parse().unwrap_or(0.0),
            });
        match (exposure, theirs["ExposureTime"].as_f64()) {
            (Some(a), Some(b)) => assert!(close(a, b), "{name}: ExposureTime {a} vs {b}"),
            (a, b) => assert_eq!(a.is_some(), b.is_some(), "{name}: ExposureTime"),
        }
        for (ours, key) in [
            (ours.f_number, "FNumber"),
            (ours.focal_length_mm, "FocalLength"),
            (ours.iso.map(f64::from), "ISO"),
            (ours.orientation.map(f64::from), "Orientation"),
        ] {
            match (ours, theirs[key].as_f64()) {
                (Some(a), Some(b)) => assert!(close(a, b), "{name}: {key} {a} vs {b}"),
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "{name}: {key} {a:?} vs {b:?}"),
            }
        }
        checked += 1;
    }
    println!("EXIF: {checked} camera photos agree with exiftool");
    Ok(())
}

/// r_canon.jpg with a position written by exiftool, in `dir`.
fn located_photo(dir: &Path) -> Result<PathBuf> {
    let photo = dir.join("located.jpg");
    std::fs::copy(support::fixtures().join("exif").join("r_canon.jpg"), &photo)?;
    // exiftool writes the position; both read it back.
    let ok = Command::new("exiftool")
        .args([
            "-overwrite_original",
            "-GPSLatitude=33.8568",
            "-GPSLatitudeRef=S",
            "-GPSLongitude=151.2153",
            "-GPSLongitudeRef=E",
            "-GPSAltitude=12.5",
            "-GPSAltitudeRef=0",
        ])
        .arg(&photo)
        .status()?;
    ensure!(ok.success(), "exiftool could not write GPS");
    Ok(photo)
}

#[test]
fn gps_agrees_with_exiftool() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let photo = located_photo(dir.path())?;
    let bytes = std::fs::read(&photo)?;
    let gps = exif_tags(jpeg_exif(&bytes).context("no EXIF")?)
        .and_then(|e| e.gps)
        .context("no GPS read")?;
    let theirs = exiftool(&photo, &["GPSLatitude", "GPSLongitude", "GPSAltitude"])?;
    // `-n` gives signed decimal degrees for the composite tags.
    let lat = theirs["GPSLatitude"].as_f64().context("lat")?;
    let lon = theirs["GPSLongitude"].as_f64().context("lon")?;
    let alt = theirs["GPSAltitude"].as_f64().context("alt")?;
    assert!(close(gps.latitude, lat), "{} vs {lat}", gps.latitude);
    assert!(close(gps.longitude, lon), "{} vs {lon}", gps.longitude);
    assert!(close(gps.altitude_m.context("altitude")?, alt));
    assert!(gps.latitude < 0.0, "south is negative");
    Ok(())
}

/// imagehash's phash of each path.
fn imagehash(paths: &[PathBuf]) -> Result<Vec<u64>> {
    let out = Command::new(support::python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/py/phash.py"))
        .args(paths)
        .output()?;
    ensure!(
        out.status.success(),
        "phash.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(u64::from_str_radix(l.trim(), 16)?))
        .collect()
}

fn our_phash(path: &Path) -> Result<u64> {
    // As the image stage computes it.
    let t = thumbnail(&std::fs::read(path)?, 256, &DecodeLimits::default())?;
    Ok(u64::from_str_radix(&t.tags.phash, 16)?)
}

#[test]
fn perceptual_hashes_are_near_for_copies_far_for_others_and_agree_with_imagehash() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut originals = Vec::new();
    let mut copies = Vec::new();
    for name in [
        "rocket.jpg",
        "retina.jpg",
        "hubble_deep_field.jpg",
        "chelsea.png",
        "coffee.png",
        "astronaut.png",
    ] {
        let original = support::fixtures().join(name);
        // A re-encoded, resized copy: 60% size, JPEG.
        let img = image::open(&original)?;
        let copy = dir.path().join(format!("{name}.copy.jpg"));
        img.resize(
            img.width() * 3 / 5,
            img.height() * 3 / 5,
            image::imageops::FilterType::Triangle,
        )
        .to_rgb8()
        .save_with_format(&copy, ImageFormat::Jpeg)?;
        originals.push(original);
        copies.push(copy);
    }
    let ours: Vec<u64> = originals
        .iter()
        .map(|p| our_phash(p))
        .collect::<Result<_>>()?;
    let ours_copies: Vec<u64> = copies.iter().map(|p| our_phash(p)).collect::<Result<_>>()?;
    let theirs = imagehash(&originals)?;
    let theirs_copies = imagehash(&copies)?;
    let mut worst_copy = 0;
    let mut nearest_other = 64;
    let mut worst_vs_imagehash = 0;
    for i in 0..ours.len() {
        worst_copy = worst_copy.max(hamming(ours[i], ours_copies[i]));
        worst_vs_imagehash = worst_vs_imagehash.max(hamming(ours[i], theirs[i]));
        for j in 0..ours.len() {
            if i != j {
                nearest_other = nearest_other.min(hamming(ours[i], ours[j]));
            }
        }
        // imagehash itself sees the copy as near, as a sanity check of the fixtures.
        assert!(hamming(theirs[i], theirs_copies[i]) <= 10);
    }
    println!(
        "phash: copies at most {worst_copy} bits apart, different photos at least \
         {nearest_other}, mediaflow vs imagehash at most {worst_vs_imagehash}"
    );
    assert!(worst_copy <= 8, "a copy is {worst_copy} bits away");
    assert!(
        nearest_other >= 16,
        "two photos only {nearest_other} bits apart"
    );
    assert!(
        worst_vs_imagehash <= 10,
        "mediaflow's phash is {worst_vs_imagehash} bits from imagehash's"
    );
    Ok(())
}

#[test]
fn thumbnails_look_like_vipsthumbnails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut photos: Vec<PathBuf> = [
        "rocket.jpg",
        "retina.jpg",
        "hubble_deep_field.jpg",
        "chelsea.png",
        "coffee.png",
        "astronaut.png",
    ]
    .iter()
    .map(|n| support::fixtures().join(n))
    .collect();
    photos.extend(exif_photos().into_iter().filter(|p| {
        p.file_name()
            .is_some_and(|n| n == "large.jpg" || n == "L01.jpg")
    }));
    // A camera-sized JPEG, where mediaflow's DC-only decoder does the work.
    let twelve = dir.path().join("twelve-mp.jpg");
    std::fs::write(
        &twelve,
        mediaflow_imaging::samples::camera_jpeg(4000, 3000, 3),
    )?;
    photos.push(twelve);
    let mut worst = 1.0f64;
    for photo in &photos {
        let stem = photo.file_stem().unwrap_or_default().to_string_lossy();
        let ours = dir.path().join(format!("{stem}.ours.jpg"));
        let thumb = thumbnail(&std::fs::read(photo)?, 256, &DecodeLimits::default())?;
        std::fs::write(&ours, &thumb.bytes)?;
        let theirs = dir.path().join(format!("{stem}.vips.jpg"));
        let ok = Command::new("vipsthumbnail")
            .args(["--size", "256x256>", "-o"])
            .arg(format!("{}[Q=85]", theirs.display()))
            .arg(photo)
            .status()
            .context("running vipsthumbnail (Debian package libvips-tools)")?;
        ensure!(ok.success(), "vipsthumbnail failed on {}", photo.display());
        // SSIM (all planes) by ffmpeg's `ssim` filter, as the benchmark measures it.
        let ssim = mediaflow_benches::ssim(&ours, &theirs)?;
        assert!(
            ssim >= 0.95,
            "{}: SSIM {ssim} against vipsthumbnail",
            photo.display()
        );
        worst = worst.min(ssim);
    }
    println!(
        "SSIM against vipsthumbnail: {} photos, lowest {worst:.4}",
        photos.len()
    );
    Ok(())
}

#[test]
fn renditions_carry_exif_only_as_configured_and_gps_only_when_asked() -> Result<()> {
    use mediaflow_imaging::renditions::{Format, Metadata, Mode, RenditionSpec, process};
    let dir = tempfile::tempdir()?;
    let photo = located_photo(dir.path())?;
    let spec = |name: &str, metadata| RenditionSpec {
        name: name.into(),
        width: 64,
        height: 64,
        mode: Mode::Fit,
        format: Format::Jpeg,
        quality: 85,
        metadata,
    };
    let specs = [
        spec("none", Metadata::None),
        spec("exif", Metadata::Exif),
        spec("no-gps", Metadata::ExifWithoutGps),
    ];
    let processed = process(&std::fs::read(&photo)?, &specs, &DecodeLimits::default())?;
    let mut seen = Vec::new();
    for r in &processed.renditions {
        let path = dir.path().join(format!("{}.jpg", r.name));
        std::fs::write(&path, &r.bytes)?;
        let read = exiftool(
            &path,
            &["EXIF:Make", "EXIF:Model", "GPSLatitude", "EXIF:Orientation"],
        )?;
        seen.push((
            r.name.clone(),
            read["Make"].as_str().map(str::to_owned),
            read["GPSLatitude"].as_f64().is_some(),
            read["Orientation"].as_f64(),
        ));
    }
    let canon = Some("Canon".to_owned());
    assert_eq!(
        seen,
        [
            ("none".to_owned(), None, false, None),
            ("exif".to_owned(), canon.clone(), true, None),
            ("no-gps".to_owned(), canon, false, None),
        ],
        "(rendition, make, has GPS, orientation) as exiftool reads them"
    );
    Ok(())
}
