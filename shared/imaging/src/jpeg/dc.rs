//! A DC-only decoder for baseline JPEGs: the image at 1/8 scale, one pixel per 8x8 block.
//!
//! At 1/8 scale a decoder needs only each block's DC coefficient, but it still has to walk every
//! AC coefficient's Huffman code to find the next block. This decoder does exactly that and no
//! more: AC codes are skipped through a table that gives, for the next bits of the stream, how
//! many bits the code and its magnitude take and how far it moves in the block, so an AC
//! coefficient costs one lookup and one shift. The bit buffer refills eight bytes at a time where
//! the stream holds no `0xFF`. Chroma is upsampled from its block grid by nearest neighbour.
//!
//! It covers 8-bit baseline and extended Huffman JPEGs (SOF0, SOF1) with one component or three
//! (YCbCr) in one interleaved scan, any sampling factors and restart intervals. Anything else,
//! and any stream it cannot read, gives `None`: the caller falls back to libjpeg-turbo, which
//! decides what is corrupt.

/// Bits looked up at once in the Huffman tables.
const FAST_BITS: u32 = 12;

/// A Huffman table: a lookup of the first `FAST_BITS` bits, and the canonical code bounds for
/// longer codes.
struct Huffman {
    /// For each `FAST_BITS`-bit prefix: (code length, symbol), length 0 when the code is longer.
    fast: Vec<(u8, u8)>,
    /// For each `FAST_BITS`-bit prefix of an AC table: bits taken by the code and its magnitude
    /// together, and how far the coefficient index moves (0: end of block). 0 bits: slow path.
    skip: Vec<(u8, u8)>,
    /// For each `FAST_BITS`-bit prefix: every whole AC step it holds, taken together.
    multi: Vec<Steps>,
    /// Largest code of each length (left-aligned in 16 bits, exclusive), for the slow path.
    max_code: [u32; 18],
    /// Offset from a code of each length to its symbol's index in `symbols`.
    delta: [i32; 17],
    symbols: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Option<Self> {
        let mut fast = vec![(0u8, 0u8); 1 << FAST_BITS];
        let mut skip = vec![(0u8, 0u8); 1 << FAST_BITS];
        let mut max_code = [0u32; 18];
        let mut delta = [0i32; 17];
        let mut code: u32 = 0;
        let mut k = 0usize;
        for len in 1..=16u32 {
            let n = usize::from(counts[len as usize - 1]);
            delta[len as usize] = k as i32 - code as i32;
            for _ in 0..n {
                let symbol = *symbols.get(k)?;
                if len <= FAST_BITS {
                    let first = (code << (FAST_BITS - len)) as usize;
                    let span = 1usize << (FAST_BITS - len);
                    let size = u32::from(symbol & 0x0F);
                    let run = u32::from(symbol >> 4);
                    for e in first..first + span {
                        fast[e] = (len as u8, symbol);
                        // End of block (0x00), a run of 16 zeros (0xF0), or run and size.
                        skip[e] = match symbol {
                            0x00 => (len as u8, 0),
                            0xF0 => (len as u8, 16),
                            _ => ((len + size) as u8, (run + 1) as u8),
                        };
                    }
                }
                code += 1;
                k += 1;
            }
            if code > (1 << len) {
                return None; // over-subscribed table
            }
            max_code[len as usize] = code << (16 - len);
            code <<= 1;
        }
        max_code[17] = u32::MAX;
        let multi = (0..1u32 << FAST_BITS)
            .map(|prefix| Steps::of(prefix, &skip))
            .collect();
        Some(Self {
            fast,
            skip,
            multi,
            max_code,
            delta,
            symbols: symbols.to_vec(),
        })
    }
}

/// Consecutive AC steps (code and magnitude, or a run of 16 zeros) wholly inside one
/// `FAST_BITS`-bit window, ending at an end of block or where the next step does not fit.
#[derive(Clone, Copy, Default)]
struct Steps {
    /// Bits they take.
    bits: u8,
    /// How far they move the coefficient index (not counting an end of block).
    advance: u8,
    /// The last step is an end of block.
    eob: bool,
}

