//! One opened input: the demuxer restricted to the `file` protocol and [`ALLOWED_FORMATS`], the
//! video decoder, and seeking.

use std::path::Path;
use std::time::Instant;

use ffmpeg_next::Discard;
use ffmpeg_next::codec;
use ffmpeg_next::format::{self, context::Input};
use ffmpeg_next::media;
use ffmpeg_next::util::frame;
use ffmpeg_next::{Dictionary, Packet, Rational};
use serde::{Deserialize, Serialize};

use crate::picture::Picture;
use crate::probe::Probe;
use crate::{ALLOWED_FORMATS, Limits, VideoError};

/// How a frame at a time is found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seek {
    /// The keyframe at or before the time; only that frame is decoded. Fast.
    #[default]
    Keyframe,
    /// The frame shown at the time: decoded on from the keyframe before it.
    Accurate,
}

/// An opened video: probe, decoder and the time budget of the job.
pub struct Video {
    input: Input,
    decoder: ffmpeg_next::decoder::Video,
    stream: usize,
    time_base: f64,
    /// The stream's first timestamp, in its time base.
    start: i64,
    probe: Probe,
    started: Instant,
    limits: Limits,
    /// What the decoder currently discards.
    skipping: Option<Discard>,
    /// Keyframes decoded alone, by their packet's timestamp: the frame choice and the
    /// storyboard often ask for the same ones.
    keyframes: KeyframeCache,
}

/// The last keyframes decoded alone, up to `KEYFRAME_CACHE_BYTES` of pixels.
#[derive(Default)]
struct KeyframeCache {
    entries: std::collections::VecDeque<(i64, Picture, usize)>,
    bytes: usize,
}

/// Pixel bytes of decoded keyframes kept for reuse (about 20 frames of 1080p).
const KEYFRAME_CACHE_BYTES: usize = 64 * 1024 * 1024;

impl KeyframeCache {
    fn get(&self, ts: i64) -> Option<Picture> {
        self.entries
            .iter()
            .find(|(t, _, _)| *t == ts)
            .map(|(_, p, _)| p.clone())
    }

    fn put(&mut self, ts: i64, picture: &Picture) {
        let size = picture.pixel_bytes();
        if size > KEYFRAME_CACHE_BYTES || self.entries.iter().any(|(t, _, _)| *t == ts) {
            return;
        }
        while self.bytes + size > KEYFRAME_CACHE_BYTES {
            let Some((_, _, dropped)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= dropped;
        }
        self.entries.push_back((ts, picture.clone(), size));
        self.bytes += size;
    }
}

impl std::fmt::Debug for Video {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Video").field("probe", &self.probe).finish()
    }
}

/// Demux options: only local files, only self-contained formats, bounded probing.
fn open_options() -> Dictionary<'static> {
    let mut options = Dictionary::new();
    options.set("protocol_whitelist", "file");
    options.set("format_whitelist", ALLOWED_FORMATS);
    // Bounded probing: 16 MiB and 20 s of media to find the streams.
    options.set("probesize", "16777216");
    options.set("analyzeduration", "20000000");
    options
}

