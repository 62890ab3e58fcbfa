//! Decode-and-crop for baseline JPEG (TF's `decode_and_crop_jpeg`): only the MCUs a crop
//! needs are dequantized, transformed and color-converted, and entropy decoding stops after the
//! last one; with restart markers, intervals holding none of them are skipped unread.
//!
//! Supported: sequential Huffman (SOF0/SOF1), 8-bit, one scan holding every component,
//! grayscale or YCbCr with chroma subsampled by 1 or 2 each way (4:4:4, 4:2:2, 4:2:0, 4:4:0),
//! restart intervals, EXIF orientation 1. [`read_header`] says `None` for anything else, and
//! the caller decodes the whole image the ordinary way.
//!
//! The pixels follow zune-jpeg (what `image` uses for full decodes) so that a crop matches the
//! full decode cut to the same rectangle: the islow integer IDCT with 12-bit constants, chroma
//! upsampled by the triangle filter (vertical pass, rounded, then horizontal, rounded) with the
//! encoder's padding blocks as neighbours at the right and bottom edges, and BT.601 full-range
//! YCbCr→RGB with 14-bit constants.

use effnet_engine::simd;

use crate::decode::RgbImage;

/// Natural (row-major) index of the `k`-th coefficient in zigzag order.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Codes up to this length decode with one table lookup.
const FAST_BITS: u32 = 9;

/// A Huffman table: a direct lookup for short codes, canonical-code bounds for the rest.
#[derive(Debug, Clone)]
struct Huffman {
    /// `(length << 8) | symbol` for every `FAST_BITS`-bit prefix starting with a short code;
    /// 0 where the code is longer.
    fast: Vec<u16>,
    /// Per length: one past the last code of that length.
    max_code: [i32; 17],
    /// Per length: index into `symbols` of a code's symbol, minus the code.
    offset: [i32; 17],
    symbols: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<Huffman, String> {
        let mut fast = vec![0u16; 1 << FAST_BITS];
        let mut max_code = [0i32; 17];
        let mut offset = [0i32; 17];
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16u32 {
            let n = counts[len as usize - 1] as usize;
            offset[len as usize] = k as i32 - code;
            for _ in 0..n {
                if code >= 1 << len {
                    return Err("invalid Huffman table".into());
                }
                if len <= FAST_BITS {
                    let shift = FAST_BITS - len;
                    let first = (code as usize) << shift;
                    fast[first..first + (1 << shift)].fill(((len as u16) << 8) | symbols[k] as u16);
                }
                code += 1;
                k += 1;
            }
            max_code[len as usize] = code;
            code <<= 1;
        }
        Ok(Huffman {
            fast,
            max_code,
            offset,
            symbols: symbols.to_vec(),
        })
    }

    /// The next symbol; the reader must hold at least 16 bits.
    #[inline(always)]
    fn decode(&self, bits: &mut BitReader) -> Result<u8, String> {
        let entry = self.fast[bits.peek(FAST_BITS) as usize];
        if entry != 0 {
            bits.consume(u32::from(entry >> 8));
            return Ok(entry as u8);
        }
        let code16 = bits.peek(16) as i32;
        for len in FAST_BITS + 1..=16 {
            let code = code16 >> (16 - len);
            if code < self.max_code[len as usize] {
                bits.consume(len);
                let index = (code + self.offset[len as usize]) as usize;
                return self
                    .symbols
                    .get(index)
                    .copied()
                    .ok_or_else(|| "invalid Huffman code".to_string());
            }
        }
        Err("invalid Huffman code".into())
    }
}