impl Steps {
    fn of(prefix: u32, single: &[(u8, u8)]) -> Self {
        let mut steps = Steps::default();
        loop {
            let left = FAST_BITS - u32::from(steps.bits);
            if left == 0 {
                return steps;
            }
            // The remaining bits, padded with zeros: a step counts only if it fits in them.
            let window = (prefix << steps.bits) & ((1 << FAST_BITS) - 1);
            let (bits, advance) = single[window as usize];
            if bits == 0 || u32::from(bits) > left || u32::from(steps.advance) + 16 > 64 {
                return steps;
            }
            steps.bits += bits;
            if advance == 0 {
                steps.eob = true;
                return steps;
            }
            steps.advance += advance;
        }
    }
}

/// Reads the entropy-coded data of a scan, most significant bit first, removing stuffed zero
/// bytes. At a marker it stops and feeds zeros.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    /// Valid bits at the top of `acc`.
    n: u32,
    /// A marker (or the end of the data) was reached.
    at_marker: bool,
    /// Zero bits fed since then; consuming them means the data ran out early.
    pad: u32,
}

/// Whether any byte of `x` is 0xFF.
fn has_ff(x: u64) -> bool {
    let v = !x;
    (v.wrapping_sub(0x0101_0101_0101_0101) & !v & 0x8080_8080_8080_8080) != 0
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            acc: 0,
            n: 0,
            at_marker: false,
            pad: 0,
        }
    }

    /// Makes sure at least 32 bits are buffered: enough for any code and its magnitude.
    #[inline(always)]
    fn refill(&mut self) {
        if self.n < 32 {
            self.fill();
        }
    }

    /// Fills the buffer to at least 57 bits.
    #[inline(always)]
    fn fill(&mut self) {
        if !self.at_marker
            && let Some(bytes) = self.data.get(self.pos..self.pos + 8)
        {
            let word = u64::from_be_bytes(bytes.try_into().unwrap_or_default());
            if !has_ff(word) {
                let take = (63 - self.n) >> 3;
                let kept = word & !(u64::MAX >> (take * 8));
                self.acc |= kept >> self.n;
                self.n += take * 8;
                self.pos += take as usize;
                return;
            }
        }
        while self.n <= 56 {
            let mut byte = 0u8;
            if self.at_marker {
                self.pad += 8;
            } else {
                match self.data.get(self.pos) {
                    Some(0xFF) => match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            byte = 0xFF;
                            self.pos += 2;
                        }
                        _ => {
                            self.at_marker = true;
                            self.pad += 8;
                        }
                    },
                    Some(&b) => {
                        byte = b;
                        self.pos += 1;
                    }
                    None => {
                        self.at_marker = true;
                        self.pad += 8;
                    }
                }
            }
            self.acc |= u64::from(byte) << (56 - self.n);
            self.n += 8;
        }
    }

    #[inline(always)]
    fn peek(&self, bits: u32) -> u32 {
        (self.acc >> (64 - bits)) as u32
    }

    #[inline(always)]
    fn consume(&mut self, bits: u32) {
        self.acc <<= bits;
        self.n = self.n.saturating_sub(bits);
    }

    /// The next Huffman symbol of `table`.
    #[inline(always)]
    fn symbol(&mut self, table: &Huffman) -> Option<u8> {
        self.refill();
        let (len, symbol) = table.fast[self.peek(FAST_BITS) as usize];
        if len > 0 {
            self.consume(u32::from(len));
            return Some(symbol);
        }
        self.slow_symbol(table)
    }

    #[cold]
    fn slow_symbol(&mut self, table: &Huffman) -> Option<u8> {
        let code = self.peek(16);
        let mut len = FAST_BITS as usize + 1;
        while len <= 16 && code >= table.max_code[len] {
            len += 1;
        }
        if len > 16 {
            return None;
        }
        let index = (code >> (16 - len)) as i32 + table.delta[len];
        self.consume(len as u32);
        table.symbols.get(usize::try_from(index).ok()?).copied()
    }

    /// A `size`-bit magnitude, sign-extended (JPEG's EXTEND).
    #[inline(always)]
    fn value(&mut self, size: u32) -> i32 {
        if size == 0 {
            return 0;
        }
        self.refill();
        let v = self.peek(size) as i32;
        self.consume(size);
        if v < (1 << (size - 1)) {
            v - (1 << size) + 1
        } else {
            v
        }
    }

    /// Skips the AC coefficients of one block.
    #[inline(always)]
    fn skip_ac(&mut self, table: &Huffman) -> Option<()> {
        let mut k = 1u32;
        while k < 64 {
            self.refill();
            let window = self.peek(FAST_BITS) as usize;
            // Several steps at once, when they all stay inside this block.
            let steps = table.multi[window];
            if steps.bits > 0 {
                let end = k + u32::from(steps.advance);
                if steps.eob && end <= 63 {
                    self.consume(u32::from(steps.bits));
                    return Some(());
                }
                if !steps.eob && end <= 64 {
                    self.consume(u32::from(steps.bits));
                    k = end;
                    continue;
                }
            }
            let (bits, advance) = table.skip[window];
            if bits > 0 && u32::from(bits) <= self.n {
                self.consume(u32::from(bits));
                if advance == 0 {
                    return Some(());
                }
                k += u32::from(advance);
                continue;
            }
            let symbol = self.slow_symbol(table)?;
            let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 0x0F));
            if size == 0 {
                if run != 15 {
                    return Some(());
                }
                k += 16;
            } else {
                self.refill();
                self.consume(size);
                k += run + 1;
            }
        }
        (k == 64).then_some(())
    }

    /// At the end of a restart interval or of the scan: every bit was used but the fill bits of
    /// the last byte (fewer than 8), and a marker comes next. Anything else means the data is
    /// corrupt (bits left over) or cut short (bits read past the end).
    fn ends_cleanly(&mut self) -> bool {
        self.fill();
        self.at_marker && self.pad <= self.n && self.n - self.pad < 8
    }

    /// Moves past a restart marker: drops the buffered bits and expects `RSTn` next.
    fn restart(&mut self) -> Option<()> {
        if !self.ends_cleanly() {
            return None;
        }
        self.acc = 0;
        self.n = 0;
        self.at_marker = false;
        self.pad = 0;
        match self.data.get(self.pos..self.pos + 2) {
            Some([0xFF, 0xD0..=0xD7]) => {
                self.pos += 2;
                Some(())
            }
            _ => None,
        }
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant: usize,
    dc_table: usize,
    ac_table: usize,
}

