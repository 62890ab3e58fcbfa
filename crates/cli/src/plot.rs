//! Training-curve charts written as PNG and SVG with no plotting dependency: one layout routine
//! drives two painters (hand-written SVG text, and an RGB raster with a built-in 5×8 bitmap font).

use std::io::Cursor;
use std::path::{Path, PathBuf};

/// One line of a chart: (x, y) points; non-finite points are skipped (they break the line).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

type Rgb = [u8; 3];
type Pt = (f64, f64);

/// Size of one chart cell, in pixels (PNG) and user units (SVG).
const CW: usize = 480;
const CH: usize = 320;
/// Plot-area margins inside a cell: y tick labels, title + legend, right edge, x tick labels.
const ML: f64 = 64.0;
const MT: f64 = 48.0;
const MR: f64 = 16.0;
const MB: f64 = 42.0;
/// A series with at most this many points also gets a dot on each point.
const DOT_MAX: usize = 30;
const PALETTE: [Rgb; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];
const GRID: Rgb = [228, 228, 228];
const INK: Rgb = [40, 40, 40];

/// Several charts in a grid (`columns` wide) in one picture: writes `<stem>.png` and `<stem>.svg`
/// (e.g. stem = run_dir/"curves"); returns the two paths. Errors name the file.
pub fn write_charts(
    charts: &[Chart],
    columns: usize,
    stem: &Path,
) -> Result<(PathBuf, PathBuf), String> {
    let cols = columns.clamp(1, charts.len().max(1));
    let (w, h) = (cols * CW, charts.len().div_ceil(cols).max(1) * CH);
    let mut svg = Svg(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    ));
    let mut png = Canvas {
        w,
        h,
        px: vec![255; w * h * 3],
    };
    for (i, chart) in charts.iter().enumerate() {
        let origin = (((i % cols) * CW) as f64, ((i / cols) * CH) as f64);
        draw_chart(&mut svg, chart, origin);
        draw_chart(&mut png, chart, origin);
    }
    svg.0 += "</svg>\n";
    let (png_path, svg_path) = (suffixed(stem, ".png"), suffixed(stem, ".svg"));
    let mut bytes = Vec::new();
    let (fmt, color) = (image::ImageFormat::Png, image::ExtendedColorType::Rgb8);
    image::write_buffer_with_format(
        &mut Cursor::new(&mut bytes),
        &png.px,
        w as u32,
        h as u32,
        color,
        fmt,
    )
    .map_err(|e| format!("{}: {e}", png_path.display()))?;
    write_atomic(&png_path, &bytes)?;
    write_atomic(&svg_path, svg.0.as_bytes())?;
    Ok((png_path, svg_path))
}

/// `path` + `ext`; not with_extension, since a stem like "run.v2/curves" may contain dots.
fn suffixed(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(ext);
    s.into()
}

/// Readers (a browser refreshing the picture) never see a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = suffixed(path, ".tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// "Nice" ticks (1/2/5 × 10^k apart) covering [lo, hi]; the first and last are the axis ends.
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decade = |v: f64| 10f64.powf(v.abs().log10().floor());
    // A flat series still needs a visible range around its value.
    let pad = if hi > lo {
        0.0
    } else if lo == 0.0 {
        1.0
    } else {
        0.5 * decade(lo)
    };
    let (lo, hi) = (lo - pad, hi + pad);
    let raw = (hi - lo) / 5.0;
    let m = raw / decade(raw);
    let step = decade(raw)
        * [(1.5, 1.0), (3.5, 2.0), (7.5, 5.0)]
            .iter()
            .find(|t| m < t.0)
            .map_or(10.0, |t| t.1);
    // The epsilon keeps 0.3 / 0.1 = 2.9999… from adding a tick below the data.
    let (a, b) = (
        (lo / step + 1e-9).floor() as i64,
        (hi / step - 1e-9).ceil() as i64,
    );
    if !step.is_finite() || b <= a || b - a > 50 {
        return vec![lo, hi]; // ranges beyond what f64 steps can resolve
    }
    (a..=b).map(|k| k as f64 * step).collect()
}

