//! An SVG chart of heartbeat intervals over time, with the NAT timeouts they must stay
//! under: what a lab scenario shows a person. Text is left to the SVG viewer's fonts, so
//! no font files are needed to draw it.

use std::io;
use std::path::Path;

use plotters::prelude::*;

/// One heartbeat's interval over time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// Shown in the legend.
    pub label: String,
    /// `(t seconds, interval seconds)`, drawn as a step line: each interval holds until
    /// the next point.
    pub points: Vec<(f64, f64)>,
    /// `(t, interval, text)` points to mark, e.g. failures.
    pub marks: Vec<(f64, f64, String)>,
}

/// A dashed horizontal line over a time segment, e.g. "NAT timeout 25 s" while on Wi-Fi.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HLine {
    /// Written just above the line's start.
    pub label: String,
    /// Height in interval seconds.
    pub y: f64,
    /// Where the line starts, in seconds.
    pub from_t: f64,
    /// Where the line ends, in seconds.
    pub to_t: f64,
}

const SIZE: (u32, u32) = (960, 540);
const FONT: &str = "sans-serif";
const SERIES_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];
const LINE_COLOUR: RGBColor = RGBColor(214, 39, 40);

/// Writes the chart to `path`: time (s) across, interval (s) up, one coloured step line
/// per series with its marks, the dashed lines, and a legend.
pub fn write_svg(path: &Path, title: &str, series: &[Series], lines: &[HLine]) -> io::Result<()> {
    let (t_max, y_max) = extent(series, lines);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(io::Error::other)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(io::Error::other)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("heartbeat interval (s)")
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(io::Error::other)?;

    let line_style = LINE_COLOUR.stroke_width(2);
    for line in lines {
        let ends = [(line.from_t, line.y), (line.to_t, line.y)];
        chart
            .draw_series(DashedLineSeries::new(ends, 10, 6, line_style))
            .map_err(io::Error::other)?;
        let text = (FONT, 13).into_font().color(&LINE_COLOUR);
        chart
            .draw_series(
                [EmptyElement::at(ends[0]) + Text::new(line.label.clone(), (4, -17), text)],
            )
            .map_err(io::Error::other)?;
    }

    for (i, s) in series.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        let style = colour.stroke_width(2);
        chart
            .draw_series(LineSeries::new(steps(&s.points), style))
            .map_err(io::Error::other)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
        let text = (FONT, 12).into_font().color(&colour);
        chart
            .draw_series(s.marks.iter().map(|(t, y, label)| {
                EmptyElement::at((*t, *y))
                    + Cross::new((0, 0), 5, style)
                    + Text::new(label.clone(), (7, 3), text.clone())
            }))
            .map_err(io::Error::other)?;
    }

    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(io::Error::other)?;
    }
    root.present().map_err(io::Error::other)
}

/// The step line through `points`: each value holds until the next point's time.
fn steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    for (i, &(t, y)) in points.iter().enumerate() {
        if i > 0 {
            out.push((t, points[i - 1].1));
        }
        out.push((t, y));
    }
    out
}

/// The axes' upper ends: the latest time and the highest value seen, plus headroom for
/// labels; 1 s when there is nothing to draw.
fn extent(series: &[Series], lines: &[HLine]) -> (f64, f64) {
    let times = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.0)
                .chain(s.marks.iter().map(|m| m.0))
        })
        .chain(lines.iter().map(|l| l.to_t));
    let values = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.1)
                .chain(s.marks.iter().map(|m| m.1))
        })
        .chain(lines.iter().map(|l| l.y));
    let max = |it: &mut dyn Iterator<Item = f64>| it.filter(|v| v.is_finite()).fold(0f64, f64::max);
    let t_max = max(&mut { times });
    let y_max = max(&mut { values }) * 1.2;
    (
        if t_max > 0.0 { t_max } else { 1.0 },
        if y_max > 0.0 { y_max } else { 1.0 },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_line_holds_each_interval_until_the_next_point() {
        let points = [(0.0, 5.0), (10.0, 7.0), (20.0, 3.0)];
        assert_eq!(
            steps(&points),
            vec![
                (0.0, 5.0),
                (10.0, 5.0),
                (10.0, 7.0),
                (20.0, 7.0),
                (20.0, 3.0)
            ]
        );
        assert!(steps(&[]).is_empty());
    }

    #[test]
    fn empty_chart_still_has_positive_axes() {
        assert_eq!(extent(&[], &[]), (1.0, 1.0));
    }
}
