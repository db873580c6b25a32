//! `ringbd bench --plot`: IOPS (bars, left axis) and MiB/s (line, right
//! axis) per block size, drawn into a PNG in-process with plotters. Text is
//! rasterised with ab_glyph from an embedded DejaVu Sans, so the plot needs
//! neither Python nor the system's fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// Size of the image in pixels (matplotlib's 8 x 4.5 inches at 100 dpi, as
/// the Python plot this replaced).
pub const SIZE: (u32, u32) = (800, 450);

/// The bars (IOPS) and the line (MiB/s): matplotlib's tab:blue and tab:red.
pub const BAR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub const LINE: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// One block size's results.
pub struct Point {
    /// The block size as the table prints it (`4k`, `1m`).
    pub label: String,
    pub iops: f64,
    pub mibs: f64,
}

/// Draws `points` under `title` into the PNG `path`.
pub fn draw(title: &str, points: &[Point], path: &Path) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    render(root, title, points).map_err(|e| fail(&e))?;
    Ok(())
}

/// Draws into an RGB buffer of `SIZE` (3 bytes a pixel), for tests.
#[cfg(test)]
fn draw_rgb(title: &str, points: &[Point]) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        render(root, title, points).map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

/// plotters looks fonts up by family name; ab_glyph has only those
/// registered, so the embedded font is registered as the default family.
fn register_font() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "the embedded DejaVu Sans font does not parse".to_owned());
    });
    result
}

fn render<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    points: &[Point],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    register_font()?;
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let n = points.len().max(1);
    // Headroom above the tallest bar and point, for the legend.
    let top = |v: f64| if v > 0.0 && v.is_finite() { v * 1.25 } else { 1.0 };
    let max_iops = top(points.iter().map(|p| p.iops).fold(0.0, f64::max));
    let max_mibs = top(points.iter().map(|p| p.mibs).fold(0.0, f64::max));
    // One slot per block size, labelled at its centre; the line's points
    // sit at the same centres on the secondary (MiB/s) coordinates.
    // (A segmented 0..k has k + 1 slots.)
    let slots = i32::try_from(n).unwrap_or(i32::MAX);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d((0..slots - 1).into_segmented(), 0.0..max_iops)
        .map_err(e)?
        .set_secondary_coord(0.0..n as f64, 0.0..max_mibs);
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => {
            usize::try_from(*i).ok().and_then(|i| points.get(i)).map(|p| p.label.clone()).unwrap_or_default()
        }
        _ => String::new(),
    };
    let gap = (chart.plotting_area().dim_in_pixel().0 / n as u32 / 10).max(1);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("block size")
        .y_desc("IOPS")
        .x_labels(n)
        .x_label_formatter(&label)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(e)?;
    chart
        .configure_secondary_axes()
        .y_desc("MiB/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(points.iter().zip(0..).map(|(p, i)| {
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), p.iops)],
                BAR.filled(),
            );
            // A tenth of the slot on each side, as matplotlib's default bars.
            bar.set_margin(0, 0, gap, gap);
            bar
        }))
        .map_err(e)?
        .label("IOPS")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], BAR.filled()));
    let line = points.iter().enumerate().map(|(i, p)| (i as f64 + 0.5, p.mibs));
    chart
        .draw_secondary_series(LineSeries::new(line.clone(), LINE.stroke_width(2)))
        .map_err(e)?
        .label("MiB/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], LINE.stroke_width(2)));
    chart.draw_secondary_series(line.map(|xy| Circle::new(xy, 4, LINE.filled()))).map_err(e)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points() -> Vec<Point> {
        [("4k", 90_000.0, 351.6), ("64k", 20_000.0, 1250.0), ("1m", 1_500.0, 1500.0)]
            .into_iter()
            .map(|(l, iops, mibs)| Point { label: l.into(), iops, mibs })
            .collect()
    }

    fn count(buf: &[u8], want: impl Fn(&[u8]) -> bool) -> usize {
        buf.chunks_exact(3).filter(|p| want(p)).count()
    }

    #[test]
    fn bars_line_and_text_are_drawn() {
        let buf = draw_rgb("ringbd bench randread qd=32 conns=2", &points()).unwrap();
        let bar = count(&buf, |p| p == [BAR.0, BAR.1, BAR.2]);
        let line = count(&buf, |p| p == [LINE.0, LINE.1, LINE.2]);
        // Glyphs and axes: dark pixels.
        let dark = count(&buf, |p| p.iter().all(|&c| c < 80));
        let white = count(&buf, |p| p == [255, 255, 255]);
        // The 4k bar alone is most of the plot's height and ~1/5 of its width.
        assert!(bar > 20_000, "{bar} bar pixels");
        assert!(line > 300, "{line} line pixels");
        assert!(dark > 1_000, "{dark} dark pixels");
        assert!(white > 100_000, "{white} white pixels");
    }

    #[test]
    fn writes_a_png_of_the_stated_size() {
        let dir = std::env::temp_dir().join(format!("ringbd-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.png");
        draw("t", &points(), &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // The first chunk is IHDR: length 13, then width and height.
        assert_eq!(&png[8..16], b"\0\0\0\x0dIHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!((be(&png[16..20]), be(&png[20..24])), SIZE);
        // A blank 800x450 image compresses to well under 2 KiB.
        assert!(png.len() > 8_000, "{} bytes", png.len());
    }

    #[test]
    fn empty_and_zero_results_still_draw() {
        draw_rgb("t", &[]).unwrap();
        draw_rgb("t", &[Point { label: "4k".into(), iops: 0.0, mibs: f64::NAN }]).unwrap();
    }
}