impl Video {
    /// Opens `path` (a local file) within `limits`: refuses empty files, formats that are not
    /// self-contained, inputs without a video stream and anything over the limits before decoding.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self, VideoError> {
        crate::init();
        let started = Instant::now();
        let len = std::fs::metadata(path)
            .map_err(|e| VideoError::Internal(format!("input file {}: {e}", path.display())))?
            .len();
        if len == 0 {
            return Err(VideoError::Empty);
        }
        // A name with a scheme would select a protocol; a plain path is always `file`.
        let path = std::path::absolute(path)
            .map_err(|e| VideoError::Internal(format!("input path: {e}")))?;
        if let Some(format) = holds_playlist(&path)? {
            return Err(VideoError::FormatNotAllowed { format });
        }
        let input =
            format::input_with_dictionary(&path, open_options()).map_err(
                |e| match refused_format(&path) {
                    Some(format) => VideoError::FormatNotAllowed { format },
                    None => {
                        VideoError::Unreadable(format!("the container could not be read ({e})"))
                    }
                },
            )?;
        let probe = Probe::of(&input, len)?;
        probe.check(limits)?;
        let unknown_duration = probe.duration_s <= 0.0;
        let stream = probe.video.index;
        let st = input
            .stream(stream)
            .ok_or_else(|| VideoError::Internal("video stream vanished".into()))?;
        let time_base = f64::from(st.time_base());
        let start = if st.start_time() == ffmpeg_next::ffi::AV_NOPTS_VALUE {
            0
        } else {
            st.start_time()
        };
        let mut context = codec::context::Context::from_parameters(st.parameters())
            .map_err(VideoError::unreadable)?;
        // One thread per decode: parallelism comes from running jobs side by side, and frame
        // threads would add a frame of latency to every seek.
        context.set_threading(codec::threading::Config::count(1));
        // The decoder refuses pictures over the pixel limit itself: a stream can change its size
        // after the headers were checked (a new H.264 SPS in band).
        let mut options = Dictionary::new();
        options.set(
            "max_pixels",
            &limits.max_pixels.min(i64::MAX as u64).to_string(),
        );
        let no_decoder = |e: ffmpeg_next::Error| {
            VideoError::Unreadable(format!(
                "no decoder for the video codec `{}` in this FFmpeg ({e})",
                probe.video.codec
            ))
        };
        let codec = ffmpeg_next::decoder::find(context.id())
            .ok_or(ffmpeg_next::Error::DecoderNotFound)
            .map_err(no_decoder)?;
        let decoder = context
            .decoder()
            .open_as_with(codec, options)
            .and_then(|o| o.video())
            .map_err(no_decoder)?;
        let mut video = Self {
            input,
            decoder,
            stream,
            time_base,
            start,
            probe,
            started,
            limits: limits.clone(),
            skipping: None,
            keyframes: KeyframeCache::default(),
        };
        if unknown_duration {
            video.measure_duration()?;
        }
        video.check_complete()?;
        Ok(video)
    }

    /// What the input is.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// Fails once the job has run for longer than its limit.
    pub fn check_time(&self) -> Result<(), VideoError> {
        if self.started.elapsed() > self.limits.job_time() {
            return Err(VideoError::TimedOut {
                limit_s: self.limits.max_job_s,
            });
        }
        Ok(())
    }

    /// Seconds from the stream start of timestamp `ts` (any value a file may hold).
    fn seconds(&self, ts: i64) -> f64 {
        (i128::from(ts) - i128::from(self.start)) as f64 * self.time_base
    }

    /// The timestamp `seconds` from the stream start (saturating; float casts saturate too).
    fn timestamp(&self, seconds: f64) -> i64 {
        self.start
            .saturating_add((seconds / self.time_base).round() as i64)
    }

    /// Seeks the demuxer to the keyframe at or before `seconds` (from the stream start).
    /// A time at or before 0 seeks a second before the stream's start: demuxers without an
    /// index (MPEG-TS, PS) search by timestamps and, asked for the start itself, can land past
    /// the first keyframe, whose decoding timestamp comes before it.
    fn seek_before(&mut self, seconds: f64) -> Result<(), VideoError> {
        let ts = self.timestamp(if seconds <= 0.0 { -1.0 } else { seconds });
        // In AV_TIME_BASE units (microseconds), as avformat_seek_file wants without a stream.
        let micros = (ts as f64 * self.time_base * 1e6).round() as i64;
        let micros = micros.clamp(i64::MIN / 2, i64::MAX / 2);
        let done = self
            .input
            .seek(micros, ..micros)
            .or_else(|_| self.input.seek(micros, ..));
        done.map_err(|e| {
            VideoError::Unreadable(format!("seeking to {seconds:.3} s failed ({e})"))
        })?;
        self.decoder.flush();
        Ok(())
    }

    fn set_skipping(&mut self, discard: Discard) {
        if self.skipping != Some(discard) {
            self.decoder.skip_frame(discard);
            self.skipping = Some(discard);
        }
    }

    /// A decoded frame as a `Picture`, if its size is within the limits (the decoder's own
    /// pixel limit aside, a side may not exceed `max_side` either).
    fn picture(&self, frame: frame::Video) -> Result<Picture, VideoError> {
        let (w, h) = (frame.width(), frame.height());
        if w.max(h) > self.limits.max_side || w == 0 || h == 0 {
            return Err(VideoError::OverLimit {
                what: "decoded frame size",
                value: format!("{w}x{h}"),
                limit: format!("{} px a side", self.limits.max_side),
            });
        }
        let ts = frame.timestamp().or(frame.pts()).unwrap_or(self.start);
        let key = frame.is_key();
        Ok(Picture::new(
            frame,
            self.seconds(ts),
            key,
            self.probe.video.rotation,
        ))
    }

    /// Reads the next packet of the video stream, or `None` at the end.
    fn next_packet(&mut self) -> Result<Option<Packet>, VideoError> {
        loop {
            self.check_time()?;
            let mut packet = Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) if packet.stream() == self.stream => return Ok(Some(packet)),
                Ok(()) => {}
                Err(ffmpeg_next::Error::Eof) => return Ok(None),
                Err(ffmpeg_next::Error::Other {
                    errno: ffmpeg_next::error::EAGAIN,
                }) => {}
                // A damaged or missing tail ends the stream as far as we are concerned.
                Err(_) => return Ok(None),
            }
        }
    }

    /// The frame at `seconds` (from the start of the stream).
    pub fn frame_at(&mut self, seconds: f64, seek: Seek) -> Result<Picture, VideoError> {
        let seconds = seconds.clamp(0.0, self.probe.duration_s.max(0.0));
        let found = match self.keyframe_packet_before(seconds)? {
            Some(key) => match seek {
                Seek::Keyframe => self.last_keyframe_until(key, seconds)?,
                Seek::Accurate => self.decode_until(key, seconds)?,
            },
            None => None,
        };
        found.ok_or_else(|| {
            VideoError::NoFrame(format!(
                "at or before {seconds:.3} s (the file may be truncated or damaged)"
            ))
        })
    }

    /// When each keyframe of the video stream is presented (seconds from the stream start, in
    /// order), read from the packets' flags: the stream is demuxed, nothing is decoded.
    pub fn keyframe_times(&mut self) -> Result<Vec<f64>, VideoError> {
        self.seek_before(0.0)?;
        let mut times = Vec::new();
        while let Some(packet) = self.next_packet()? {
            if packet.is_key()
                && let Some(t) = packet.pts().or(packet.dts())
            {
                times.push(self.seconds(t).max(0.0));
            }
        }
        times.sort_by(f64::total_cmp);
        times.dedup();
        Ok(times)
    }

    /// One frame interval, from the average frame rate (1/25 s when unknown).
    pub fn frame_interval(&self) -> f64 {
        match self.probe.video.frame_rate {
            r if r > 0.0 => 1.0 / r,
            _ => 0.04,
        }
    }

    /// Decodes, alone, the last keyframe at or before `seconds`, reading on from keyframe `key`
    /// (read, not decoded) until a packet starts after the time.
    fn last_keyframe_until(
        &mut self,
        key: Packet,
        seconds: f64,
    ) -> Result<Option<Picture>, VideoError> {
        self.set_skipping(Discard::NonKey);
        let limit = seconds + 1e-6;
        let mut last_key = Some(key);
        while let Some(packet) = self.next_packet()? {
            let dts = packet.dts().or(packet.pts()).map(|t| self.seconds(t));
            if packet.is_key() {
                let pts = packet.pts().or(packet.dts()).map(|t| self.seconds(t));
                if pts.is_some_and(|t| t <= limit) {
                    last_key = Some(packet);
                    continue;
                }
                if pts.is_some() {
                    break;
                }
            }
            // Packets come in decoding order: once one is decoded after the time, no keyframe
            // at or before it follows.
            if dts.is_some_and(|t| t > limit) {
                break;
            }
        }
        let Some(packet) = last_key else {
            return Ok(None);
        };
        let ts = packet.pts().or(packet.dts());
        if let Some(cached) = ts.and_then(|t| self.keyframes.get(t)) {
            return Ok(Some(cached));
        }
        // Send the keyframe and end the stream, so that a decoder holding frames back for
        // reordering gives it up at once.
        let sent = self.decoder.send_packet(&packet).is_ok();
        let _ = self.decoder.send_eof();
        let mut frame = frame::Video::empty();
        let got = sent && self.decoder.receive_frame(&mut frame).is_ok();
        self.decoder.flush();
        if got {
            let picture = self.picture(frame)?;
            if let Some(t) = ts {
                self.keyframes.put(t, &picture);
            }
            Ok(Some(picture))
        } else {
            Ok(None)
        }
    }

    /// Decodes on from keyframe `key` (read, not yet sent) to the frame shown at `seconds`: the
    /// last frame that starts at or before it (or the first after it, if none does).
    ///
    /// A frame that no other frame refers to (a B-frame, mostly) is not decoded when a frame
    /// shown later, but not after the time, has already been read: it cannot be the one shown
    /// at the time. B-frames come after the later frames they refer to, so most of them before
    /// the time are skipped.
    fn decode_until(&mut self, key: Packet, seconds: f64) -> Result<Option<Picture>, VideoError> {
        let limit = seconds + 1e-6;
        // The latest presentation time read so far that is not after the time.
        let mut latest_before = f64::NEG_INFINITY;
        let mut shown: Option<Picture> = None;
        let mut frame = frame::Video::empty();
        let mut ended = false;
        let mut next = Some(key);
        loop {
            let packet = match next.take() {
                Some(key) => Some(key),
                None => self.next_packet()?,
            };
            match packet {
                Some(packet) => {
                    let pts = packet.pts().map(|t| self.seconds(t));
                    let passed = pts.is_some_and(|p| p < latest_before);
                    self.set_skipping(if passed {
                        Discard::NonReference
                    } else {
                        Discard::Default
                    });
                    if let Some(p) = pts.filter(|p| *p <= limit) {
                        latest_before = latest_before.max(p);
                    }
                    // A damaged packet is skipped; the decoder conceals what it can.
                    let _ = self.decoder.send_packet(&packet);
                }
                None => {
                    let _ = self.decoder.send_eof();
                    ended = true;
                }
            }
            while self.decoder.receive_frame(&mut frame).is_ok() {
                let p = self.picture(std::mem::replace(&mut frame, frame::Video::empty()))?;
                if p.time_s > limit {
                    self.decoder.flush();
                    return Ok(Some(shown.unwrap_or(p)));
                }
                shown = Some(p);
            }
            if ended {
                self.decoder.flush();
                return Ok(shown);
            }
        }
    }

    /// Every frame from `from_s` on, in order, with non-reference frames skipped when `fast`;
    /// `visit` returns false to stop.
    pub(crate) fn scan(
        &mut self,
        from_s: f64,
        fast: bool,
        mut visit: impl FnMut(Picture) -> Result<bool, VideoError>,
    ) -> Result<(), VideoError> {
        let first = self.keyframe_packet_before(from_s)?;
        self.set_skipping(if fast {
            Discard::NonReference
        } else {
            Discard::Default
        });
        if let Some(key) = &first {
            let _ = self.decoder.send_packet(key);
        }
        let mut frame = frame::Video::empty();
        let mut ended = first.is_none();
        if ended {
            let _ = self.decoder.send_eof();
        }
        loop {
            while self.decoder.receive_frame(&mut frame).is_ok() {
                let p = self.picture(std::mem::replace(&mut frame, frame::Video::empty()))?;
                if p.time_s + 1e-6 < from_s {
                    continue;
                }
                // Data far past the declared duration (which the limits were checked on) is
                // not decoded.
                if p.time_s > self.probe.duration_s * 1.1 + 1.0 || !visit(p)? {
                    self.decoder.flush();
                    return Ok(());
                }
            }
            if ended {
                break;
            }
            match self.next_packet()? {
                Some(packet) => {
                    let _ = self.decoder.send_packet(&packet);
                }
                None => {
                    let _ = self.decoder.send_eof();
                    ended = true;
                }
            }
        }
        self.decoder.flush();
        Ok(())
    }

    /// Seeks so that the next packet decoded is a keyframe at or before `seconds`, and returns
    /// that keyframe's packet (read, not yet sent). Demuxers without an index (MPEG-TS, PS) may
    /// land past it: then it seeks further back, to the start if need be. `None` at the end of
    /// the stream.
    fn keyframe_packet_before(&mut self, seconds: f64) -> Result<Option<Packet>, VideoError> {
        let mut back = 0.0;
        loop {
            self.seek_before(seconds - back)?;
            let mut key = None;
            while let Some(packet) = self.next_packet()? {
                if packet.is_key() {
                    key = Some(packet);
                    break;
                }
            }
            let at = key
                .as_ref()
                .and_then(|k| k.pts().or(k.dts()))
                .map(|t| self.seconds(t));
            let early_enough = at.is_none_or(|t| t <= seconds + 1e-6);
            if (key.is_some() && early_enough) || seconds - back <= 0.0 {
                return Ok(key);
            }
            back = if back == 0.0 { 1.0 } else { back * 4.0 };
        }
    }

    /// The time of the keyframe at or before `seconds` (the first one if none is), read from
    /// packet flags without decoding; `None` for a stream with no keyframe.
    pub fn keyframe_before(&mut self, seconds: f64) -> Result<Option<f64>, VideoError> {
        let key = self.keyframe_packet_before(seconds)?;
        Ok(key
            .and_then(|k| k.pts().or(k.dts()))
            .map(|t| self.seconds(t)))
    }

    /// For streams that do not say how long they are (raw elementary streams): reads every
    /// packet (no decoding) to find the last timestamp, then checks the duration limit.
    fn measure_duration(&mut self) -> Result<(), VideoError> {
        let mut end: f64 = 0.0;
        while let Some(packet) = self.next_packet()? {
            if let Some(ts) = packet.pts().or(packet.dts()) {
                end = end.max(self.seconds(ts.saturating_add(packet.duration().max(0))));
            }
        }
        if end <= 0.0 {
            return Err(VideoError::UnknownDuration);
        }
        self.probe.duration_s = end;
        self.probe.check(&self.limits)?;
        self.seek_before(0.0)
    }

    /// For containers whose index gives exact durations (MP4/MOV, Matroska): the packets of the
    /// last stretch must be there. A file cut short fails here, not at some later frame.
    fn check_complete(&mut self) -> Result<(), VideoError> {
        let format = self.probe.format.as_str();
        let indexed = format.starts_with("mov,") || format.starts_with("matroska");
        let duration = self.probe.video.duration_s.unwrap_or(self.probe.duration_s);
        if !indexed || duration <= 0.0 {
            return Ok(());
        }
        self.seek_before(duration)?;
        let mut end: f64 = f64::NEG_INFINITY;
        while let Some(packet) = self.next_packet()? {
            if let Some(pts) = packet.pts().or(packet.dts()) {
                let span = packet.duration().max(0);
                end = end.max(self.seconds(pts.saturating_add(span)));
            }
        }
        let slack = (2.0 * self.frame_interval()).max(0.5);
        if end + slack < duration {
            return Err(VideoError::Unreadable(if end.is_finite() {
                format!(
                    "the file is truncated: its index runs to {duration:.3} s but its data ends at {end:.3} s"
                )
            } else {
                format!(
                    "the file is truncated: its index runs to {duration:.3} s but the data is missing"
                )
            }));
        }
        self.seek_before(0.0)
    }
}

