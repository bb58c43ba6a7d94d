//! Hostile and odd images made by code, with what a 256 px thumbnail of each must give. Shared
//! by this crate's tests, the integration tests that push them through the image stage, and the
//! fuzz test that mutates them. Built only with the `samples` feature.

pub mod mutate;

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

/// What a 256 px thumbnail of a sample must give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A thumbnail of this size whose pixel at (`x`, `y`) is near `colour`, when given.
    Thumbnail {
        width: u32,
        height: u32,
        colour: Option<(u32, u32, [u8; 3])>,
    },
    /// Refused as bad input; the message names the problem (contains this text).
    Refused(&'static str),
}

/// One sample file.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    /// What a client would claim it is.
    pub content_type: &'static str,
    pub extension: &'static str,
    pub expect: Expect,
}

pub fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)
        .expect("encoding to memory cannot fail");
    out.into_inner()
}

/// A patterned RGB picture.
pub fn photo(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 3 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    }))
}

/// A baseline JPEG whose frame header declares `w` x `h`; its data is that of a 64x64 image.
pub fn jpeg_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = encode(&photo(64, 64), ImageFormat::Jpeg);
    let sof = jpeg
        .windows(2)
        .position(|p| p == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG with a valid IHDR declaring `w` x `h` and the image data of an 8x8 picture.
pub fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut png = encode(&photo(8, 8), ImageFormat::Png);
    // IHDR data follows the signature (8), its length (4) and type (4).
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A CMYK JPEG (Adobe, inverted CMYK as Photoshop writes it) of `w` x `h`, all cyan.
pub fn cmyk_jpeg(w: usize, h: usize) -> Vec<u8> {
    let cyan = [0u8, 255, 255, 255];
    let pixels: Vec<u8> = cyan.iter().copied().cycle().take(w * h * 4).collect();
    turbojpeg::compress(
        turbojpeg::Image {
            pixels: pixels.as_slice(),
            width: w,
            pitch: w * 4,
            height: h,
            format: turbojpeg::PixelFormat::CMYK,
        },
        90,
        turbojpeg::Subsamp::None,
    )
    .expect("libjpeg-turbo encodes CMYK")
    .to_vec()
}

/// An animated GIF of one frame per colour.
pub fn animated_gif(w: u32, h: u32, colours: &[[u8; 3]]) -> Vec<u8> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut out = Vec::new();
    {
        let mut gif = GifEncoder::new(&mut out);
        gif.set_repeat(Repeat::Infinite).expect("in memory");
        for c in colours {
            let frame = image::RgbaImage::from_pixel(w, h, image::Rgba([c[0], c[1], c[2], 255]));
            gif.encode_frame(image::Frame::new(frame))
                .expect("in memory");
        }
    }
    out
}

/// An animated WebP of one lossless frame per colour, assembled by hand (RIFF, VP8X, ANIM,
/// ANMF).
pub fn animated_webp(w: u32, h: u32, colours: &[[u8; 3]]) -> Vec<u8> {
    let chunk = |tag: &[u8; 4], data: &[u8]| {
        let mut c = tag.to_vec();
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(data);
        if data.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let u24 = |v: u32| v.to_le_bytes()[..3].to_vec();
    let mut body = b"WEBP".to_vec();
    let mut vp8x = vec![0b0000_0010, 0, 0, 0]; // the animation flag
    vp8x.extend(u24(w - 1));
    vp8x.extend(u24(h - 1));
    body.extend(chunk(b"VP8X", &vp8x));
    body.extend(chunk(b"ANIM", &[0, 0, 0, 0, 0, 0]));
    for c in colours {
        let frame = DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, Rgb(*c)));
        let webp = encode(&frame, ImageFormat::WebP); // RIFF....WEBP then the VP8L chunk
        let mut anmf = u24(0);
        anmf.extend(u24(0));
        anmf.extend(u24(w - 1));
        anmf.extend(u24(h - 1));
        anmf.extend(u24(100)); // frame duration, ms
        anmf.push(0);
        anmf.extend_from_slice(&webp[12..]);
        body.extend(chunk(b"ANMF", &anmf));
    }
    let mut riff = b"RIFF".to_vec();
    riff.extend_from_slice(&(body.len() as u32).to_le_bytes());
    riff.extend(body);
    riff
}