/// Labels with as many decimals as the tick step needs: "0.2", "0.00035", "950", "12k", "1.2e-5".
fn tick_labels(ticks: &[f64]) -> Vec<String> {
    let step = if ticks.len() > 1 {
        ticks[1] - ticks[0]
    } else {
        1.0
    };
    let big = ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
    // "k" only from 10k on: 950 and 5000 read better as they are.
    let (div, suffix) = [(1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")]
        .into_iter()
        .find(|&(from, _, _)| big >= from)
        .map_or((1.0, ""), |(_, d, s)| (d, s));
    let exp = |v: f64| (v.abs().log10() + 1e-9).floor();
    let decimals = (-exp(step / div)).max(0.0) as usize;
    let scientific = big >= 1e13 || decimals > 5;
    let label = |t: f64| match t {
        _ if t == 0.0 => "0".to_string(),
        _ if scientific => format!("{:.*e}", (exp(t) - exp(step)).max(0.0) as usize, t),
        _ => format!("{:.*}{suffix}", decimals, t / div),
    };
    ticks.iter().map(|&t| label(t)).collect()
}

/// Text placement: anchored left/centre/right on the point (vertically centred), title, y label.
#[derive(Clone, Copy, PartialEq)]
enum Text {
    Left,
    Centre,
    Right,
    Title,
    Vertical,
}

/// What a chart is drawn with; implemented once for SVG and once for the raster.
trait Painter {
    fn line(&mut self, a: Pt, b: Pt, color: Rgb, width: f64);
    fn text(&mut self, at: Pt, s: &str, how: Text);
    /// One series: polyline pieces (broken at non-finite points), optionally dotted.
    fn series(&mut self, pieces: &[Vec<Pt>], color: Rgb, dots: bool);
}

fn draw_chart(p: &mut impl Painter, chart: &Chart, (ox, oy): Pt) {
    let finite = |&(x, y): &Pt| x.is_finite() && y.is_finite();
    let all: Vec<Pt> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied().filter(finite))
        .collect();
    let extent = |f: fn(&Pt) -> f64| match all.is_empty() {
        true => (0.0, 1.0),
        false => all
            .iter()
            .map(f)
            .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v))),
    };
    let ((xl, xh), (yl, yh)) = (extent(|p| p.0), extent(|p| p.1));
    let (xt, yt) = (nice_ticks(xl, xh), nice_ticks(yl, yh));
    let (x0, x1, y0, y1) = (xt[0], xt[xt.len() - 1], yt[0], yt[yt.len() - 1]);
    let (l, r, t, b) = (ox + ML, ox + CW as f64 - MR, oy + MT, oy + CH as f64 - MB);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
    let sy = |y: f64| b - (y - y0) / (y1 - y0) * (b - t);

    for (v, s) in xt.iter().zip(tick_labels(&xt)) {
        let x = sx(*v).round();
        p.line((x, t), (x, b), GRID, 1.0);
        p.line((x, b), (x, b + 4.0), INK, 1.0);
        p.text((x, b + 13.0), &s, Text::Centre);
    }
    for (v, s) in yt.iter().zip(tick_labels(&yt)) {
        let y = sy(*v).round();
        p.line((l, y), (r, y), GRID, 1.0);
        p.line((l - 4.0, y), (l, y), INK, 1.0);
        p.text((l - 7.0, y), &s, Text::Right);
    }
    for (a, z) in [
        ((l, t), (r, t)),
        ((r, t), (r, b)),
        ((l, b), (r, b)),
        ((l, t), (l, b)),
    ] {
        p.line(a, z, INK, 1.0);
    }
    p.text((ox + CW as f64 / 2.0, oy + 13.0), &chart.title, Text::Title);
    p.text(
        ((l + r) / 2.0, oy + CH as f64 - 12.0),
        &chart.x_label,
        Text::Centre,
    );
    p.text((ox + 12.0, (t + b) / 2.0), &chart.y_label, Text::Vertical);

    let mut legend_x = l;
    for (i, s) in chart.series.iter().enumerate() {
        let (color, y) = (PALETTE[i % PALETTE.len()], oy + 34.0);
        p.line((legend_x, y), (legend_x + 16.0, y), color, 3.0);
        p.text((legend_x + 21.0, y), &s.name, Text::Left);
        legend_x += 35.0 + 6.0 * s.name.chars().count() as f64;
        let mut pieces = vec![Vec::new()];
        for &(x, y) in &s.points {
            match finite(&(x, y)) {
                true => pieces.last_mut().unwrap().push((sx(x), sy(y))),
                false => pieces.push(Vec::new()),
            }
        }
        pieces.retain(|piece| !piece.is_empty());
        let n: usize = pieces.iter().map(Vec::len).sum();
        if n > 0 {
            p.series(&pieces, color, n <= DOT_MAX);
        }
    }
}

