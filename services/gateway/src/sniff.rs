//! Content sniffing: the real type of an upload comes from its first bytes, never from the
//! client's Content-Type.

use mediaflow_events::MediaKind;

/// A recognised format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sniffed {
    pub kind: MediaKind,
    pub content_type: &'static str,
    pub extension: &'static str,
    /// Whether mediaflow's stages can process this format.
    pub supported: bool,
}

/// How many leading bytes `sniff` needs to decide (three MPEG-TS packets).
pub const SNIFF_LEN: usize = 512;

/// MPEG transport stream packet size.
const TS_PACKET: usize = 188;

const fn image(content_type: &'static str, extension: &'static str, supported: bool) -> Sniffed {
    Sniffed {
        kind: MediaKind::Image,
        content_type,
        extension,
        supported,
    }
}

const fn video(content_type: &'static str, extension: &'static str) -> Sniffed {
    Sniffed {
        kind: MediaKind::Video,
        content_type,
        extension,
        supported: true,
    }
}

/// Major brands of ISO base media files that hold video.
const MP4_VIDEO_BRANDS: &[&[u8]] = &[
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"iso8", b"iso9", b"mp41", b"mp42",
    b"avc1", b"M4V ", b"M4VH", b"M4VP", b"3gp4", b"3gp5", b"3gp6", b"3gp7", b"3g2a", b"3g2b",
    b"dash", b"f4v ", b"mmp4", b"MSNV", b"XAVC",
];

/// Identifies the format from the first bytes of a file (at least `SNIFF_LEN` when available).
pub fn sniff(head: &[u8]) -> Option<Sniffed> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, &[0xFF, 0xD8, 0xFF]) {
        return Some(image("image/jpeg", "jpg", true));
    }
    if at(0, b"\x89PNG\r\n\x1a\n") {
        return Some(image("image/png", "png", true));
    }
    if at(0, b"GIF87a") || at(0, b"GIF89a") {
        return Some(image("image/gif", "gif", true));
    }
    if at(0, b"RIFF") && at(8, b"WEBP") {
        return Some(image("image/webp", "webp", true));
    }
    if at(0, b"RIFF") && at(8, b"AVI ") {
        return Some(video("video/x-msvideo", "avi"));
    }
    if at(0, b"II*\0") || at(0, b"MM\0*") {
        return Some(image("image/tiff", "tiff", true));
    }
    if at(0, b"BM") && head.len() >= 18 {
        // The DIB header size distinguishes a bitmap from text that starts with "BM".
        let dib = u32::from_le_bytes([head[14], head[15], head[16], head[17]]);
        if matches!(dib, 12 | 40 | 52 | 56 | 64 | 108 | 124) {
            return Some(image("image/bmp", "bmp", true));
        }
    }
    if at(4, b"ftyp") {
        let brand = head.get(8..12)?;
        return Some(match brand {
            b"avif" | b"avis" => image("image/avif", "avif", false),
            b"heic" | b"heix" | b"heim" | b"heis" | b"mif1" | b"msf1" => {
                image("image/heic", "heic", false)
            }
            b"qt  " => video("video/quicktime", "mov"),
            brand if MP4_VIDEO_BRANDS.contains(&brand) => video("video/mp4", "mp4"),
            // Other ISO media: audio (M4A), JPEG 2000, camera raw...
            _ => return None,
        });
    }
    if at(0, b"FLV\x01") {
        return Some(video("video/x-flv", "flv"));
    }
    // Three packets' sync bytes: a lone 0x47 is just a "G".
    if (0..3).all(|i| head.get(i * TS_PACKET) == Some(&0x47)) {
        return Some(video("video/mp2t", "ts"));
    }
    // An MPEG program stream pack header (DVD, VOB, .mpg).
    if at(0, &[0x00, 0x00, 0x01, 0xBA]) {
        return Some(video("video/mpeg", "mpg"));
    }
    // Ogg holding Theora or VP8 video; Ogg audio (Vorbis, Opus) is not media here.
    if at(0, b"OggS") {
        let page = &head[..head.len().min(SNIFF_LEN)];
        let video_codec =
            page.windows(7).any(|w| w == b"\x80theora") || page.windows(5).any(|w| w == b"OVP80");
        return video_codec.then(|| video("video/ogg", "ogv"));
    }
    if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        let is_webm = head.windows(4).any(|w| w == b"webm");
        return Some(if is_webm {
            video("video/webm", "webm")
        } else {
            video("video/x-matroska", "mkv")
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_common_formats() {
        let cases: &[(&[u8], &str)] = &[
            (b"\xFF\xD8\xFF\xE0\0\x10JFIF", "image/jpeg"),
            (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image/png"),
            (b"GIF89a\x01\0\x01\0", "image/gif"),
            (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
            (b"\0\0\0\x20ftypisom\0\0\x02\0", "video/mp4"),
            (b"\0\0\0\x14ftypqt  \0\0\0\0", "video/quicktime"),
            (
                b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm",
                "video/webm",
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                sniff(bytes).map(|s| s.content_type),
                Some(*expected),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn recognises_more_video_containers() {
        let mut ts = vec![0u8; 3 * TS_PACKET];
        for i in 0..3 {
            ts[i * TS_PACKET] = 0x47;
        }
        assert_eq!(sniff(&ts).map(|s| s.content_type), Some("video/mp2t"));
        ts[TS_PACKET] = 0;
        assert_eq!(sniff(&ts), None, "one sync byte is not a transport stream");
        assert_eq!(
            sniff(b"FLV\x01\x05\0\0\0\x09").map(|s| s.content_type),
            Some("video/x-flv")
        );
        assert_eq!(
            sniff(b"\0\0\x01\xBA\x44\0\x04\0\x04\x01").map(|s| s.content_type),
            Some("video/mpeg")
        );
        let mut ogv = b"OggS\0\x02".to_vec();
        ogv.extend_from_slice(&[0; 22]);
        ogv.extend_from_slice(b"\x80theora\x03\x02");
        assert_eq!(sniff(&ogv).map(|s| s.content_type), Some("video/ogg"));
        let mut oga = b"OggS\0\x02".to_vec();
        oga.extend_from_slice(&[0; 22]);
        oga.extend_from_slice(b"\x01vorbis\0\0");
        assert_eq!(sniff(&oga), None, "Ogg audio");
    }

    #[test]
    fn iso_media_that_is_not_video_is_refused() {
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A \0\0\0\0"), None);
        assert_eq!(sniff(b"\0\0\0\x14ftypcrx \0\0\0\0"), None);
    }

    #[test]
    fn text_is_not_media_even_when_it_starts_like_it() {
        assert_eq!(sniff(b"hello, this is plain text"), None);
        assert_eq!(sniff(b"BM is a text that starts with BM and goes on"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"\xFF\xD8"), None);
    }

    #[test]
    fn known_but_unsupported_formats_are_flagged() {
        let heic = sniff(b"\0\0\0\x18ftypheic\0\0\0\0").unwrap();
        assert_eq!((heic.kind, heic.supported), (MediaKind::Image, false));
    }
}