/// Every hostile or odd sample.
pub fn hostile() -> Vec<Sample> {
    let jpeg = encode(&photo(300, 200), ImageFormat::Jpeg);
    let mut corrupt_png = encode(&photo(300, 200), ImageFormat::Png);
    let middle = corrupt_png.len() / 2;
    for b in &mut corrupt_png[middle..middle + 16] {
        *b ^= 0x5A;
    }
    let sixteen_bit = DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(600, 300, |x, _| {
        Rgb([(x * 100) as u16, 30_000, 65_535])
    }));
    let thumb = |width, height, colour| Expect::Thumbnail {
        width,
        height,
        colour,
    };
    vec![
        Sample {
            name: "truncated JPEG",
            bytes: jpeg[..jpeg.len() * 2 / 3].to_vec(),
            content_type: "image/jpeg",
            extension: "jpg",
            expect: Expect::Refused("truncated"),
        },
        Sample {
            name: "corrupt PNG",
            bytes: corrupt_png,
            content_type: "image/png",
            extension: "png",
            expect: Expect::Refused("corrupt"),
        },
        Sample {
            name: "JPEG bomb declaring 64250x64250",
            bytes: jpeg_declaring(64_250, 64_250),
            content_type: "image/jpeg",
            extension: "jpg",
            expect: Expect::Refused("64250x64250"),
        },
        Sample {
            name: "PNG bomb declaring 60000x60000",
            bytes: png_declaring(60_000, 60_000),
            content_type: "image/png",
            extension: "png",
            expect: Expect::Refused("60000x60000"),
        },
        Sample {
            name: "PNG declaring 15000x15000 (over the pixel limit)",
            bytes: png_declaring(15_000, 15_000),
            content_type: "image/png",
            extension: "png",
            expect: Expect::Refused("15000x15000"),
        },
        Sample {
            name: "CMYK JPEG",
            bytes: cmyk_jpeg(1000, 500),
            content_type: "image/jpeg",
            extension: "jpg",
            expect: thumb(256, 128, Some((128, 64, [0, 255, 255]))),
        },
        Sample {
            name: "16-bit PNG",
            bytes: encode(&sixteen_bit, ImageFormat::Png),
            content_type: "image/png",
            extension: "png",
            expect: thumb(256, 128, None),
        },
        Sample {
            name: "animated GIF",
            bytes: animated_gif(400, 200, &[[255, 0, 0], [0, 0, 255]]),
            content_type: "image/gif",
            extension: "gif",
            expect: thumb(256, 128, Some((10, 10, [255, 0, 0]))),
        },
        Sample {
            name: "animated GIF of 1001 frames (over the frame limit)",
            bytes: animated_gif(4, 4, &[[9, 9, 9]; 1001]),
            content_type: "image/gif",
            extension: "gif",
            expect: Expect::Refused("1001 frames"),
        },
        Sample {
            name: "animated WebP",
            bytes: animated_webp(400, 200, &[[0, 200, 0], [200, 0, 0]]),
            content_type: "image/webp",
            extension: "webp",
            expect: thumb(256, 128, Some((10, 10, [0, 200, 0]))),
        },
        Sample {
            name: "1x20000 PNG",
            bytes: encode(&photo(1, 20_000), ImageFormat::Png),
            content_type: "image/png",
            extension: "png",
            expect: thumb(1, 256, None),
        },
        Sample {
            name: "20000x1 JPEG",
            bytes: encode(&photo(20_000, 1), ImageFormat::Jpeg),
            content_type: "image/jpeg",
            extension: "jpg",
            expect: thumb(256, 1, None),
        },
        Sample {
            name: "zero bytes",
            bytes: Vec::new(),
            content_type: "image/jpeg",
            extension: "jpg",
            expect: Expect::Refused("not an image"),
        },
        Sample {
            name: "a text file named .jpg",
            bytes: b"Dear diary, today I uploaded a text file as a photo.\n".to_vec(),
            content_type: "image/jpeg",
            extension: "jpg",
            expect: Expect::Refused("not an image"),
        },
    ]
}

/// Whether `got` is within `tolerance` of `want` in every channel.
pub fn near(got: [u8; 3], want: [u8; 3], tolerance: u8) -> bool {
    got.iter()
        .zip(want)
        .all(|(g, w)| g.abs_diff(w) <= tolerance)
}

/// A camera-like baseline JPEG of `w` x `h` (quality 90, 4:2:0): smooth gradients and shapes
/// with sensor-like grain, so it carries a photo's entropy. Deterministic for a `seed`.
pub fn camera_jpeg(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let (wu, hu) = (w as usize, h as usize);
    let mut state = seed | 1;
    let mut pixels = Vec::with_capacity(wu * hu * 3);
    for y in 0..hu {
        for x in 0..wu {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let grain = (state % 25) as i32 - 12;
            let ring = ((x * x + y * y) / (wu.max(1) * 8) % 64) as i32;
            let r = (x * 255 / wu.max(1)) as i32 + grain;
            let g = (y * 255 / hu.max(1)) as i32 + ring + grain;
            let b = 100 + ring * 2 + grain;
            pixels.extend([r, g, b].map(|v| v.clamp(0, 255) as u8));
        }
    }
    turbojpeg::compress(
        turbojpeg::Image {
            pixels: pixels.as_slice(),
            width: wu,
            pitch: wu * 3,
            height: hu,
            format: turbojpeg::PixelFormat::RGB,
        },
        90,
        turbojpeg::Subsamp::Sub2x2,
    )
    .expect("libjpeg-turbo encodes RGB")
    .to_vec()
}