struct Svg(String);

fn hex([r, g, b]: Rgb) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

impl Painter for Svg {
    fn line(&mut self, (x1, y1): Pt, (x2, y2): Pt, c: Rgb, w: f64) {
        let c = hex(c);
        self.0 += &format!(
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{c}\" stroke-width=\"{w}\"/>\n"
        );
    }
    fn text(&mut self, (x, y): Pt, s: &str, how: Text) {
        let anchor = ["start", "middle", "end", "middle", "middle"][how as usize];
        let style = match how {
            Text::Title => "font-size=\"14\" font-weight=\"bold\"".to_string(),
            Text::Vertical => format!("font-size=\"11\" transform=\"rotate(-90 {x:.1} {y:.1})\""),
            _ => "font-size=\"11\"".to_string(),
        };
        let s = s
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        self.0 += &format!(
            "<text x=\"{x:.1}\" y=\"{y:.1}\" {style} text-anchor=\"{anchor}\" dominant-baseline=\"middle\">{s}</text>\n"
        );
    }
    fn series(&mut self, pieces: &[Vec<Pt>], c: Rgb, dots: bool) {
        let mut d = String::new();
        for piece in pieces {
            for (i, (x, y)) in piece.iter().enumerate() {
                d += &format!("{}{x:.1},{y:.1} ", if i == 0 { "M" } else { "L" });
            }
        }
        let (d, c) = (d.trim_end(), hex(c));
        self.0 += &format!(
            "<path d=\"{d}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" stroke-linejoin=\"round\"/>\n"
        );
        for (x, y) in pieces.iter().flatten().filter(|_| dots) {
            self.0 += &format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{c}\"/>\n");
        }
    }
}

/// RGB raster, row-major, 3 bytes per pixel.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: f64, y: f64, c: Rgb) {
        let (x, y) = (x.round(), y.round());
        if x >= 0.0 && y >= 0.0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    /// A k×k block with its top-left corner at (x, y): pen tips and scaled font pixels.
    fn block(&mut self, (x, y): Pt, k: usize, c: Rgb) {
        for (dx, dy) in (0..k).flat_map(|dx| (0..k).map(move |dy| (dx, dy))) {
            self.put(x + dx as f64, y + dy as f64, c);
        }
    }
}

impl Painter for Canvas {
    fn line(&mut self, a: Pt, b: Pt, c: Rgb, w: f64) {
        let n = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0);
        for i in 0..=n as usize {
            let f = i as f64 / n;
            let (x, y) = (a.0 + f * (b.0 - a.0), a.1 + f * (b.1 - a.1));
            self.block(
                ((x - w / 2.0).round(), (y - w / 2.0).round()),
                w as usize,
                c,
            );
        }
    }
    fn text(&mut self, (x, y): Pt, s: &str, how: Text) {
        let k = if how == Text::Title { 2 } else { 1 };
        let width = ((6 * s.chars().count() - 1) * k) as f64;
        let u0 = [0.0, -width / 2.0, -width, -width / 2.0, -width / 2.0][how as usize].round();
        for (i, ch) in s.chars().enumerate() {
            let code = if (' '..='~').contains(&ch) { ch } else { '?' } as usize - 32;
            for (col, bits) in FONT[code * 5..code * 5 + 5].iter().enumerate() {
                for row in (0..8).filter(|row| bits >> row & 1 == 1) {
                    let u = u0 + ((i * 6 + col) * k) as f64;
                    let v = (row * k) as f64 - (4 * k) as f64;
                    // Vertical text reads bottom to top: the glyph's right is the page's up.
                    let at = if how == Text::Vertical {
                        (x + v, y - u)
                    } else {
                        (x + u, y + v)
                    };
                    self.block(at, k, INK);
                }
            }
        }
    }
    fn series(&mut self, pieces: &[Vec<Pt>], c: Rgb, dots: bool) {
        for piece in pieces {
            for pair in piece.windows(2) {
                self.line(pair[0], pair[1], c, 2.0);
            }
            for &(x, y) in piece.iter().filter(|_| dots) {
                for (dx, dy) in (-3..=3).flat_map(|dx| (-3..=3).map(move |dy| (dx, dy))) {
                    if dx * dx + dy * dy <= 10 {
                        self.put(x + dx as f64, y + dy as f64, c);
                    }
                }
            }
        }
    }
}

