//! Criterion benches of the image kernels, one core: header probing, the DC-only JPEG decode,
//! whole thumbnails, resampling, renditions and tags. `./x bench` runs them after the side-by-side
//! comparison; `cargo bench -p mediaflow-benches --bench kernels` alone.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use image::ImageFormat;
use mediaflow_imaging::renditions::{Format, Mode, RenditionSpec, decode_working, process};
use mediaflow_imaging::samples::{camera_jpeg, encode, jpeg_declaring, photo};
use mediaflow_imaging::{DecodeLimits, fit_within, jpeg, probe, small_of, tags, thumbnail};

fn kernels(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let twelve = camera_jpeg(4000, 3000, 1);
    let bomb = jpeg_declaring(64_250, 64_250);
    let png = encode(&photo(1024, 768), ImageFormat::Png);

    c.bench_function("probe: 64250x64250 JPEG bomb", |b| {
        b.iter(|| probe::probe(&bomb).unwrap())
    });
    c.bench_function("dc decode: 12 MP JPEG to 500x375", |b| {
        b.iter(|| jpeg::dc::decode_dc(&twelve).unwrap())
    });
    c.bench_function(
        "thumbnail 256 + tags (the image stage's default): 12 MP JPEG",
        |b| b.iter(|| thumbnail(&twelve, 256, &limits).unwrap()),
    );
    c.bench_function(
        "thumbnail 256 + tags (the image stage's default): 1024x768 PNG",
        |b| b.iter(|| thumbnail(&png, 256, &limits).unwrap()),
    );
    let pixels = photo(500, 375).to_rgb8().into_raw();
    c.bench_function("resize Lanczos3: 500x375 to 256x192", |b| {
        b.iter(|| jpeg::resize_rgb(pixels.clone(), (500, 375), (256, 192)).unwrap())
    });
    let (decoded, _) = decode_working(&twelve, &limits, |w, h| fit_within(w, h, 256)).unwrap();
    let small = small_of(&decoded.image, 256).unwrap();
    c.bench_function("tags: colours, phash, sharpness of a 256 px image", |b| {
        b.iter(|| tags::tags(&small, None))
    });
    let specs = [
        RenditionSpec {
            name: "thumb-256".into(),
            width: 256,
            height: 256,
            mode: Mode::Fit,
            format: Format::Jpeg,
            quality: 85,
            metadata: Default::default(),
        },
        RenditionSpec {
            name: "card".into(),
            width: 640,
            height: 360,
            mode: Mode::Fill,
            format: Format::Webp,
            quality: 80,
            metadata: Default::default(),
        },
    ];
    c.bench_function(
        "renditions thumb-256 jpeg + card 640x360 webp + tags: 12 MP JPEG",
        |b| b.iter(|| process(&twelve, &specs, &limits).unwrap()),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = kernels
}
criterion_main!(benches);