fn be16(b: &[u8], i: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
    ])))
}

/// The image at 1/8 scale as packed RGB8: `(width, height, pixels)`, where the sizes are the
/// image's divided by 8, rounded up (as libjpeg-turbo's 1/8 scale). `None` when the JPEG is not
/// one this decoder handles or cannot be read.
pub fn decode_dc(bytes: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut quant = [[0u16; 64]; 4];
    let mut dc_tables: [Option<Huffman>; 4] = [None, None, None, None];
    let mut ac_tables: [Option<Huffman>; 4] = [None, None, None, None];
    let mut components: Vec<Component> = Vec::new();
    let (mut width, mut height) = (0usize, 0usize);
    let mut restart_interval = 0usize;
    let mut i = 2;
    loop {
        // Fill bytes before a marker.
        while bytes.get(i) == Some(&0xFF) && bytes.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        if *bytes.get(i)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(i + 1)?;
        let len = be16(bytes, i + 2)?;
        let seg = bytes.get(i + 4..i + 2 + len)?;
        match marker {
            0xDB => {
                let mut p = 0;
                while p < seg.len() {
                    let (precision, id) = (seg[p] >> 4, usize::from(seg[p] & 0x0F));
                    let table = quant.get_mut(id)?;
                    p += 1;
                    for q in table.iter_mut() {
                        *q = if precision == 0 {
                            let v = u16::from(*seg.get(p)?);
                            p += 1;
                            v
                        } else {
                            let v = u16::from_be_bytes([*seg.get(p)?, *seg.get(p + 1)?]);
                            p += 2;
                            v
                        };
                    }
                }
            }
            0xC4 => {
                let mut p = 0;
                while p < seg.len() {
                    let (class, id) = (seg[p] >> 4, usize::from(seg[p] & 0x0F));
                    let counts: [u8; 16] = seg.get(p + 1..p + 17)?.try_into().ok()?;
                    let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    let symbols = seg.get(p + 17..p + 17 + total)?;
                    let table = Huffman::new(&counts, symbols)?;
                    match class {
                        0 => *dc_tables.get_mut(id)? = Some(table),
                        1 => *ac_tables.get_mut(id)? = Some(table),
                        _ => return None,
                    }
                    p += 17 + total;
                }
            }
            0xDD => restart_interval = be16(seg, 0)?,
            // Baseline and extended sequential Huffman.
            0xC0 | 0xC1 => {
                if *seg.first()? != 8 {
                    return None;
                }
                height = be16(seg, 1)?;
                width = be16(seg, 3)?;
                let n = usize::from(*seg.get(5)?);
                if !(n == 1 || n == 3) || width == 0 || height == 0 {
                    return None;
                }
                for c in 0..n {
                    let base = 6 + c * 3;
                    let sampling = *seg.get(base + 1)?;
                    let (h, v) = (usize::from(sampling >> 4), usize::from(sampling & 0x0F));
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                        return None;
                    }
                    components.push(Component {
                        id: *seg.get(base)?,
                        h,
                        v,
                        quant: usize::from(*seg.get(base + 2)?).min(3),
                        dc_table: 0,
                        ac_table: 0,
                    });
                }
            }
            // Progressive, lossless, arithmetic coding: not for this decoder.
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            // Adobe's segment: a transform flag of 0 means RGB or CMYK, not YCbCr.
            0xEE if seg.starts_with(b"Adobe") && seg.get(11) == Some(&0) => return None,
            0xDA => {
                let n = usize::from(*seg.first()?);
                if components.is_empty() || n != components.len() {
                    return None; // a scan of some components: not one interleaved scan
                }
                for s in 0..n {
                    let id = *seg.get(1 + s * 2)?;
                    let tables = *seg.get(2 + s * 2)?;
                    let c = components.iter_mut().find(|c| c.id == id)?;
                    c.dc_table = usize::from(tables >> 4).min(3);
                    c.ac_table = usize::from(tables & 0x0F).min(3);
                }
                return scan(
                    bytes,
                    i + 2 + len,
                    (width, height),
                    &components,
                    &quant,
                    &dc_tables,
                    &ac_tables,
                    restart_interval,
                );
            }
            0xD9 => return None,
            _ => {} // APPn, COM and others
        }
        i += 2 + len;
    }
}

