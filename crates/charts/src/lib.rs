//! Line charts written as PNG files: training loss curves now, metric curves later.
//!
//! Drawn with `plotters` into a pixel buffer, encoded with `image` and written atomically.
//! Text uses the bundled DejaVu Sans, so a chart looks the same on a machine without fonts.
//!
//! ```no_run
//! use inspector_charts::{Chart, Series};
//!
//! let chart = Chart {
//!     title: "Training loss".into(),
//!     x_label: "step".into(),
//!     y_label: "loss".into(),
//!     log_y: true,
//!     series: vec![Series::new("train", vec![(1.0, 7.9), (10.0, 3.8), (20.0, 1.2)])],
//! };
//! chart.save_png(std::path::Path::new("loss.png")).unwrap();
//! ```

use std::{io::Write, path::Path, sync::Once};

use plotters::{
    coord::ranged1d::{AsRangedCoord, ValueFormatter},
    prelude::*,
    style::{FontStyle, register_font},
};

/// The bundled font (DejaVu Sans; licence in `fonts/DejaVu-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
/// Series colours, in order (colour-blind-safe Okabe–Ito hues).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: cannot write: {1}")]
    Io(std::path::PathBuf, std::io::Error),
    #[error("drawing the chart: {0}")]
    Draw(String),
    #[error("nothing to draw: every series is empty or not finite")]
    Empty,
}

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Also mark every point (for sparse series such as eval loss).
    pub markers: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            markers: false,
        }
    }

    pub fn with_markers(mut self) -> Self {
        self.markers = true;
        self
    }
}

/// A line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic y axis (points with y ≤ 0 are left out).
    pub log_y: bool,
    pub series: Vec<Series>,
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Draw(e.to_string())
}

