//! A hand-written SVG line chart for the benches' time series: panels one
//! above the other over one time axis, each with its axes labelled and a
//! legend. No charting dependency: a few hundred bytes of markup per line.
use std::fmt::Write;

/// One line of a panel.
pub(super) struct Line {
    pub(super) name: &'static str,
    pub(super) color: &'static str,
    /// (x, y) points, x ascending.
    pub(super) points: Vec<(f64, f64)>,
}

/// One panel: a title, what its y axis measures, its lines.
pub(super) struct Panel {
    pub(super) title: String,
    pub(super) y_label: &'static str,
    pub(super) lines: Vec<Line>,
}

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 300.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// The panels, one above the other, over one x axis labelled `x_label`.
pub(super) fn draw(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let height = panels.len() as f64 * PANEL_HEIGHT + 30.0;
    let (x_min, x_max) = panels
        .iter()
        .flat_map(|p| p.lines.iter())
        .flat_map(|l| l.points.iter())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| {
            (lo.min(*x), hi.max(*x))
        });
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
        (x_min.min(0.0), x_max)
    } else {
        (0.0, 1.0)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="20" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for (k, p) in panels.iter().enumerate() {
        panel(
            &mut s,
            p,
            30.0 + k as f64 * PANEL_HEIGHT,
            (x_min, x_max),
            x_label,
        );
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel, y0: f64, (x_min, x_max): (f64, f64), x_label: &str) {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = PANEL_HEIGHT - TOP - BOTTOM;
    let top = y0 + TOP;
    let y_max = p
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|(_, y)| *y))
        .fold(0.0_f64, f64::max);
    let y_max = nice_ceiling(y_max);
    let px = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * plot_w;
    let py = |y: f64| top + plot_h - y / y_max * plot_h;
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
        LEFT + plot_w / 2.0,
        top - 10.0,
        escape(&p.title)
    );
    // Grid and ticks.
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let y = py(v);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            tick(v)
        );
    }
    for i in 0..=8 {
        let v = x_min + (x_max - x_min) * i as f64 / 8.0;
        let x = px(v);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + plot_h,
            top + plot_h + 5.0,
            top + plot_h + 18.0,
            tick(v)
        );
    }
    // Axes and their labels.
    let _ = write!(
        s,
        r#"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{b:.1}" stroke="black"/><line x1="{LEFT}" y1="{b:.1}" x2="{r:.1}" y2="{b:.1}" stroke="black"/>"#,
        b = top + plot_h,
        r = LEFT + plot_w
    );
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        top + plot_h + 36.0,
        escape(x_label)
    );
    let mid = top + plot_h / 2.0;
    let _ = write!(
        s,
        r#"<text x="20" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 20 {mid:.1})">{}</text>"#,
        escape(p.y_label)
    );
    // Lines and the legend.
    for (k, l) in p.lines.iter().enumerate() {
        if !l.points.is_empty() {
            let pts: Vec<String> = l
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                l.color,
                pts.join(" ")
            );
        }
        let ly = top + 10.0 + k as f64 * 18.0;
        let lx = LEFT + plot_w + 15.0;
        let _ = write!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            l.color,
            lx + 26.0,
            ly + 4.0,
            escape(l.name)
        );
    }
}

/// 1, 2 or 5 times a power of ten at or above `v` (1 for nothing).
fn nice_ceiling(v: f64) -> f64 {
    if v.is_nan() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_its_panels_lines_and_labels() {
        let panel = |title: &str| Panel {
            title: title.to_string(),
            y_label: "seconds",
            lines: vec![
                Line {
                    name: "interactive",
                    color: "#d62728",
                    points: vec![(0.0, 0.0), (1.0, 3.0), (2.0, 1.0)],
                },
                Line {
                    name: "bulk",
                    color: "#7f7f7f",
                    points: vec![],
                },
            ],
        };
        let svg = draw("a & b", "time (s)", &[panel("one"), panel("two")]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(
            svg.matches("<polyline").count(),
            2,
            "empty lines are not drawn"
        );
        assert_eq!(svg.matches(">interactive</text>").count(), 2);
        assert!(svg.contains(">time (s)</text>") && svg.contains("a &amp; b"));
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1200.0), 2000.0);
    }
}