/// Entropy-coded bits, most significant first, with the stuffed zero after 0xFF removed. At a
/// marker (or the end of the data) it feeds zero bits and counts them.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Valid bits left-aligned.
    buf: u64,
    bits: u32,
    at_marker: bool,
    /// Zero bits fed in after the data stopped; consuming any means the data was cut short.
    padding: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            buf: 0,
            bits: 0,
            at_marker: false,
            padding: 0,
        }
    }

    /// Tops the buffer up to at least 57 bits.
    #[inline(always)]
    fn refill(&mut self) {
        if self.bits > 56 {
            return;
        }
        // Eight bytes at once when none is 0xFF (the usual case).
        if !self.at_marker {
            if let Some(chunk) = self.data.get(self.pos..self.pos + 8) {
                let word = u64::from_be_bytes(chunk.try_into().unwrap_or([0xFF; 8]));
                let inverted = !word;
                let has_ff =
                    inverted.wrapping_sub(0x0101_0101_0101_0101) & word & 0x8080_8080_8080_8080;
                if has_ff == 0 {
                    let n = (64 - self.bits) / 8;
                    self.buf |= (word >> (64 - 8 * n)) << (64 - 8 * n - self.bits);
                    self.pos += n as usize;
                    self.bits += 8 * n;
                    return;
                }
            }
        }
        while self.bits <= 56 {
            let mut byte = 0u64;
            if !self.at_marker {
                match self.data.get(self.pos) {
                    Some(0xFF) => {
                        if self.data.get(self.pos + 1) == Some(&0) {
                            byte = 0xFF;
                            self.pos += 2;
                        } else {
                            self.at_marker = true;
                        }
                    }
                    Some(&b) => {
                        byte = u64::from(b);
                        self.pos += 1;
                    }
                    None => self.at_marker = true,
                }
            }
            if self.at_marker {
                self.padding += 8;
            }
            self.buf |= byte << (56 - self.bits);
            self.bits += 8;
        }
    }

    #[inline(always)]
    fn peek(&self, n: u32) -> u32 {
        (self.buf >> (64 - n)) as u32
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.bits -= n;
    }

    /// `n` bits (1 to 16) as the signed value they encode (JPEG's EXTEND).
    #[inline(always)]
    fn receive_extend(&mut self, n: u32) -> i32 {
        let v = self.peek(n) as i32;
        self.consume(n);
        if v < 1 << (n - 1) {
            v - (1 << n) + 1
        } else {
            v
        }
    }

    /// Whether decoding has read past the data into the zero padding.
    fn overran(&self) -> bool {
        self.padding > self.bits
    }

    /// Moves past the next restart marker and starts afresh after it.
    fn restart(&mut self) -> Result<(), String> {
        let data = self.data;
        let mut i = self.pos;
        loop {
            let at = data[i.min(data.len())..]
                .iter()
                .position(|&b| b == 0xFF)
                .map(|p| p + i)
                .ok_or("restart marker missing: the data ends early")?;
            match data.get(at + 1) {
                Some(0xD0..=0xD7) => {
                    i = at + 2;
                    break;
                }
                Some(0xFF) | Some(0) => i = at + 1,
                Some(_) => return Err("restart marker missing".into()),
                None => return Err("restart marker missing: the data ends early".into()),
            }
        }
        *self = BitReader::new(data, i);
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Component {
    /// Sampling factors (1 for every component of a single-component image).
    h: usize,
    v: usize,
    quant: [i32; 64],
    dc: usize,
    ac: usize,
}

/// A baseline JPEG that [`decode_crop`] can decode: its frame, tables and where the scan starts.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub width: usize,
    pub height: usize,
    /// In scan order (which the frame's order need not be; color order is by frame position).
    components: Vec<Component>,
    /// Frame position of each scan component.
    frame_index: Vec<usize>,
    dc_tables: Vec<Huffman>,
    ac_tables: Vec<Huffman>,
    restart_interval: usize,
    scan_start: usize,
    h_max: usize,
    v_max: usize,
}

/// A frame component: id, sampling factors, quantization table.
type FrameComponent = (u8, usize, usize, usize);

fn u16_at(b: &[u8], i: usize) -> Option<usize> {
    Some(usize::from(*b.get(i)?) << 8 | usize::from(*b.get(i + 1)?))
}

