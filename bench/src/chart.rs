//! PNG charts for the benchmark results: line charts (latency percentiles against load) and
//! grouped bar charts (a scenario against its reference), one or more panels per image.
//!
//! Drawn with embedded-graphics (its built-in bitmap fonts, so no font files and no C
//! libraries) into an RGB buffer, encoded with the `png` crate.

use std::path::Path;

use anyhow::Context as _;
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_7X13_BOLD};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{
    Circle, Line, PrimitiveStyle, PrimitiveStyleBuilder, Rectangle,
};
use embedded_graphics::text::{Alignment, Baseline, Text, TextStyleBuilder};

const PANEL_W: u32 = 960;
const PANEL_H: u32 = 420;
const LEFT: i32 = 78;
const RIGHT: i32 = 230;
const TOP: i32 = 42;
const BOTTOM: i32 = 52;

/// Series colours, in order. Reference series are drawn dashed in the same palette.
const PALETTE: [Rgb888; 6] = [
    Rgb888::new(0x1f, 0x77, 0xb4),
    Rgb888::new(0xd6, 0x27, 0x28),
    Rgb888::new(0x2c, 0xa0, 0x2c),
    Rgb888::new(0xff, 0x7f, 0x0e),
    Rgb888::new(0x94, 0x67, 0xbd),
    Rgb888::new(0x8c, 0x56, 0x4b),
];
const INK: Rgb888 = Rgb888::new(0x22, 0x22, 0x22);
const GRID: Rgb888 = Rgb888::new(0xe4, 0xe4, 0xe4);
const BOUND: Rgb888 = Rgb888::new(0x99, 0x99, 0x99);

/// One line: its legend name and its points (x, y).
pub(crate) struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Dashed: the reference (nats-server, pg_recvlogical, the run without RLS...).
    pub dashed: bool,
    /// Index into the palette; series of the same percentile share a colour.
    pub colour: usize,
}

pub(crate) struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic y axis (latencies spanning decades).
    pub log_y: bool,
    pub series: Vec<Series>,
    /// A horizontal line marking a bound (e.g. the p99 target), with its label.
    pub bound: Option<(f64, String)>,
}

/// Bars grouped by category; one bar per series in each group.
pub(crate) struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// (name, one value per category, dashed outline for a reference)
    pub series: Vec<(String, Vec<f64>, bool)>,
}

pub(crate) enum Panel {
    Line(LineChart),
    Bars(BarChart),
}

/// Writes the panels one above the other into a PNG at `path`.
pub(crate) fn write_png(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let mut canvas = Canvas::new(PANEL_W, PANEL_H * panels.len().max(1) as u32);
    for (i, panel) in panels.iter().enumerate() {
        let area = Rectangle::new(
            Point::new(0, (PANEL_H * i as u32) as i32),
            Size::new(PANEL_W, PANEL_H),
        );
        match panel {
            Panel::Line(c) => draw_line_chart(&mut canvas, area, c),
            Panel::Bars(c) => draw_bar_chart(&mut canvas, area, c),
        }
    }
    canvas.save(path)
}

/// An RGB pixel buffer, white to start with.
struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            rgb: vec![0xff; (width * height * 3) as usize],
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.rgb)?;
        writer.finish()?;
        Ok(())
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(p, c) in pixels {
            if p.x < 0 || p.y < 0 || p.x >= self.width as i32 || p.y >= self.height as i32 {
                continue;
            }
            let i = ((p.y as u32 * self.width + p.x as u32) * 3) as usize;
            self.rgb[i] = c.r();
            self.rgb[i + 1] = c.g();
            self.rgb[i + 2] = c.b();
        }
        Ok(())
    }
}

fn text(canvas: &mut Canvas, s: &str, at: Point, font: &MonoFont<'_>, align: Alignment) {
    let style = MonoTextStyle::new(font, INK);
    let layout = TextStyleBuilder::new()
        .alignment(align)
        .baseline(Baseline::Middle)
        .build();
    let _ = Text::with_text_style(s, at, style, layout).draw(canvas);
}

fn line(canvas: &mut Canvas, a: Point, b: Point, colour: Rgb888, width: u32) {
    let _ = Line::new(a, b)
        .into_styled(PrimitiveStyle::with_stroke(colour, width))
        .draw(canvas);
}