/// A tick label: no trailing zeros, scientific only for very small or large values.
fn tick(v: f64) -> String {
    let a = v.abs();
    if v != 0.0 && !(1e-3..1e6).contains(&a) {
        return format!("{v:.0e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled bytes are a valid TrueType font; a failure here would be a build defect.
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// Where the legend covers the least: upper right for curves that end low (losses), lower right
/// for curves that end high (metrics that climb towards 1). `y0..=y1` is the data's y range.
fn legend_position(
    series: &[(&Series, Vec<(f64, f64)>)],
    (y0, y1): (f64, f64),
    log_y: bool,
) -> SeriesLabelPosition {
    let scale = |v: f64| if log_y { v.ln() } else { v };
    let (lo, hi) = (scale(y0), scale(y1));
    let ends: Vec<f64> = series
        .iter()
        .filter_map(|(_, p)| p.last().map(|&(_, y)| scale(y)))
        .collect();
    if hi > lo && !ends.is_empty() {
        let mean = ends.iter().sum::<f64>() / ends.len() as f64;
        if (mean - lo) / (hi - lo) > 0.5 {
            return SeriesLabelPosition::LowerRight;
        }
    }
    SeriesLabelPosition::UpperRight
}

impl Chart {
    pub const WIDTH: u32 = 960;
    pub const HEIGHT: u32 = 540;

    /// The chart as RGB pixels, `WIDTH × HEIGHT`.
    pub fn render(&self) -> Result<image::RgbImage, Error> {
        font();
        let series: Vec<(&Series, Vec<(f64, f64)>)> = self
            .series
            .iter()
            .map(|s| {
                let pts = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(a, b)| a.is_finite() && b.is_finite() && (!self.log_y || *b > 0.0))
                    .collect();
                (s, pts)
            })
            .collect();
        let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        if all.is_empty() {
            return Err(Error::Empty);
        }
        let bounds = |f: fn(&(f64, f64)) -> f64| {
            let lo = all.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = all.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        };
        let (x0, x1) = bounds(|p| p.0);
        let pad = ((x1 - x0) * 0.03).max(if x0 == x1 { 0.5 } else { 0.0 });
        let xr = (x0 - pad)..(x1 + pad);
        let (y0, y1) = bounds(|p| p.1);
        let legend = legend_position(&series, (y0, y1), self.log_y);
        let (w, h) = (Self::WIDTH, Self::HEIGHT);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            root.fill(&WHITE).map_err(draw_err)?;
            if self.log_y {
                let yr = (y0 / 1.25)..(y1 * 1.25);
                self.draw(&root, xr, yr.log_scale(), &series, legend)?;
            } else {
                let pad = ((y1 - y0) * 0.05).max(if y0 == y1 { 0.5 } else { 0.0 });
                self.draw(&root, xr, (y0 - pad)..(y1 + pad), &series, legend)?;
            }
            root.present().map_err(draw_err)?;
        }
        Ok(image::RgbImage::from_raw(w, h, buf).expect("buffer of WIDTH × HEIGHT × 3"))
    }

    fn draw<Y>(
        &self,
        root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        xr: std::ops::Range<f64>,
        yr: Y,
        series: &[(&Series, Vec<(f64, f64)>)],
        legend: SeriesLabelPosition,
    ) -> Result<(), Error>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FAMILY, 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(xr, yr)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(if self.log_y {
                format!("{} (log scale)", self.y_label)
            } else {
                self.y_label.clone()
            })
            .label_style((FAMILY, 15))
            .y_label_formatter(&|v| tick(*v))
            .x_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(draw_err)?;
        for (k, (s, pts)) in series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
            if s.markers {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(draw_err)?;
            }
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(legend)
            .draw()
            .map_err(draw_err)?;
        Ok(())
    }

    /// Renders and writes a PNG atomically (a temporary file beside `path`, then renamed).
    pub fn save_png(&self, path: &Path) -> Result<(), Error> {
        let img = self.render()?;
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Draw(e.to_string()))?;
        let io = |e: std::io::Error| Error::Io(path.to_path_buf(), e);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // 0666 less the umask, as an ordinary file (tempfile's default is 0600).
        let mut tmp = tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log_y: bool) -> Chart {
        Chart {
            title: "Training loss".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            log_y,
            series: vec![
                Series::new(
                    "train",
                    (1..=50).map(|s| (s as f64, 8.0 / s as f64)).collect(),
                ),
                Series::new("eval", vec![(10.0, 1.0), (20.0, 0.5), (50.0, 0.3)]).with_markers(),
            ],
        }
    }

    /// Pixels of roughly the given colour.
    fn count(img: &image::RgbImage, c: RGBColor) -> usize {
        img.pixels()
            .filter(|p| {
                (p[0] as i32 - c.0 as i32).abs() < 40
                    && (p[1] as i32 - c.1 as i32).abs() < 40
                    && (p[2] as i32 - c.2 as i32).abs() < 40
            })
            .count()
    }

    #[test]
    fn both_series_and_text_are_drawn() {
        for log_y in [false, true] {
            let img = chart(log_y).render().unwrap();
            assert_eq!(img.dimensions(), (Chart::WIDTH, Chart::HEIGHT));
            // Each series' colour shows up as a line, and text (dark pixels) is there.
            assert!(count(&img, PALETTE[0]) > 500, "train line");
            assert!(count(&img, PALETTE[1]) > 100, "eval line and markers");
            assert!(count(&img, RGBColor(0, 0, 0)) > 1000, "axes and labels");
        }
    }

    #[test]
    fn the_legend_goes_where_the_curves_do_not_end() {
        let falling = Series::new("loss", vec![(0.0, 8.0), (1.0, 1.0), (2.0, 0.5)]);
        let rising = Series::new("F1", vec![(0.0, 0.1), (1.0, 0.8), (2.0, 0.95)]);
        let at = |s: &Series| {
            let pts = s.points.clone();
            let ys = pts.iter().map(|p| p.1);
            let range = (
                ys.clone().fold(f64::INFINITY, f64::min),
                ys.fold(f64::NEG_INFINITY, f64::max),
            );
            legend_position(&[(s, pts)], range, false)
        };
        assert!(matches!(at(&falling), SeriesLabelPosition::UpperRight));
        assert!(matches!(at(&rising), SeriesLabelPosition::LowerRight));
    }

    #[test]
    fn an_empty_chart_is_an_error_and_a_saved_one_is_a_png() {
        let mut c = chart(true);
        c.series = vec![Series::new("train", vec![(1.0, f64::NAN), (2.0, 0.0)])];
        assert!(matches!(c.render(), Err(Error::Empty)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        chart(true).save_png(&path).unwrap();
        let back = image::open(&path).unwrap();
        assert_eq!((back.width(), back.height()), (Chart::WIDTH, Chart::HEIGHT));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