/// The frame and tables of a JPEG that [`decode_crop`] supports; `None` for anything else
/// (not a JPEG, progressive, arithmetic, lossless, 12-bit, CMYK, RGB or YCCK by Adobe's
/// marker, EXIF orientation other than 1, unusual sampling, several scans, damaged headers).
pub fn read_header(bytes: &[u8]) -> Option<Baseline> {
    if bytes.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut quant = [[0i32; 64]; 4];
    let mut quant_seen = [false; 4];
    let mut dc_tables: Vec<Option<Huffman>> = vec![None; 4];
    let mut ac_tables: Vec<Option<Huffman>> = vec![None; 4];
    // Width, height and per component (id, h, v, quantization table).
    let mut frame: Option<(usize, usize, Vec<FrameComponent>)> = None;
    let mut restart_interval = 0;
    let mut i = 2;
    loop {
        // Markers may be preceded by fill bytes.
        while *bytes.get(i)? == 0xFF && *bytes.get(i + 1)? == 0xFF {
            i += 1;
        }
        if *bytes.get(i)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(i + 1)?;
        let len = u16_at(bytes, i + 2)?;
        let seg = bytes.get(i + 4..i + 2 + len)?;
        match marker {
            0xC0 | 0xC1 => {
                if seg.len() < 6 || seg[0] != 8 || frame.is_some() {
                    return None;
                }
                let height = u16_at(seg, 1)?;
                let width = u16_at(seg, 3)?;
                let n = usize::from(seg[5]);
                if width == 0 || height == 0 || !(n == 1 || n == 3) || seg.len() < 6 + 3 * n {
                    return None;
                }
                // The full decoder refuses images over `image`'s allocation limit (512 MiB);
                // a crop must not succeed where it fails, so very large images (over 64
                // Mpixels, well under the limit) take the full decoder's path.
                if width * height > 64 << 20 {
                    return None;
                }
                let comps = (0..n)
                    .map(|c| {
                        let s = &seg[6 + 3 * c..9 + 3 * c];
                        (
                            s[0],
                            usize::from(s[1] >> 4),
                            usize::from(s[1] & 15),
                            usize::from(s[2]),
                        )
                    })
                    .collect();
                frame = Some((width, height, comps));
            }
            // Other frame types: progressive, lossless, arithmetic, hierarchical.
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            0xC4 => {
                let mut s = seg;
                while !s.is_empty() {
                    let (class, id) = (s[0] >> 4, usize::from(s[0] & 15));
                    let counts: [u8; 16] = s.get(1..17)?.try_into().ok()?;
                    let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    let symbols = s.get(17..17 + total)?;
                    let table = Huffman::new(&counts, symbols).ok()?;
                    match (class, id) {
                        (0, 0..=3) => dc_tables[id] = Some(table),
                        (1, 0..=3) => ac_tables[id] = Some(table),
                        _ => return None,
                    }
                    s = &s[17 + total..];
                }
            }
            0xDB => {
                let mut s = seg;
                while !s.is_empty() {
                    let (precision, id) = (s[0] >> 4, usize::from(s[0] & 15));
                    if id > 3 {
                        return None;
                    }
                    let size = if precision == 0 { 64 } else { 128 };
                    let values = s.get(1..1 + size)?;
                    for k in 0..64 {
                        quant[id][k] = if precision == 0 {
                            i32::from(values[k])
                        } else {
                            i32::from(u16::from_be_bytes([values[2 * k], values[2 * k + 1]]))
                        };
                    }
                    quant_seen[id] = true;
                    s = &s[1 + size..];
                }
            }
            0xDD => restart_interval = u16_at(seg, 0)?,
            0xE1 if seg.starts_with(b"Exif\0\0")
                && exif_orientation(&seg[6..]).is_some_and(|o| o != 1) =>
            {
                return None;
            }
            // Adobe's marker: anything but YCbCr (transform 1) for three components.
            0xEE if seg.starts_with(b"Adobe") => {
                let transform = *seg.get(11)?;
                if frame.as_ref().map_or(3, |f| f.2.len()) == 3 && transform != 1 {
                    return None;
                }
            }
            0xDA => {
                let (width, height, comps) = frame?;
                let n = usize::from(*seg.first()?);
                if n != comps.len() || seg.len() < 1 + 2 * n + 3 {
                    return None;
                }
                let (ss, se, a) = (seg[1 + 2 * n], seg[2 + 2 * n], seg[3 + 2 * n]);
                if ss != 0 || se != 63 || a != 0 {
                    return None;
                }
                let mut components = Vec::with_capacity(n);
                let mut frame_index = Vec::with_capacity(n);
                for c in 0..n {
                    let (id, tables) = (seg[1 + 2 * c], seg[2 + 2 * c]);
                    let f = comps.iter().position(|x| x.0 == id)?;
                    if frame_index.contains(&f) {
                        return None;
                    }
                    let (_, h, v, q) = comps[f];
                    let (dc, ac) = (usize::from(tables >> 4), usize::from(tables & 15));
                    if q > 3 || !quant_seen[q] || dc > 3 || ac > 3 {
                        return None;
                    }
                    dc_tables[dc].as_ref()?;
                    ac_tables[ac].as_ref()?;
                    // Quantization in zigzag order, as the coefficients arrive.
                    components.push(Component {
                        h: if n == 1 { 1 } else { h },
                        v: if n == 1 { 1 } else { v },
                        quant: quant[q],
                        dc,
                        ac,
                    });
                    frame_index.push(f);
                }
                let h_max = components.iter().map(|c| c.h).max()?;
                let v_max = components.iter().map(|c| c.v).max()?;
                // Luma at full resolution, both chroma alike, subsampled by 1 or 2.
                let luma = &components[frame_index.iter().position(|&f| f == 0)?];
                if luma.h != h_max || luma.v != v_max {
                    return None;
                }
                for c in &components {
                    let ok = |s: usize, max: usize| s >= 1 && max.is_multiple_of(s) && max / s <= 2;
                    if !ok(c.h, h_max) || !ok(c.v, v_max) || h_max > 2 || v_max > 2 {
                        return None;
                    }
                }
                if n == 3 {
                    let chroma: Vec<_> = (0..n).filter(|&c| frame_index[c] != 0).collect();
                    let (a, b) = (&components[chroma[0]], &components[chroma[1]]);
                    if (a.h, a.v) != (b.h, b.v) {
                        return None;
                    }
                }
                let empty = || Huffman::new(&[0; 16], &[]);
                let take = |t: Vec<Option<Huffman>>| -> Option<Vec<Huffman>> {
                    t.into_iter()
                        .map(|h| h.map_or_else(|| empty().ok(), Some))
                        .collect()
                };
                return Some(Baseline {
                    width,
                    height,
                    components,
                    frame_index,
                    dc_tables: take(dc_tables)?,
                    ac_tables: take(ac_tables)?,
                    restart_interval,
                    scan_start: i + 2 + len,
                    h_max,
                    v_max,
                });
            }
            // EOI, DNL, a stray RST or SOI before the scan: not a plain baseline file.
            0xD0..=0xD9 | 0xDC => return None,
            _ => {}
        }
        i += 2 + len;
    }
}