/// A dashed segment: 7 px drawn, 5 px skipped, along the line.
fn dashed(canvas: &mut Canvas, a: Point, b: Point, colour: Rgb888, width: u32) {
    let (dx, dy) = ((b.x - a.x) as f64, (b.y - a.y) as f64);
    let len = (dx * dx + dy * dy).sqrt();
    if len < 1.0 {
        return;
    }
    let mut t = 0.0;
    while t < len {
        let t2 = (t + 7.0).min(len);
        let p = |s: f64| Point::new(a.x + (dx * s / len) as i32, a.y + (dy * s / len) as i32);
        line(canvas, p(t), p(t2), colour, width);
        t += 12.0;
    }
}

/// Axis ticks for [lo, hi]: 1, 2 or 5 times a power of ten, about five of them.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + step * 1e-9 {
        out.push(v);
        v += step;
    }
    out
}

/// "2.4M", "400k", "35", "0.5": short labels for counts and rates.
pub(crate) fn short_number(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if a >= 1e3 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if a >= 10.0 || a == 0.0 {
        trim(format!("{v:.0}"))
    } else {
        trim(format!("{v:.2}"))
    }
}

/// A panel's title, its plot frame and its y-axis label; returns the plot area.
fn frame_and_title(canvas: &mut Canvas, area: Rectangle, title: &str, y_label: &str) -> Rectangle {
    text(
        canvas,
        title,
        Point::new(
            area.top_left.x + PANEL_W as i32 / 2 - RIGHT / 2,
            area.top_left.y + 18,
        ),
        &FONT_7X13_BOLD,
        Alignment::Center,
    );
    let plot = Rectangle::new(
        area.top_left + Point::new(LEFT, TOP),
        Size::new(
            (area.size.width as i32 - LEFT - RIGHT) as u32,
            (area.size.height as i32 - TOP - BOTTOM) as u32,
        ),
    );
    let _ = plot
        .into_styled(
            PrimitiveStyleBuilder::new()
                .stroke_color(INK)
                .stroke_width(1)
                .build(),
        )
        .draw(canvas);
    text(
        canvas,
        y_label,
        Point::new(plot.top_left.x - LEFT + 6, plot.top_left.y - 12),
        &FONT_6X10,
        Alignment::Left,
    );
    plot
}

fn legend_entry(
    canvas: &mut Canvas,
    plot: Rectangle,
    row: usize,
    name: &str,
    colour: Rgb888,
    is_dashed: bool,
    bar: bool,
) {
    let x = plot.top_left.x + plot.size.width as i32 + 16;
    let y = plot.top_left.y + 8 + row as i32 * 18;
    if bar {
        let _ = Rectangle::new(Point::new(x, y - 5), Size::new(24, 11))
            .into_styled(bar_style(colour, is_dashed))
            .draw(canvas);
    } else if is_dashed {
        dashed(canvas, Point::new(x, y), Point::new(x + 24, y), colour, 2);
    } else {
        line(canvas, Point::new(x, y), Point::new(x + 24, y), colour, 2);
    }
    text(
        canvas,
        name,
        Point::new(x + 30, y),
        &FONT_6X10,
        Alignment::Left,
    );
}

/// A bar: filled, or outlined for a reference.
fn bar_style(colour: Rgb888, reference: bool) -> PrimitiveStyle<Rgb888> {
    if reference {
        PrimitiveStyleBuilder::new()
            .stroke_color(colour)
            .stroke_width(2)
            .build()
    } else {
        PrimitiveStyle::with_fill(colour)
    }
}

/// A horizontal grid line at `py`, its tick and its label.
fn y_tick(canvas: &mut Canvas, plot: Rectangle, value: f64, py: i32) {
    let right = plot.top_left.x + plot.size.width as i32;
    line(
        canvas,
        Point::new(plot.top_left.x + 1, py),
        Point::new(right - 1, py),
        GRID,
        1,
    );
    line(
        canvas,
        Point::new(plot.top_left.x - 4, py),
        Point::new(plot.top_left.x, py),
        INK,
        1,
    );
    text(
        canvas,
        &short_number(value),
        Point::new(plot.top_left.x - 7, py),
        &FONT_6X10,
        Alignment::Right,
    );
}

