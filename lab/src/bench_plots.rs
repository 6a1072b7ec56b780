//! PNG plots of the benchmark (plotters' pure-Rust bitmap backend; the text font is Ubuntu
//! Light from `epaint_default_fonts`, registered with plotters' `ab_glyph` feature, so nothing
//! is needed from the system).

use crate::bench::{loss_groups, percentile, Results};
use anyhow::Context;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = "sans-serif";
const BLUE: RGBColor = RGBColor(52, 101, 164);
const ORANGE: RGBColor = RGBColor(230, 126, 34);
const GREEN: RGBColor = RGBColor(39, 174, 96);
const GREY: RGBColor = RGBColor(120, 120, 120);

fn register_font() {
    // Registering twice is harmless (the first stays).
    let _ =
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
}

/// Writes every plot the results allow into `out`.
pub fn all(out: &Path, res: &Results) -> anyhow::Result<()> {
    register_font();
    if !res.ttff.is_empty() {
        let mut bars = Vec::new();
        let mut keyints: Vec<f64> = res.ttff.iter().map(|r| r.keyint_s).collect();
        keyints.dedup();
        for (i, k) in keyints.iter().enumerate() {
            let runs: Vec<_> = res.ttff.iter().filter(|r| r.keyint_s == *k).collect();
            let color = [BLUE, ORANGE, GREEN][i % 3];
            let metrics: [(&str, Vec<f64>); 3] = [
                (
                    "pkt",
                    runs.iter().filter_map(|r| r.req_first_packet_ms).collect(),
                ),
                (
                    "key",
                    runs.iter()
                        .filter_map(|r| r.req_first_keyframe_ms)
                        .collect(),
                ),
                (
                    "pic",
                    runs.iter()
                        .filter_map(|r| r.play_first_picture_ms)
                        .collect(),
                ),
            ];
            for (name, v) in metrics {
                for p in [50.0, 95.0] {
                    if let Some(x) = percentile(&v, p) {
                        bars.push((format!("{k}s {name} p{p}"), x, color));
                    }
                }
            }
        }
        bar_chart(
            &out.join("ttff.png"),
            "Time to first frame (ms): request to first packet (pkt), to first keyframe (key), Play to first picture (pic)",
            "ms",
            &bars,
            &[
                (50.0, "goal: first keyframe 50 ms"),
                (300.0, "goal: picture p50 300 ms"),
            ],
        )?;
    }
    if !res.loss.is_empty() {
        delivery_chart(&out.join("delivery.png"), res)?;
        let bars: Vec<(String, f64, RGBColor)> = loss_groups(&res.loss)
            .into_iter()
            .map(|(label, cond, runs)| {
                let ok: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.ok)
                    .map(|r| r.overhead_pct)
                    .collect();
                let mean = ok.iter().sum::<f64>() / ok.len().max(1) as f64;
                (format!("{cond} {label}"), mean, BLUE)
            })
            .collect();
        bar_chart(
            &out.join("overhead.png"),
            "Retransmission overhead (% of datagrams received)",
            "%",
            &bars,
            &[],
        )?;
    }
    if !res.failover.is_empty() {
        let mut bars: Vec<(String, f64, RGBColor)> = Vec::new();
        for redundancy in [1u8, 2] {
            let mut gaps: Vec<f64> = res
                .failover
                .iter()
                .filter(|r| r.ok && r.redundancy == redundancy && r.scenario == "square")
                .map(|r| r.gap_ms.unwrap_or(100.0))
                .collect();
            gaps.sort_by(f64::total_cmp);
            bars.extend(gaps.iter().enumerate().map(|(i, g)| {
                let color = if *g <= 100.0 {
                    // Not reported by the client: under 100 ms.
                    GREY
                } else if *g <= 300.0 {
                    GREEN
                } else {
                    ORANGE
                };
                (format!("r{redundancy}#{}", i + 1), *g, color)
            }));
        }
        bar_chart(
            &out.join("failover.png"),
            "Failover gap at the client per trial (ms, sorted; r1 plain, r2 --redundancy 2; grey: under 100 ms, drawn at 100)",
            "ms",
            &bars,
            &[(300.0, "goal p95 300 ms")],
        )?;
    }
    Ok(())
}