/// EXIF orientation (tag 0x0112 of IFD0) from the TIFF data of an APP1 segment.
fn exif_orientation(tiff: &[u8]) -> Option<u16> {
    let le = match tiff.get(..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_ = |i: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(i..i + 2)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        })
    };
    let u32_ = |i: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(i..i + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let ifd = u32_(4)? as usize;
    let entries = usize::from(u16_(ifd)?);
    (0..entries)
        .map(|e| ifd + 2 + 12 * e)
        .find(|&at| u16_(at) == Some(0x0112))
        .and_then(|at| u16_(at + 8))
}

/// Where one component's decoded samples go: the blocks of the MCUs the crop needs.
struct Plane {
    samples: Vec<u8>,
    width: usize,
    /// Position of `samples[0]` in the component's padded sample grid.
    x0: usize,
    y0: usize,
}

/// Decodes the rectangle `(x, y, width, height)` of `jpeg` (whose header is `header`) as RGB,
/// equal (up to the IDCT's and upsampling's exact arithmetic, see the module notes) to decoding
/// the whole image and cutting the rectangle out.
pub fn decode_crop(
    jpeg: &[u8],
    header: &Baseline,
    (x, y, width, height): (usize, usize, usize, usize),
) -> Result<RgbImage, String> {
    if width == 0 || height == 0 || x + width > header.width || y + height > header.height {
        return Err(format!(
            "crop {width}×{height} at ({x}, {y}) is outside the {}×{} image",
            header.width, header.height
        ));
    }
    let b = header;
    let n = b.components.len();
    let (mcu_w, mcu_h) = (8 * b.h_max, 8 * b.v_max);
    let mcus_x = b.width.div_ceil(mcu_w);
    let mcus_y = b.height.div_ceil(mcu_h);
    // MCUs needed: each component's samples under the crop, plus the neighbours its
    // upsampling filter reads (clamped to the padded component, as the full decode does).
    let (mut mx0, mut mx1, mut my0, mut my1) = (usize::MAX, 0, usize::MAX, 0);
    for c in &b.components {
        let (sh, sv) = (b.h_max / c.h, b.v_max / c.v);
        let (cols, rows) = (mcus_x * 8 * c.h, mcus_y * 8 * c.v);
        let (lo_x, hi_x) = filter_span(x, x + width, sh, cols);
        let (lo_y, hi_y) = filter_span(y, y + height, sv, rows);
        mx0 = mx0.min(lo_x / (8 * c.h));
        mx1 = mx1.max(hi_x / (8 * c.h));
        my0 = my0.min(lo_y / (8 * c.v));
        my1 = my1.max(hi_y / (8 * c.v));
    }
    let mut planes: Vec<Plane> = b
        .components
        .iter()
        .map(|c| {
            let width = (mx1 - mx0 + 1) * 8 * c.h;
            Plane {
                samples: vec![0; width * (my1 - my0 + 1) * 8 * c.v],
                width,
                x0: mx0 * 8 * c.h,
                y0: my0 * 8 * c.v,
            }
        })
        .collect();
    // Compiled for AVX2 where the CPU has it: the IDCT's 32-bit lane products need it.
    simd::dispatch(
        #[inline(always)]
        || decode_mcus(jpeg, b, (mcus_x, mcus_y), (mx0, mx1, my0, my1), &mut planes),
    )?;

    let mut out = vec![0u8; width * height * 3];
    let luma = b.frame_index.iter().position(|&f| f == 0).unwrap_or(0);
    let lp = &planes[luma];
    if n == 1 {
        for (r, out_row) in out.chunks_exact_mut(width * 3).enumerate() {
            let row = &lp.samples[(y + r - lp.y0) * lp.width + x - lp.x0..][..width];
            for (px, &v) in out_row.chunks_exact_mut(3).zip(row) {
                px.fill(v);
            }
        }
        return Ok(RgbImage {
            width,
            height,
            pixels: out,
        });
    }
    let chroma_of = |f: usize| b.frame_index.iter().position(|&g| g == f).unwrap_or(0);
    let (cb, cr) = (chroma_of(1), chroma_of(2));
    let (sh, sv) = (b.h_max / b.components[cb].h, b.v_max / b.components[cb].v);
    let (chroma_cols, chroma_rows) = (
        mcus_x * 8 * b.components[cb].h,
        mcus_y * 8 * b.components[cb].v,
    );
    let mut cb_row = vec![0i32; width];
    let mut cr_row = vec![0i32; width];
    let (mut vertical, mut wide) = (Vec::new(), Vec::new());
    simd::dispatch(
        #[inline(always)]
        || {
            for (r, out_row) in out.chunks_exact_mut(width * 3).enumerate() {
                let yy = y + r;
                for (plane, dst) in [(&planes[cb], &mut cb_row), (&planes[cr], &mut cr_row)] {
                    upsample_row(
                        plane,
                        (x, yy, width),
                        (sh, sv),
                        (chroma_cols, chroma_rows),
                        (&mut vertical, &mut wide),
                        dst,
                    );
                }
                let yrow = &lp.samples[(yy - lp.y0) * lp.width + x - lp.x0..][..width];
                ycbcr_to_rgb(yrow, &cb_row, &cr_row, out_row);
            }
        },
    );
    Ok(RgbImage {
        width,
        height,
        pixels: out,
    })
}