/// 5×8 bitmap font for ASCII 32..=126: five column bytes per glyph, bit 0 = top row,
/// rows 0–6 above the baseline, row 7 for descenders.
#[rustfmt::skip]
const FONT: [u8; 95 * 5] = [
    0x00,0x00,0x00,0x00,0x00, 0x00,0x00,0x5F,0x00,0x00, 0x00,0x07,0x00,0x07,0x00, 0x14,0x7F,0x14,0x7F,0x14, //  !"#
    0x24,0x2A,0x7F,0x2A,0x12, 0x23,0x13,0x08,0x64,0x62, 0x36,0x49,0x55,0x22,0x50, 0x00,0x05,0x03,0x00,0x00, // $%&'
    0x00,0x1C,0x22,0x41,0x00, 0x00,0x41,0x22,0x1C,0x00, 0x08,0x2A,0x1C,0x2A,0x08, 0x08,0x08,0x3E,0x08,0x08, // ()*+
    0x00,0x50,0x30,0x00,0x00, 0x08,0x08,0x08,0x08,0x08, 0x00,0x60,0x60,0x00,0x00, 0x20,0x10,0x08,0x04,0x02, // ,-./
    0x3E,0x51,0x49,0x45,0x3E, 0x00,0x42,0x7F,0x40,0x00, 0x42,0x61,0x51,0x49,0x46, 0x21,0x41,0x45,0x4B,0x31, // 0123
    0x18,0x14,0x12,0x7F,0x10, 0x27,0x45,0x45,0x45,0x39, 0x3C,0x4A,0x49,0x49,0x30, 0x01,0x71,0x09,0x05,0x03, // 4567
    0x36,0x49,0x49,0x49,0x36, 0x06,0x49,0x49,0x29,0x1E, 0x00,0x36,0x36,0x00,0x00, 0x00,0x56,0x36,0x00,0x00, // 89:;
    0x08,0x14,0x22,0x41,0x00, 0x14,0x14,0x14,0x14,0x14, 0x00,0x41,0x22,0x14,0x08, 0x02,0x01,0x51,0x09,0x06, // <=>?
    0x32,0x49,0x79,0x41,0x3E, 0x7E,0x11,0x11,0x11,0x7E, 0x7F,0x49,0x49,0x49,0x36, 0x3E,0x41,0x41,0x41,0x22, // @ABC
    0x7F,0x41,0x41,0x22,0x1C, 0x7F,0x49,0x49,0x49,0x41, 0x7F,0x09,0x09,0x09,0x01, 0x3E,0x41,0x49,0x49,0x7A, // DEFG
    0x7F,0x08,0x08,0x08,0x7F, 0x00,0x41,0x7F,0x41,0x00, 0x20,0x40,0x41,0x3F,0x01, 0x7F,0x08,0x14,0x22,0x41, // HIJK
    0x7F,0x40,0x40,0x40,0x40, 0x7F,0x02,0x0C,0x02,0x7F, 0x7F,0x04,0x08,0x10,0x7F, 0x3E,0x41,0x41,0x41,0x3E, // LMNO
    0x7F,0x09,0x09,0x09,0x06, 0x3E,0x41,0x51,0x21,0x5E, 0x7F,0x09,0x19,0x29,0x46, 0x46,0x49,0x49,0x49,0x31, // PQRS
    0x01,0x01,0x7F,0x01,0x01, 0x3F,0x40,0x40,0x40,0x3F, 0x1F,0x20,0x40,0x20,0x1F, 0x3F,0x40,0x38,0x40,0x3F, // TUVW
    0x63,0x14,0x08,0x14,0x63, 0x07,0x08,0x70,0x08,0x07, 0x61,0x51,0x49,0x45,0x43, 0x00,0x7F,0x41,0x41,0x00, // XYZ[
    0x02,0x04,0x08,0x10,0x20, 0x00,0x41,0x41,0x7F,0x00, 0x04,0x02,0x01,0x02,0x04, 0x80,0x80,0x80,0x80,0x80, // \]^_
    0x00,0x01,0x02,0x04,0x00, 0x20,0x54,0x54,0x54,0x78, 0x7F,0x48,0x44,0x44,0x38, 0x38,0x44,0x44,0x44,0x20, // `abc
    0x38,0x44,0x44,0x48,0x7F, 0x38,0x54,0x54,0x54,0x18, 0x08,0x7E,0x09,0x01,0x02, 0x18,0xA4,0xA4,0xA4,0x7C, // defg
    0x7F,0x08,0x04,0x04,0x78, 0x00,0x44,0x7D,0x40,0x00, 0x00,0x80,0x84,0x7D,0x00, 0x7F,0x10,0x28,0x44,0x00, // hijk
    0x00,0x41,0x7F,0x40,0x00, 0x7C,0x04,0x18,0x04,0x78, 0x7C,0x08,0x04,0x04,0x78, 0x38,0x44,0x44,0x44,0x38, // lmno
    0xFC,0x24,0x24,0x24,0x18, 0x18,0x24,0x24,0x24,0xFC, 0x7C,0x08,0x04,0x04,0x08, 0x48,0x54,0x54,0x54,0x20, // pqrs
    0x04,0x3F,0x44,0x40,0x20, 0x3C,0x40,0x40,0x20,0x7C, 0x1C,0x20,0x40,0x20,0x1C, 0x3C,0x40,0x30,0x40,0x3C, // tuvw
    0x44,0x28,0x10,0x28,0x44, 0x1C,0xA0,0xA0,0xA0,0x7C, 0x44,0x64,0x54,0x4C,0x44, 0x00,0x08,0x36,0x41,0x00, // xyz{
    0x00,0x00,0x7F,0x00,0x00, 0x00,0x41,0x36,0x08,0x00, 0x10,0x08,0x08,0x10,0x08,                            // |}~
];

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        assert!(close(
            &nice_ticks(0.0, 1.0),
            &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        ));
        assert!(close(&nice_ticks(0.3, 0.7), &[0.3, 0.4, 0.5, 0.6, 0.7]));
        let t = nice_ticks(0.00031, 0.00049);
        assert!(
            close(&t, &[0.0003, 0.00035, 0.0004, 0.00045, 0.0005]),
            "{t:?}"
        );
        assert_eq!(
            tick_labels(&t),
            ["0.00030", "0.00035", "0.00040", "0.00045", "0.00050"]
        );
        for v in [5.0, 0.0, -3e-4, 0.78, 1e12] {
            let t = nice_ticks(v, v); // all-equal values: the axis still gets a range around them
            assert!(t.len() >= 3 && t[0] < v && v < t[t.len() - 1], "{v}: {t:?}");
        }
    }

    #[test]
    fn tick_labels_stay_readable() {
        assert_eq!(tick_labels(&[0.0, 0.2, 0.4]), ["0", "0.2", "0.4"]);
        assert_eq!(
            tick_labels(&[0.0, 0.0005, 0.001]),
            ["0", "0.0005", "0.0010"]
        );
        assert_eq!(
            tick_labels(&nice_ticks(900.0, 1000.0))[1..3],
            ["920", "940"]
        );
        assert_eq!(tick_labels(&[4000.0, 5000.0]), ["4000", "5000"]);
        assert_eq!(
            tick_labels(&[10000.0, 12000.0, 14000.0]),
            ["10k", "12k", "14k"]
        );
        assert_eq!(tick_labels(&[0.0, 2e6, 4e6]), ["0", "2M", "4M"]);
        assert_eq!(
            tick_labels(&[1.1e-5, 1.2e-5, 1.3e-5]),
            ["1.1e-5", "1.2e-5", "1.3e-5"]
        );
        assert_eq!(tick_labels(&[1e15, 2e15]), ["1e15", "2e15"]);
    }

    fn chart(title: &str, series: Vec<(&str, Vec<Pt>)>) -> Chart {
        let series = series
            .into_iter()
            .map(|(n, points)| Series {
                name: n.into(),
                points,
            })
            .collect();
        Chart {
            title: title.into(),
            x_label: "epoch".into(),
            y_label: "value".into(),
            series,
        }
    }

    #[test]
    fn writes_png_and_svg_grid() {
        let (nan, inf) = (f64::NAN, f64::INFINITY);
        let rising = (0..100).map(|i| (i as f64, (i as f64).sqrt())).collect();
        let falling = (0..100)
            .map(|i| (i as f64, 3.0 - i as f64 * 0.02))
            .collect();
        let lr = vec![
            (0.0, 1e-5),
            (1.0, 2e-5),
            (2.0, nan),
            (3.0, 2.6e-5),
            (4.0, 2.2e-5),
            (5.0, inf),
            (6.0, 3e-5),
        ];
        let charts = [
            chart("loss", vec![("rising", rising), ("falling", falling)]),
            chart("top-1 accuracy", vec![("train", vec![(1.0, 0.42)])]),
            chart("learning rate", vec![("lr <&>", lr)]),
            chart(
                "throughput",
                vec![
                    ("empty", vec![]),
                    ("flat", vec![(0.0, 950.0), (9.0, 950.0)]),
                ],
            ),
        ];
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("effnet-plot-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (png, svg) = write_charts(&charts, 2, &dir.join("curves")).unwrap();
        assert_eq!(
            (&png, &svg),
            (&dir.join("curves.png"), &dir.join("curves.svg"))
        );
        assert!(!dir.join("curves.png.tmp").exists() && !dir.join("curves.svg.tmp").exists());

        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (2 * CW as u32, 2 * CH as u32));
        // Pixels of `color` strictly inside the plotting area of grid cell (col, row).
        let inside = |col: usize, row: usize, color: Rgb| -> Vec<(u32, u32)> {
            let (x0, y0) = ((col * CW) as f64 + ML, (row * CH) as f64 + MT);
            let (x1, y1) = (x0 + CW as f64 - ML - MR, y0 + CH as f64 - MT - MB);
            let within = |x: u32, y: u32| {
                x0 < x as f64 && (x as f64) < x1 && y0 < y as f64 && (y as f64) < y1
            };
            img.enumerate_pixels()
                .filter(|(x, y, p)| p.0 == color && within(*x, *y))
                .map(|(x, y, _)| (x, y))
                .collect()
        };
        let blue = inside(0, 0, PALETTE[0]);
        assert!(blue.len() > 300 && inside(0, 0, PALETTE[1]).len() > 300);
        let third = (CW as f64 - ML - MR) / 3.0;
        let mean_row = |part: f64| {
            let ys: Vec<f64> = blue
                .iter()
                .filter(|p| ((p.0 as f64 - ML) / third).floor() == part)
                .map(|p| p.1 as f64)
                .collect();
            ys.iter().sum::<f64>() / ys.len() as f64
        };
        assert!(
            mean_row(0.0) > mean_row(2.0) + 50.0,
            "a rising series goes up the picture"
        );
        assert!(
            inside(1, 0, PALETTE[0]).len() >= 25,
            "a single point shows as a dot"
        );
        assert!(inside(0, 1, PALETTE[0]).len() > 100 && inside(1, 1, PALETTE[1]).len() > 500);
        assert!(inside(1, 1, PALETTE[0]).is_empty() && inside(0, 0, PALETTE[2]).is_empty());
        for (col, row) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let title_ink = (0..CW as u32).flat_map(|x| (4..22).map(move |y| (x, y)));
            let n = title_ink
                .filter(|&(x, y)| img.get_pixel(col * CW as u32 + x, row * CH as u32 + y).0 == INK);
            assert!(n.count() > 50, "title of cell {col},{row} is drawn");
        }

        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("viewBox=\"0 0 960 640\""));
        assert!(text.trim_end().ends_with("</svg>"));
        let paths: Vec<&str> = text.lines().filter(|l| l.starts_with("<path")).collect();
        let points: Vec<usize> = paths
            .iter()
            .map(|p| p.matches(['M', 'L']).count())
            .collect();
        assert_eq!(
            points,
            [100, 100, 1, 5, 2],
            "one path per non-empty series, finite points only"
        );
        assert_eq!(
            paths[3].matches('M').count(),
            3,
            "NaN and inf break the line"
        );
        assert_eq!(
            text.matches("<circle").count(),
            1 + 5 + 2,
            "dots only on short series"
        );
        assert!(text.contains(">lr &lt;&amp;&gt;</text>") && !text.contains("<&>"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
