//! `forward_plot` — the plot of the relay's hot-path benchmark: datagrams per second on one
//! core against the number of subscribers, with the raw-socket baselines of the same run.
//!
//! ```text
//! cargo bench -p sim --bench forward | tee target/forward.txt
//! cargo run --release -p lab --bin forward_plot -- target/forward.txt report/forward.png
//! ```
//!
//! divan prints a tree (no machine-readable output): a group line (`├─ relay_encrypted`), then
//! one line per argument (`│  ├─ 10   fastest │ slowest │ median │ mean │ samples │ iters`);
//! a benchmark without arguments has its figures on its own line. The median is used.

use anyhow::{bail, Context};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

const FONT: &str = "sans-serif";

/// Datagrams handled per iteration of each raw baseline (its items counter).
const RAW: [(&str, f64, &str); 3] = [
    ("raw_send_to", 1.0, "raw send_to"),
    ("raw_sendmmsg_32", 32.0, "raw sendmmsg ×32"),
    ("raw_gso_8", 8.0, "raw GSO ×8 (one peer)"),
];

/// The curves: (benchmark group, datagrams per subscriber per iteration, legend).
const CURVES: [(&str, f64, &str); 5] = [
    (
        "relay_encrypted_burst3_gso",
        3.0,
        "relay, encrypted, bursts of 3, GSO per subscriber",
    ),
    (
        "relay_encrypted_sendmmsg",
        1.0,
        "relay, encrypted, sendmmsg",
    ),
    (
        "relay_encrypted_send_to",
        1.0,
        "relay, encrypted, send_to (before)",
    ),
    (
        "relay_plaintext_sendmmsg",
        1.0,
        "relay, plaintext, sendmmsg",
    ),
    (
        "relay_encrypted",
        1.0,
        "relay core only, encrypted (no kernel send)",
    ),
];

/// A duration as divan prints it (`7.95 µs`, `466 µs`, `1.2 ms`, `996.1 ns`), in seconds.
fn seconds(value: &str, unit: &str) -> Option<f64> {
    let v: f64 = value.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-9,
        "µs" | "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return None,
    };
    Some(v * scale)
}

/// The median of a line's figures (`fastest │ slowest │ median │ …`), if it has any.
fn median_of(rest: &str) -> Option<f64> {
    let cols: Vec<&str> = rest.split('│').map(str::trim).collect();
    let mut it = cols.get(2)?.split_whitespace();
    seconds(it.next()?, it.next()?)
}

/// (group or benchmark, argument) → median seconds per iteration.
fn parse(text: &str) -> BTreeMap<(String, Option<u32>), f64> {
    let mut out = BTreeMap::new();
    let mut group = String::new();
    for line in text.lines() {
        let Some(pos) = line.find('─') else {
            continue;
        };
        let name_and_rest = line[pos + '─'.len_utf8()..].trim_start();
        let (name, rest) = name_and_rest
            .split_once(char::is_whitespace)
            .unwrap_or((name_and_rest, ""));
        // Nested (argument) lines start with a tree bar or spaces before their branch.
        let nested = line[..pos].chars().count() > 1;
        if nested {
            if let (Ok(arg), Some(m)) = (name.parse::<u32>(), median_of(rest)) {
                out.insert((group.clone(), Some(arg)), m);
            }
        } else {
            group = name.to_owned();
            if let Some(m) = median_of(rest) {
                out.insert((group.clone(), None), m);
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: forward_plot <divan output of `cargo bench -p sim --bench forward`> <png>");
    };
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {input}"))?;
    let m = parse(&text);
    if m.is_empty() {
        bail!("{input}: no divan results found");
    }
    let _ =
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    let mut curves: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for (group, per, label) in CURVES {
        let pts: Vec<(f64, f64)> = m
            .iter()
            .filter(|((g, a), _)| g == group && a.is_some())
            .map(|((_, a), t)| {
                let n = f64::from(a.expect("filtered"));
                (n, per * n / t)
            })
            .collect();
        if !pts.is_empty() {
            curves.push((label, pts));
        }
    }
    let raws: Vec<(&str, f64)> = RAW
        .iter()
        .filter_map(|(name, items, label)| {
            m.get(&(name.to_string(), None))
                .map(|t| (*label, items / t))
        })
        .collect();
    let top = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(raws.iter().map(|(_, y)| *y))
        .fold(1.0f64, f64::max);
    let path = PathBuf::from(output);
    let root = BitMapBackend::new(&path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Relay forwarding: datagrams per second on one core vs subscribers",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (0.8f64..130.0).log_scale(),
            (50_000f64..top * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("subscribers of the datagram")
        .y_desc("datagrams / s (log)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .label_style((FONT, 14))
        .draw()?;
    let palette = [
        RGBColor(192, 57, 43),
        RGBColor(52, 101, 164),
        RGBColor(230, 126, 34),
        RGBColor(39, 174, 96),
        RGBColor(142, 68, 173),
    ];
    for (i, (label, pts)) in curves.iter().enumerate() {
        let c = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    for (i, (label, y)) in raws.iter().enumerate() {
        let c = [
            RGBColor(90, 90, 90),
            RGBColor(150, 150, 150),
            RGBColor(190, 60, 60),
        ][i % 3];
        let y = *y;
        chart
            .draw_series(LineSeries::new([(0.8, y), (130.0, y)], c.stroke_width(1)))?
            .label(format!("{label}: {:.0}k/s", y / 1000.0))
            .legend(move |(x, yy)| {
                PathElement::new(vec![(x, yy), (x + 18, yy)], c.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divan_trees_are_read_by_group_and_argument() {
        let text = "\
forward                      fastest       │ slowest       │ median        │ mean          │ samples │ iters
├─ raw_send_to               3.954 µs      │ 6.668 µs      │ 4.116 µs      │ 4.221 µs      │ 100     │ 100
│                            252.9 Kitem/s │ 149.9 Kitem/s │ 242.9 Kitem/s │ 236.9 Kitem/s │         │
├─ relay_encrypted                         │               │               │               │         │
│  ├─ 1                      1.952 µs      │ 8.712 µs      │ 4.661 µs      │ 3.865 µs      │ 100     │ 100
│  │                         512.2 Kitem/s │ 114.7 Kitem/s │ 214.5 Kitem/s │ 258.6 Kitem/s │         │
│  ╰─ 100                    62.73 µs      │ 94.54 µs      │ 63.5 µs       │ 64.32 µs      │ 100     │ 100
╰─ relay_plaintext                         │               │               │               │         │
   ╰─ 1                      996.1 ns      │ 5.863 µs      │ 1.231 µs      │ 1.28 µs       │ 100     │ 200
";
        let m = parse(text);
        let close = |k: (&str, Option<u32>), v: f64| {
            let got = m[&(k.0.to_string(), k.1)];
            assert!((got - v).abs() < 1e-12, "{k:?}: {got}");
        };
        close(("raw_send_to", None), 4.116e-6);
        close(("relay_encrypted", Some(1)), 4.661e-6);
        close(("relay_encrypted", Some(100)), 63.5e-6);
        close(("relay_plaintext", Some(1)), 1.231e-6);
        assert_eq!(m.len(), 4);
    }
}