/// The component samples that full-resolution positions `[lo, hi)` read when the component is
/// subsampled by `factor` (1 or 2) and upsampled with the triangle filter: `(first, last)`,
/// clamped to the component's `len` samples.
fn filter_span(lo: usize, hi: usize, factor: usize, len: usize) -> (usize, usize) {
    if factor == 1 {
        return (lo, hi - 1);
    }
    // An even position also reads the sample before; an odd one the sample after.
    let first = (lo / 2).saturating_sub(usize::from(lo.is_multiple_of(2)));
    let last = ((hi - 1) / 2 + (hi - 1) % 2).min(len - 1);
    (first, last)
}

/// One output row of a chroma component at full resolution, columns `[x, x + width)` of row
/// `y`: zune-jpeg's triangle filter, vertical then horizontal, each rounded.
#[inline(always)]
fn upsample_row(
    plane: &Plane,
    (x, y, width): (usize, usize, usize),
    (sh, sv): (usize, usize),
    (cols, rows): (usize, usize),
    (vertical, wide): (&mut Vec<i32>, &mut Vec<i32>),
    out: &mut [i32],
) {
    let (first, last) = filter_span(x, x + width, sh, cols);
    // Columns `first..=last` of component row `cy`.
    let span = |cy: usize| {
        let row = &plane.samples[(cy - plane.y0) * plane.width..][..plane.width];
        &row[first - plane.x0..=last - plane.x0]
    };
    let cy = y / sv;
    let near = span(cy);
    vertical.clear();
    if sv == 2 {
        let other = if y % 2 == 0 {
            cy.saturating_sub(1)
        } else {
            (cy + 1).min(rows - 1)
        };
        vertical.extend(
            near.iter()
                .zip(span(other))
                .map(|(&a, &b)| (3 * i32::from(a) + i32::from(b) + 2) >> 2),
        );
    } else {
        vertical.extend(near.iter().map(|&a| i32::from(a)));
    }
    if sh == 1 {
        out.copy_from_slice(&vertical[x - first..][..width]);
        return;
    }
    // Each sample gives two outputs, leaning to its left and right neighbours. The span's end
    // samples are repeated outside it: at the component's edges that is the filter's clamp,
    // elsewhere the outputs that would read them lie outside the crop.
    let n = vertical.len();
    vertical.insert(0, vertical[0]);
    vertical.push(vertical[n]);
    wide.clear();
    wide.resize(2 * n, 0);
    for (pair, v) in wide.chunks_exact_mut(2).zip(vertical.windows(3)) {
        let centre = 3 * v[1] + 2;
        pair[0] = (centre + v[0]) >> 2;
        pair[1] = (centre + v[2]) >> 2;
    }
    out.copy_from_slice(&wide[x - 2 * first..][..width]);
}