/// One bar per entry (label, value, colour), horizontal goal lines.
fn bar_chart(
    path: &Path,
    title: &str,
    unit: &str,
    bars: &[(String, f64, RGBColor)],
    goals: &[(f64, &str)],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = bars.len().max(1) as i32;
    let top = bars
        .iter()
        .map(|b| b.1)
        .chain(goals.iter().map(|g| g.0))
        .fold(1.0f64, f64::max)
        * 1.15;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n as usize)
        .x_label_style((FONT, 13).into_font().into_text_style(&root))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(unit)
        .label_style((FONT, 14))
        .draw()
        .context("drawing the mesh")?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v, c))| {
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i as i32), 0.0),
                (SegmentValue::Exact(i as i32 + 1), *v),
            ],
            c.filled(),
        );
        r.set_margin(0, 0, 6, 6);
        r
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
        Text::new(
            format!("{v:.0}"),
            (SegmentValue::CenterOf(i as i32), *v + top * 0.01),
            (FONT, 12),
        )
    }))?;
    for (g, name) in goals {
        chart
            .draw_series(LineSeries::new(
                [(SegmentValue::Exact(0), *g), (SegmentValue::Exact(n), *g)],
                ShapeStyle::from(&RED).stroke_width(2),
            ))?
            .label(*name)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    if !goals.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present().context("writing the PNG")?;
    Ok(())
}

/// Delivered ratio (%) against the nominal loss per link, one point per run, mean lines.
fn delivery_chart(path: &Path, res: &Results) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let ratios: Vec<f64> = res
        .loss
        .iter()
        .filter_map(|r| r.delivered_ratio.map(|x| x * 100.0))
        .collect();
    let low = ratios.iter().copied().fold(99.0f64, f64::min).floor() - 0.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Delivered datagrams vs loss on every link (3 relays)",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..11.0, low..100.3)?;
    chart
        .configure_mesh()
        .x_desc("loss per link (%)")
        .y_desc("delivered (%)")
        .label_style((FONT, 14))
        .draw()?;
    let groups = loss_groups(&res.loss);
    let palette = [BLUE, GREEN, GREY];
    let mut labels_seen: Vec<String> = Vec::new();
    for (label, cond, runs) in &groups {
        let li = match labels_seen.iter().position(|l| l == label) {
            Some(i) => i,
            None => {
                labels_seen.push(label.clone());
                labels_seen.len() - 1
            }
        };
        let burst = cond.contains("burst");
        // The burst points in the variant's colour (triangles), so the variants stay apart.
        let color = palette[li % 3];
        let pts: Vec<(f64, f64)> = runs
            .iter()
            .filter_map(|r| r.delivered_ratio.map(|x| (r.loss_pct, x * 100.0)))
            .collect();
        let s = chart.draw_series(pts.iter().map(|p| {
            if burst {
                TriangleMarker::new(*p, 7, color.filled()).into_dyn()
            } else {
                Circle::new(*p, 5, color.filled()).into_dyn()
            }
        }))?;
        if burst {
            s.label(format!("{label}: 1 % in bursts of 2"))
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
        }
    }
    for (li, label) in labels_seen.iter().enumerate() {
        let color = palette[li % 3];
        let mut line: Vec<(f64, f64)> = groups
            .iter()
            .filter(|(l, c, _)| l == label && !c.contains("burst"))
            .filter_map(|(_, _, runs)| {
                let v: Vec<f64> = runs.iter().filter_map(|r| r.delivered_ratio).collect();
                (!v.is_empty()).then(|| {
                    (
                        runs[0].loss_pct,
                        100.0 * v.iter().sum::<f64>() / v.len() as f64,
                    )
                })
            })
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(format!("{label}: i.i.d. loss (mean)"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(
            [(5.0, 99.9), (10.0, 99.0), (1.0, 100.0)]
                .into_iter()
                .map(|p| Cross::new(p, 8, RED.stroke_width(3))),
        )?
        .label("goals (5 %: 99.9, 10 %: 99, bursts: 100)")
        .legend(|(x, y)| Cross::new((x + 10, y), 6, RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present().context("writing the PNG")?;
    Ok(())
}