fn draw_line_chart(canvas: &mut Canvas, area: Rectangle, c: &LineChart) {
    let plot = frame_and_title(canvas, area, &c.title, &c.y_label);
    let pts = || c.series.iter().flat_map(|s| s.points.iter().copied());
    let usable = |y: f64| y.is_finite() && (!c.log_y || y > 0.0);
    let xs: Vec<f64> = pts().map(|p| p.0).filter(|x| x.is_finite()).collect();
    let mut ys: Vec<f64> = pts().map(|p| p.1).filter(|y| usable(*y)).collect();
    if let Some((b, _)) = &c.bound {
        ys.push(*b);
    }
    let (x_lo, x_hi) = (0.0, xs.iter().copied().fold(1.0, f64::max) * 1.05);
    let (y_lo, y_hi) = if c.log_y {
        let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().fold(0.0, f64::max);
        let lo = if lo.is_finite() { lo } else { 0.1 };
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.max(lo * 10.0).log10().ceil()),
        )
    } else {
        (0.0, ys.iter().copied().fold(1.0, f64::max) * 1.1)
    };
    let (px0, py0) = (plot.top_left.x as f64, plot.top_left.y as f64);
    let (pw, ph) = (plot.size.width as f64, plot.size.height as f64);
    let to_x = |x: f64| (px0 + (x - x_lo) / (x_hi - x_lo) * pw) as i32;
    let to_y = |y: f64| {
        let f = if c.log_y {
            (y.log10() - y_lo.log10()) / (y_hi.log10() - y_lo.log10())
        } else {
            (y - y_lo) / (y_hi - y_lo)
        };
        (py0 + ph - f * ph) as i32
    };
    let bottom = plot.top_left.y + plot.size.height as i32;
    let right = plot.top_left.x + plot.size.width as i32;

    // Grid and tick labels.
    for x in linear_ticks(x_lo, x_hi) {
        let px = to_x(x);
        line(
            canvas,
            Point::new(px, plot.top_left.y + 1),
            Point::new(px, bottom - 1),
            GRID,
            1,
        );
        line(
            canvas,
            Point::new(px, bottom),
            Point::new(px, bottom + 4),
            INK,
            1,
        );
        text(
            canvas,
            &short_number(x),
            Point::new(px, bottom + 12),
            &FONT_6X10,
            Alignment::Center,
        );
    }
    let y_ticks: Vec<f64> = if c.log_y {
        let mut t = Vec::new();
        let mut d = y_lo;
        while d <= y_hi * 1.0001 {
            t.push(d);
            d *= 10.0;
        }
        t
    } else {
        linear_ticks(y_lo, y_hi)
    };
    for y in y_ticks {
        y_tick(canvas, plot, y, to_y(y));
    }
    text(
        canvas,
        &c.x_label,
        Point::new(plot.top_left.x + plot.size.width as i32 / 2, bottom + 30),
        &FONT_6X10,
        Alignment::Center,
    );

    let mut row = 0;
    if let Some((b, label)) = &c.bound {
        let py = to_y(*b);
        dashed(
            canvas,
            Point::new(plot.top_left.x, py),
            Point::new(right, py),
            BOUND,
            1,
        );
        legend_entry(canvas, plot, row, label, BOUND, true, false);
        row += 1;
    }
    for s in &c.series {
        let colour = PALETTE[s.colour % PALETTE.len()];
        let mut pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && usable(*y))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pts: Vec<Point> = pts
            .iter()
            .map(|(x, y)| Point::new(to_x(*x), to_y(*y)))
            .collect();
        for w in pts.windows(2) {
            if s.dashed {
                dashed(canvas, w[0], w[1], colour, 2);
            } else {
                line(canvas, w[0], w[1], colour, 2);
            }
        }
        for p in &pts {
            let _ = Circle::with_center(*p, 7)
                .into_styled(PrimitiveStyle::with_fill(colour))
                .draw(canvas);
        }
        legend_entry(canvas, plot, row, &s.name, colour, s.dashed, false);
        row += 1;
    }
}