/// BT.601 full-range YCbCr to RGB with 14-bit fixed-point constants, rounding as zune-jpeg.
#[inline(always)]
fn ycbcr_to_rgb(luma: &[u8], cb: &[i32], cr: &[i32], out: &mut [u8]) {
    const ONE: i32 = 1 << 14;
    const HALF_MINUS_ONE: i32 = (1 << 13) - 1;
    const CR_TO_R: i32 = 22970; // 1.402
    const CB_TO_B: i32 = 29032; // 1.772
    const CR_TO_G: i32 = -11700; // −0.714136
    const CB_TO_G: i32 = -5638; // −0.344136
    for (((px, &l), &b), &r) in out.chunks_exact_mut(3).zip(luma).zip(cb).zip(cr) {
        let y = i32::from(l) * ONE + HALF_MINUS_ONE;
        let (b, r) = (b - 128, r - 128);
        px[0] = ((y + CR_TO_R * r) >> 14).clamp(0, 255) as u8;
        px[1] = ((y + CR_TO_G * r + CB_TO_G * b) >> 14).clamp(0, 255) as u8;
        px[2] = ((y + CB_TO_B * b) >> 14).clamp(0, 255) as u8;
    }
}

/// Entropy-decodes MCUs up to the last one the crop needs (MCU columns `mx0..=mx1`, rows
/// `my0..=my1`), transforming the blocks of those into `planes`.
#[inline(always)]
fn decode_mcus(
    jpeg: &[u8],
    b: &Baseline,
    (mcus_x, mcus_y): (usize, usize),
    (mx0, mx1, my0, my1): (usize, usize, usize, usize),
    planes: &mut [Plane],
) -> Result<(), String> {
    let needed = |m: usize| {
        let (mx, my) = (m % mcus_x, m / mcus_x);
        (mx0..=mx1).contains(&mx) && (my0..=my1).contains(&my)
    };
    let last = my1 * mcus_x + mx1;
    let total = mcus_x * mcus_y;
    let interval = if b.restart_interval == 0 {
        total
    } else {
        b.restart_interval
    };
    let mut bits = BitReader::new(jpeg, b.scan_start);
    let mut coefficients = [0i32; 64];
    let mut predictors = vec![0i32; b.components.len()];
    let mut start = 0;
    while start <= last {
        let end = (start + interval).min(total);
        if start > 0 {
            bits.restart()?;
        }
        // With restart markers, an interval without needed MCUs is passed over unread.
        if b.restart_interval == 0 || (start..end).any(needed) {
            predictors.fill(0);
            for m in start..end.min(last + 1) {
                let (mx, my) = (m % mcus_x, m / mcus_x);
                let keep = needed(m);
                for (c, comp) in b.components.iter().enumerate() {
                    let (dc, ac) = (&b.dc_tables[comp.dc], &b.ac_tables[comp.ac]);
                    for by in 0..comp.v {
                        for bx in 0..comp.h {
                            if !keep {
                                decode_block::<false>(
                                    &mut bits,
                                    dc,
                                    ac,
                                    &mut predictors[c],
                                    &comp.quant,
                                    &mut coefficients,
                                )?;
                                continue;
                            }
                            let dc_only = decode_block::<true>(
                                &mut bits,
                                dc,
                                ac,
                                &mut predictors[c],
                                &comp.quant,
                                &mut coefficients,
                            )?;
                            let plane = &mut planes[c];
                            let px = (mx * comp.h + bx) * 8 - plane.x0;
                            let py = (my * comp.v + by) * 8 - plane.y0;
                            let w = plane.width;
                            let dst = &mut plane.samples[py * w + px..];
                            if dc_only {
                                let v = ((coefficients[0].wrapping_add(4 + 1024)) >> 3)
                                    .clamp(0, 255) as u8;
                                for row in 0..8 {
                                    dst[row * w..row * w + 8].fill(v);
                                }
                            } else {
                                idct_islow(&coefficients, dst, w);
                            }
                            coefficients = [0; 64];
                        }
                    }
                }
                if bits.overran() {
                    return Err("the JPEG data ends early or is corrupt".into());
                }
            }
        }
        start = end;
    }
    Ok(())
}