#[allow(clippy::too_many_arguments)]
fn scan(
    bytes: &[u8],
    start: usize,
    (width, height): (usize, usize),
    components: &[Component],
    quant: &[[u16; 64]; 4],
    dc_tables: &[Option<Huffman>; 4],
    ac_tables: &[Option<Huffman>; 4],
    restart_interval: usize,
) -> Option<(u32, u32, Vec<u8>)> {
    let hmax = components.iter().map(|c| c.h).max()?;
    let vmax = components.iter().map(|c| c.v).max()?;
    let single = components.len() == 1;
    // A single-component scan is not interleaved: its MCU is one block.
    let (mcu_w, mcu_h) = if single { (8, 8) } else { (8 * hmax, 8 * vmax) };
    let mcus_x = width.div_ceil(mcu_w);
    let mcus_y = height.div_ceil(mcu_h);
    // Each component's DC values on its block grid (padding blocks included).
    let mut planes: Vec<(usize, Vec<u8>)> = Vec::with_capacity(components.len());
    for c in components {
        let (bh, bv) = if single { (1, 1) } else { (c.h, c.v) };
        let stride = mcus_x * bh;
        planes.push((stride, vec![0u8; stride * mcus_y * bv]));
    }
    let tables: Vec<(&Huffman, &Huffman, i32)> = components
        .iter()
        .map(|c| {
            Some((
                dc_tables[c.dc_table].as_ref()?,
                ac_tables[c.ac_table].as_ref()?,
                i32::from(quant[c.quant][0]),
            ))
        })
        .collect::<Option<_>>()?;
    let mut preds = vec![0i32; components.len()];
    let mut bits = Bits::new(bytes, start);
    let mut left = restart_interval;
    for my in 0..mcus_y {
        for mx in 0..mcus_x {
            if restart_interval > 0 {
                if left == 0 {
                    bits.restart()?;
                    preds.iter_mut().for_each(|p| *p = 0);
                    left = restart_interval;
                }
                left -= 1;
            }
            for (ci, c) in components.iter().enumerate() {
                let (dc, ac, q) = tables[ci];
                let (bh, bv) = if single { (1, 1) } else { (c.h, c.v) };
                let (stride, plane) = &mut planes[ci];
                for by in 0..bv {
                    for bx in 0..bh {
                        let size = u32::from(bits.symbol(dc)?);
                        if size > 11 {
                            return None;
                        }
                        preds[ci] += bits.value(size);
                        bits.skip_ac(ac)?;
                        // The 1x1 inverse DCT: DC x quantiser / 8, level-shifted.
                        let pixel = ((preds[ci] * q + 4) >> 3) + 128;
                        let at = (my * bv + by) * *stride + mx * bh + bx;
                        plane[at] = pixel.clamp(0, 255) as u8;
                    }
                }
            }
        }
    }
    if !bits.ends_cleanly() {
        return None; // bits left over, or read past the end
    }
    let (out_w, out_h) = (width.div_ceil(8), height.div_ceil(8));
    let mut rgb = vec![0u8; out_w * out_h * 3];
    if single {
        let (stride, y) = &planes[0];
        for row in 0..out_h {
            for col in 0..out_w {
                let v = y[row * stride + col];
                rgb[(row * out_w + col) * 3..][..3].copy_from_slice(&[v, v, v]);
            }
        }
    } else {
        let sample = |ci: usize, row: usize, col: usize| -> i32 {
            let c = &components[ci];
            let (stride, plane) = &planes[ci];
            i32::from(plane[(row * c.v / vmax) * stride + col * c.h / hmax])
        };
        for row in 0..out_h {
            for col in 0..out_w {
                let y = sample(0, row, col) << 16;
                let cb = sample(1, row, col) - 128;
                let cr = sample(2, row, col) - 128;
                // ITU-R BT.601 full range, as libjpeg (16-bit fixed point).
                let r = (y + 91_881 * cr + 32_768) >> 16;
                let g = (y - 22_554 * cb - 46_802 * cr + 32_768) >> 16;
                let b = (y + 116_130 * cb + 32_768) >> 16;
                let px = &mut rgb[(row * out_w + col) * 3..][..3];
                px[0] = r.clamp(0, 255) as u8;
                px[1] = g.clamp(0, 255) as u8;
                px[2] = b.clamp(0, 255) as u8;
            }
        }
    }
    Some((out_w as u32, out_h as u32, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A photo-like test image: smooth gradients, an edge, and grain.
    fn picture(w: usize, h: usize) -> Vec<u8> {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let grain = (seed % 31) as i32 - 15;
                let edge = if x * 3 > w { 60 } else { 0 };
                let r = (x * 255 / w) as i32 + grain;
                let g = (y * 255 / h) as i32 + edge + grain;
                let b = 128 + ((x + y) % 64) as i32 - 32 + grain;
                out.extend([r, g, b].map(|v| v.clamp(0, 255) as u8));
            }
        }
        out
    }

    fn encode(w: usize, h: usize, subsamp: turbojpeg::Subsamp, gray: bool) -> Vec<u8> {
        let pixels = picture(w, h);
        let image = turbojpeg::Image {
            pixels: pixels.as_slice(),
            width: w,
            pitch: w * 3,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        };
        let subsamp = if gray {
            turbojpeg::Subsamp::Gray
        } else {
            subsamp
        };
        turbojpeg::compress(image, 90, subsamp).unwrap().to_vec()
    }

    /// libjpeg-turbo's own 1/8 scale decode.
    fn reference(jpeg: &[u8], w: usize, h: usize) -> Vec<u8> {
        let (w, h) = (w.div_ceil(8), h.div_ceil(8));
        let mut image = turbojpeg::Image {
            pixels: vec![0; w * h * 3],
            width: w,
            pitch: w * 3,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        };
        turbojpeg::Decompressor::new()
            .unwrap()
            .decompress(jpeg, image.as_deref_mut())
            .unwrap();
        image.pixels
    }

    #[test]
    fn matches_libjpeg_turbo_at_one_eighth() {
        use turbojpeg::Subsamp::*;
        for (w, h, subsamp, gray) in [
            (640, 480, Sub2x2, false),
            (643, 477, Sub2x2, false), // sizes off the MCU grid
            (320, 240, Sub2x1, false),
            (200, 136, None, false),
            (333, 250, Sub2x2, true),
        ] {
            let jpeg = encode(w, h, subsamp, gray);
            let (light, channel) = differences(&jpeg);
            // Luma matches up to rounding. Colour differs a little: libjpeg-turbo upsamples
            // chroma with a scaled inverse DCT, this decoder repeats the chroma block's DC.
            assert!(
                light < 1.0 && channel < 4.0,
                "{w}x{h} {subsamp:?} gray={gray}: mean difference luma {light}, per channel {channel}"
            );
        }
    }

    /// Luma and per-channel mean differences between our 1/8 decode of `jpeg` and libjpeg-turbo's.
    fn differences(jpeg: &[u8]) -> (f64, f64) {
        let header = turbojpeg::read_header(jpeg).unwrap();
        let (dw, dh, ours) = decode_dc(jpeg).expect("decoded");
        assert_eq!(
            (dw as usize, dh as usize),
            (header.width.div_ceil(8), header.height.div_ceil(8))
        );
        let theirs = reference(jpeg, header.width, header.height);
        let luma = |p: &[u8]| {
            (299 * i32::from(p[0]) + 587 * i32::from(p[1]) + 114 * i32::from(p[2])) / 1000
        };
        let (mut channel, mut light) = (0i64, 0i64);
        for (a, b) in ours.chunks(3).zip(theirs.chunks(3)) {
            light += i64::from((luma(a) - luma(b)).abs());
            for (x, y) in a.iter().zip(b) {
                channel += i64::from((i32::from(*x) - i32::from(*y)).abs());
            }
        }
        let pixels = (dw * dh) as f64;
        (light as f64 / pixels, channel as f64 / pixels / 3.0)
    }

    #[test]
    fn restart_intervals_are_followed() {
        // Made with libjpeg-turbo's cjpeg (-restart 3B: every 3 MCUs, 4:2:0; -restart 1: every
        // MCU row, 4:4:4) from a 203x141 picture with grain.
        for jpeg in [
            &include_bytes!("../../testdata/restart-every-3-mcus.jpg")[..],
            include_bytes!("../../testdata/restart-every-row-444.jpg"),
        ] {
            assert!(
                jpeg.windows(2).any(|w| w == [0xFF, 0xDD]),
                "has a DRI segment"
            );
            let (light, channel) = differences(jpeg);
            // Luma decides (a lost restart would scramble it); the colour difference of this
            // small, steep gradient comes from the chroma upsampling.
            assert!(
                light < 1.0 && channel < 6.0,
                "luma {light}, per channel {channel}"
            );
        }
        // A restart marker missing where the interval ends: the decoder gives up (and
        // libjpeg-turbo decides what the file is worth).
        let mut broken = include_bytes!("../../testdata/restart-every-3-mcus.jpg").to_vec();
        let rst = broken
            .windows(2)
            .position(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1]))
            .unwrap();
        broken.drain(rst..rst + 2);
        assert!(decode_dc(&broken).is_none());
    }

    #[test]
    fn what_it_does_not_handle_falls_back() {
        let jpeg = encode(64, 48, turbojpeg::Subsamp::Sub2x2, false);
        assert!(decode_dc(&jpeg).is_some());
        assert!(decode_dc(b"not a jpeg").is_none());
        // Cut inside the scan data: the decoder notices it ran out.
        assert!(decode_dc(&jpeg[..jpeg.len() / 2]).is_none());
        // Progressive (SOF2): not for this decoder.
        let mut progressive = jpeg.clone();
        let sof = progressive
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .unwrap();
        progressive[sof + 1] = 0xC2;
        assert!(decode_dc(&progressive).is_none());
    }
}