fn draw_bar_chart(canvas: &mut Canvas, area: Rectangle, c: &BarChart) {
    let plot = frame_and_title(canvas, area, &c.title, &c.y_label);
    let hi = c
        .series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1e-9, f64::max)
        * 1.15;
    let bottom = plot.top_left.y + plot.size.height as i32;
    let to_y = |v: f64| bottom - (v / hi * plot.size.height as f64) as i32;
    for y in linear_ticks(0.0, hi) {
        y_tick(canvas, plot, y, to_y(y));
    }
    let groups = c.categories.len().max(1) as i32;
    let group_w = plot.size.width as i32 / groups;
    let n = c.series.len().max(1) as i32;
    let bar_w = ((group_w - 24) / n).max(2);
    for (g, name) in c.categories.iter().enumerate() {
        let gx = plot.top_left.x + g as i32 * group_w + 12;
        text(
            canvas,
            name,
            Point::new(gx + (group_w - 24) / 2, bottom + 12),
            &FONT_6X10,
            Alignment::Center,
        );
        for (si, (_, values, is_ref)) in c.series.iter().enumerate() {
            let Some(v) = values.get(g).copied().filter(|v| v.is_finite()) else {
                continue;
            };
            let colour = PALETTE[si % PALETTE.len()];
            let top = to_y(v);
            let rect = Rectangle::new(
                Point::new(gx + si as i32 * bar_w, top),
                Size::new((bar_w - 4).max(1) as u32, (bottom - top).max(0) as u32),
            );
            let _ = rect.into_styled(bar_style(colour, *is_ref)).draw(canvas);
            text(
                canvas,
                &short_number(v),
                Point::new(gx + si as i32 * bar_w + (bar_w - 4) / 2, top - 8),
                &FONT_6X10,
                Alignment::Center,
            );
        }
    }
    for (row, (name, _, is_ref)) in c.series.iter().enumerate() {
        legend_entry(
            canvas,
            plot,
            row,
            name,
            PALETTE[row % PALETTE.len()],
            *is_ref,
            true,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(rgb: &[u8], c: Rgb888) -> usize {
        rgb.chunks(3)
            .filter(|p| p == &[c.r(), c.g(), c.b()])
            .count()
    }

    #[test]
    fn draws_each_series_in_its_colour_and_panels_stack() {
        let dir = std::env::temp_dir().join(format!("walcast-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        let line = LineChart {
            title: "latency against load".into(),
            x_label: "deliveries/s".into(),
            y_label: "ms".into(),
            log_y: true,
            series: vec![
                Series {
                    name: "p50".into(),
                    points: vec![(1e3, 0.5), (2e3, 1.0), (4e3, 3.0)],
                    dashed: false,
                    colour: 0,
                },
                Series {
                    name: "ref p99".into(),
                    points: vec![(1e3, 2.0), (4e3, 40.0)],
                    dashed: true,
                    colour: 1,
                },
            ],
            bound: Some((50.0, "p99 bound".into())),
        };
        let bars = BarChart {
            title: "rate".into(),
            y_label: "per s".into(),
            categories: vec!["a".into(), "b".into()],
            series: vec![
                ("walcast".into(), vec![3.0, 4.0], false),
                ("reference".into(), vec![5.0, 1.0], true),
            ],
        };
        write_png(&path, &[Panel::Line(line), Panel::Bars(bars)]).unwrap();
        let (w, h, rgb) = read(&path);
        assert_eq!((w, h), (PANEL_W, 2 * PANEL_H));
        // The solid series is drawn (points and lines), the dashed one too, and the bars.
        assert!(count(&rgb[..(PANEL_W * PANEL_H * 3) as usize], PALETTE[0]) > 200);
        assert!(count(&rgb[..(PANEL_W * PANEL_H * 3) as usize], PALETTE[1]) > 100);
        assert!(count(&rgb[(PANEL_W * PANEL_H * 3) as usize..], PALETTE[0]) > 1000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short_number(2_400_000.0), "2.4M");
        assert_eq!(short_number(400_000.0), "400k");
        assert_eq!(short_number(1_500.0), "1.5k");
        assert_eq!(short_number(35.0), "35");
        assert_eq!(short_number(0.5), "0.5");
        assert_eq!(short_number(0.0), "0");
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(linear_ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = linear_ticks(0.0, 3_400_000.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!(t.len() >= 3 && t.len() <= 7, "{t:?}");
    }
}