/// Decodes one block's Huffman codes, updating the DC predictor. With `STORE`, writes the
/// dequantized coefficients in natural order into `out` (which must be zero) and says whether
/// the DC is the only one.
#[inline(always)]
fn decode_block<const STORE: bool>(
    bits: &mut BitReader,
    dc: &Huffman,
    ac: &Huffman,
    predictor: &mut i32,
    quant: &[i32; 64],
    out: &mut [i32; 64],
) -> Result<bool, String> {
    bits.refill();
    let size = u32::from(dc.decode(bits)?);
    if size > 11 {
        return Err("corrupt DC coefficient".into());
    }
    if size > 0 {
        *predictor = predictor.wrapping_add(bits.receive_extend(size));
    }
    if STORE {
        out[0] = predictor.wrapping_mul(quant[0]);
    }
    let mut dc_only = true;
    let mut k = 1;
    while k < 64 {
        if bits.bits < 32 {
            bits.refill();
        }
        let rs = ac.decode(bits)?;
        let (run, size) = (usize::from(rs >> 4), u32::from(rs & 15));
        if size == 0 {
            if run != 15 {
                break; // end of block
            }
            k += 16;
            continue;
        }
        k += run;
        if k > 63 {
            return Err("corrupt AC coefficients".into());
        }
        if STORE {
            let v = bits.receive_extend(size);
            out[ZIGZAG[k]] = v.wrapping_mul(quant[k]);
            dc_only = false;
        } else {
            bits.consume(size);
        }
        k += 1;
    }
    Ok(dc_only)
}