/// How much of the start of a file is searched for an embedded playlist.
const PLAYLIST_SCAN: u64 = 1 << 20;

/// A container that carries an HLS playlist in its first megabyte (the known attack: an AVI whose
/// GAB2 subtitle chunk or metadata is a playlist naming local files or URLs) is refused whatever
/// the container, before FFmpeg parses anything. No real video has `#EXTM3U` in its headers.
fn holds_playlist(path: &Path) -> Result<Option<String>, VideoError> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(PLAYLIST_SCAN).read_to_end(&mut head))
        .map_err(|e| VideoError::Internal(format!("reading the input: {e}")))?;
    if !head.windows(7).any(|w| w == b"#EXTM3U") {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&head[..head.len().min(64)]);
    let start = text.trim_start_matches('\u{feff}').trim_start();
    Ok(Some(if start.starts_with("#EXTM3U") {
        "hls (an HLS playlist)".into()
    } else if head.starts_with(b"RIFF") {
        "avi holding an HLS playlist".into()
    } else {
        "file holding an HLS playlist".into()
    }))
}

/// What a refused input is, told from its first bytes: the reference formats the format
/// whitelist keeps out (their demuxers would open other files or URLs).
fn refused_format(path: &Path) -> Option<String> {
    let mut head = vec![0u8; 4096];
    let n = std::io::Read::read(&mut std::fs::File::open(path).ok()?, &mut head).ok()?;
    head.truncate(n);
    let text = String::from_utf8_lossy(&head);
    let start = text.trim_start_matches('\u{feff}').trim_start();
    let kind = if start.starts_with("ffconcat") {
        "concat (a concat script)"
    } else if start.starts_with("<?xml") && text.contains("<MPD") {
        "dash (a DASH manifest)"
    } else if start.starts_with("v=0") {
        "sdp (a session description)"
    } else {
        return None;
    };
    Some(kind.into())
}

/// Kinds of the streams, for messages.
pub(crate) fn kind_name(kind: media::Type) -> &'static str {
    match kind {
        media::Type::Video => "video",
        media::Type::Audio => "audio",
        media::Type::Subtitle => "subtitle",
        media::Type::Data => "data",
        media::Type::Attachment => "attachment",
        media::Type::Unknown => "unknown",
    }
}

impl Video {
    /// The time base of the video stream, as a rational, for reporting.
    pub fn time_base(&self) -> Rational {
        self.input
            .stream(self.stream)
            .map_or(Rational::new(1, 1), |s| s.time_base())
    }
}
