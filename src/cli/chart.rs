//! The experiments' figures: one value against batch size (log2 axis), a line per series with
//! a bar per point, and dashed reference levels (raw pixels, say). Plain SVG, no dependency.

use std::fmt::Write;

pub struct Point {
    pub batch_size: usize,
    pub value: f64,
    /// The bar's ends (a spread: p10..p90, or mean ± one standard deviation).
    pub low: f64,
    pub high: f64,
}

pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

pub struct Chart {
    pub y_label: String,
    pub series: Vec<Series>,
    /// Horizontal dashed lines with their labels.
    pub levels: Vec<(String, f64)>,
    /// The y axis' range; `None` fits it to the data and levels.
    pub y_range: Option<(f64, f64)>,
}

const COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const W: f64 = 640.0;
const H: f64 = 400.0;
const PAD: f64 = 50.0;

impl Chart {
    fn fitted_range(&self) -> (f64, f64) {
        if let Some(range) = self.y_range {
            return range;
        }
        let values = self.series.iter().flat_map(|s| {
            s.points
                .iter()
                .flat_map(|p| [p.low, p.high, p.value])
                .filter(|v| v.is_finite())
        });
        let all: Vec<f64> = values.chain(self.levels.iter().map(|l| l.1)).collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let margin = ((hi - lo) * 0.1).max(0.005);
        (lo - margin, hi + margin)
    }

    pub fn svg(&self) -> String {
        let mut sizes: Vec<usize> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.batch_size))
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let log = |b: usize| (b.max(1) as f64).log2();
        let (x_lo, x_hi) = (
            sizes.first().map_or(1.0, |&b| log(b)),
            sizes.last().map_or(2.0, |&b| log(b)),
        );
        // One batch size alone sits in the middle.
        let x = |b: usize| {
            let span = x_hi - x_lo;
            let f = if span > 0.0 {
                (log(b) - x_lo) / span
            } else {
                0.5
            };
            PAD + f * (W - 2.0 * PAD)
        };
        let (y_lo, y_hi) = self.fitted_range();
        let y = |v: f64| H - PAD - (v - y_lo) / (y_hi - y_lo) * (H - 2.0 * PAD);
        let mut s = self.axes();
        for &b in &sizes {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{b}</text>",
                x(b),
                H - PAD + 16.0
            );
        }
        for i in 0..=4 {
            let v = y_lo + (y_hi - y_lo) * i as f64 / 4.0;
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.3}</text>",
                PAD - 4.0,
                y(v) + 4.0
            );
        }
        for (label, level) in &self.levels {
            let _ = writeln!(
                s,
                "<line x1=\"{PAD}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"gray\" stroke-dasharray=\"5,4\"/>\n\
                 <text x=\"{2}\" y=\"{3:.1}\" fill=\"gray\">{label}</text>",
                W - PAD,
                y(*level),
                PAD + 4.0,
                y(*level) - 4.0
            );
        }
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> = series
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.batch_size), y(p.value)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            for p in &series.points {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{0:.1}\" cy=\"{1:.1}\" r=\"3\" fill=\"{color}\"/>\n\
                     <line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{2:.1}\" y2=\"{3:.1}\" stroke=\"{color}\"/>",
                    x(p.batch_size),
                    y(p.value),
                    y(p.low),
                    y(p.high)
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
                W - PAD - 130.0,
                PAD + 16.0 * i as f64,
                series.label
            );
        }
        s.push_str("</svg>\n");
        s
    }

    fn axes(&self) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <line x1=\"{PAD}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
             <line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{0}\" stroke=\"black\"/>\n\
             <text x=\"{2}\" y=\"{3}\" text-anchor=\"middle\">batch size</text>\n\
             <text x=\"12\" y=\"{4}\" transform=\"rotate(-90 12 {4})\" text-anchor=\"middle\">{5}</text>\n",
            H - PAD,
            W - PAD,
            W / 2.0,
            H - 10.0,
            H / 2.0,
            self.y_label
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_land_inside_the_plot_and_levels_are_drawn() {
        let chart = Chart {
            y_label: "top-1".into(),
            series: vec![Series {
                label: "dcl".into(),
                points: vec![
                    Point {
                        batch_size: 32,
                        value: 0.8,
                        low: 0.78,
                        high: 0.82,
                    },
                    Point {
                        batch_size: 256,
                        value: 0.85,
                        low: 0.84,
                        high: 0.86,
                    },
                ],
            }],
            levels: vec![("raw pixels".into(), 0.7)],
            y_range: None,
        };
        let svg = chart.svg();
        // log2 axis: 32 at the left edge, 256 at the right.
        assert!(svg.contains(&format!("points=\"{PAD:.1},")), "{svg}");
        assert!(svg.contains(&format!("{:.1},", W - PAD)), "{svg}");
        assert!(svg.contains("raw pixels") && svg.contains("stroke-dasharray"));
        assert_eq!(svg.matches("<circle").count(), 2);
    }
}