/// The islow integer IDCT (Loeffler–Ligtenberg–Moschytz with 12-bit constants, libjpeg's
/// `jidctint` and stb_image's arithmetic) of natural-order coefficients, clamped to 8 bits and
/// written as an 8×8 block at `out` with row stride `stride`. Columns first, then rows, each
/// pass over eight lanes at once so that it vectorizes.
#[inline(always)]
fn idct_islow(coefficients: &[i32; 64], out: &mut [u8], stride: usize) {
    let mut rows = [[0i32; 8]; 8];
    for (r, row) in rows.iter_mut().enumerate() {
        row.copy_from_slice(&coefficients[r * 8..r * 8 + 8]);
    }
    // Pass 1 along each column (lanes = columns), scaled by 2^2 with rounding.
    let pass1 = idct_lanes(&rows, 512, 10);
    let mut transposed = [[0i32; 8]; 8];
    for (r, row) in pass1.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            transposed[c][r] = v;
        }
    }
    // Pass 2 along each row (lanes = rows), with the +128 level shift and rounding folded in.
    let pass2 = idct_lanes(&transposed, 512 + 65536 + (128 << 17), 17);
    // pass2[column][row]
    for r in 0..8 {
        let dst = &mut out[r * stride..r * stride + 8];
        for (c, d) in dst.iter_mut().enumerate() {
            *d = pass2[c][r].clamp(0, 255) as u8;
        }
    }
}

/// The 1-D islow IDCT of `s[0..8]` (each an 8-lane vector), lane by lane:
/// `(sum + bias) >> shift`.
#[inline(always)]
fn idct_lanes(s: &[[i32; 8]; 8], bias: i32, shift: u32) -> [[i32; 8]; 8] {
    // round(x · 4096) of the cosine factors, truncated toward zero as stb's f2f.
    const F0_541: i32 = 2217;
    const F1_847: i32 = -7567;
    const F0_765: i32 = 3135;
    const F1_175: i32 = 4816;
    const F0_298: i32 = 1223;
    const F2_053: i32 = 8410;
    const F3_072: i32 = 12586;
    const F1_501: i32 = 6149;
    const F0_899: i32 = -3685;
    const F2_562: i32 = -10497;
    const F1_961: i32 = -8034;
    const F0_390: i32 = -1597;
    let mut o = [[0i32; 8]; 8];
    for l in 0..8 {
        let (c0, c1, c2, c3) = (s[0][l], s[1][l], s[2][l], s[3][l]);
        let (c4, c5, c6, c7) = (s[4][l], s[5][l], s[6][l], s[7][l]);
        // Even part.
        let p1 = c2.wrapping_add(c6).wrapping_mul(F0_541);
        let t2 = p1.wrapping_add(c6.wrapping_mul(F1_847));
        let t3 = p1.wrapping_add(c2.wrapping_mul(F0_765));
        let t0 = c0.wrapping_add(c4).wrapping_shl(12);
        let t1 = c0.wrapping_sub(c4).wrapping_shl(12);
        let x0 = t0.wrapping_add(t3).wrapping_add(bias);
        let x3 = t0.wrapping_sub(t3).wrapping_add(bias);
        let x1 = t1.wrapping_add(t2).wrapping_add(bias);
        let x2 = t1.wrapping_sub(t2).wrapping_add(bias);
        // Odd part.
        let p3 = c7.wrapping_add(c3);
        let p4 = c5.wrapping_add(c1);
        let p1 = c7.wrapping_add(c1);
        let p2 = c5.wrapping_add(c3);
        let p5 = p3.wrapping_add(p4).wrapping_mul(F1_175);
        let p1 = p5.wrapping_add(p1.wrapping_mul(F0_899));
        let p2 = p5.wrapping_add(p2.wrapping_mul(F2_562));
        let p3 = p3.wrapping_mul(F1_961);
        let p4 = p4.wrapping_mul(F0_390);
        let o3 = c1.wrapping_mul(F1_501).wrapping_add(p1).wrapping_add(p4);
        let o2 = c3.wrapping_mul(F3_072).wrapping_add(p2).wrapping_add(p3);
        let o1 = c5.wrapping_mul(F2_053).wrapping_add(p2).wrapping_add(p4);
        let o0 = c7.wrapping_mul(F0_298).wrapping_add(p1).wrapping_add(p3);
        o[0][l] = x0.wrapping_add(o3) >> shift;
        o[1][l] = x1.wrapping_add(o2) >> shift;
        o[2][l] = x2.wrapping_add(o1) >> shift;
        o[3][l] = x3.wrapping_add(o0) >> shift;
        o[4][l] = x3.wrapping_sub(o0) >> shift;
        o[5][l] = x2.wrapping_sub(o1) >> shift;
        o[6][l] = x1.wrapping_sub(o2) >> shift;
        o[7][l] = x0.wrapping_sub(o3) >> shift;
    }
    o
}
