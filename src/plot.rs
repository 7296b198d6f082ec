//! The loss curve as an SVG image: train and validation loss against step.
//!
//! SVG keeps this dependency-free (no font rasterizer) and renders in browsers, on GitHub and
//! on the Hugging Face Hub, where the model card embeds it.

use std::fmt::Write as _;

use crate::metrics::MetricRecord;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// Renders the curves of `history`; `None` when it holds no loss values at all.
pub fn loss_curve_svg(history: &[MetricRecord], title: &str) -> Option<String> {
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| r.train_loss.map(|l| (r.step as f64, l)))
        .filter(|(_, l)| l.is_finite())
        .collect();
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| r.val_loss.map(|l| (r.step as f64, l)))
        .filter(|(_, l)| l.is_finite())
        .collect();
    let all = train.iter().chain(&val);
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    let mut any = false;
    for &(x, y) in all {
        any = true;
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !any {
        return None;
    }
    let (y_lo, y_hi, y_step) = nice_range(y_min, y_max);
    let (_, x_hi, x_step) = nice_range(0.0, x_max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + x / x_hi * plot_w;
    let py = |y: f64| TOP + (y_hi - y) / (y_hi - y_lo) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"##,
        WIDTH / 2.0,
        escape(title)
    );
    // Grid and tick labels.
    let mut y = y_lo;
    while y <= y_hi + y_step * 0.5 {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            py(y),
            WIDTH - RIGHT,
            LEFT - 6.0,
            py(y) + 4.0,
            trim_number(y)
        );
        y += y_step;
    }
    let mut x = 0.0;
    while x <= x_hi + x_step * 0.5 {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1}" stroke="#eee"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"##,
            px(x),
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 16.0,
            trim_number(x)
        );
        x += x_step;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle">step</text><text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">loss (nats/token)</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (points, color, label, legend_y) in [
        (&train, "#1f77b4", "train", TOP + 14.0),
        (&val, "#d62728", "validation", TOP + 30.0),
    ] {
        if points.is_empty() {
            continue;
        }
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"##,
            path.join(" ")
        );
        if points.len() < 40 {
            for &(x, y) in points.iter() {
                let _ = writeln!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"##,
                    px(x),
                    py(y)
                );
            }
        }
        let lx = WIDTH - RIGHT - 110.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{lx}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{label}</text>"##,
            lx + 20.0,
            lx + 26.0,
            legend_y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    Some(svg)
}

/// Axis bounds on round numbers, and a tick spacing giving about five ticks.
fn nice_range(lo: f64, hi: f64) -> (f64, f64, f64) {
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let raw = span / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let lo = (lo / step).floor() * step;
    let mut hi = (hi / step).ceil() * step;
    if hi <= lo {
        hi = lo + step;
    }
    (lo, hi, step)
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_curves_inside_the_frame() {
        let history: Vec<MetricRecord> = (0..50)
            .map(|i| MetricRecord {
                step: i * 10,
                train_loss: Some(4.0 - i as f64 * 0.05),
                val_loss: (i % 10 == 0).then_some(4.1 - i as f64 * 0.05),
                ..Default::default()
            })
            .collect();
        let svg = loss_curve_svg(&history, "run <1>").unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("run &lt;1&gt;"));
        assert!(loss_curve_svg(&[], "x").is_none());
    }

    #[test]
    fn nice_ranges_cover_the_data() {
        let (lo, hi, step) = nice_range(1.37, 4.2);
        assert!(lo <= 1.37 && hi >= 4.2 && step > 0.0);
        assert_eq!(nice_range(0.0, 2000.0), (0.0, 2000.0, 500.0));
    }
}
