//! The loss curve of a run as a PNG (plotters' bitmap backend): the loss
//! and the learning rate (scaled to the loss axis, grey) per step on a
//! grid, the axis ranges written beside it in seven-segment digits drawn as
//! lines (the build carries no font).

use std::path::Path;

use plotters::prelude::*;

use crate::{Error, Result};

/// Width and height in pixels.
const SIZE: (u32, u32) = (960, 540);
/// Plot area margin: room for the axis figures.
const MARGIN: i32 = 60;

/// Writes the curve of (step, loss, lr) points to `path` (a temporary
/// file the caller renames).
pub fn loss_png(points: &[(u64, f64, f64)], path: &Path) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| Error::Output {
        path: path.to_path_buf(),
        what: format!("cannot draw the loss curve: {e}"),
    };
    let finite: Vec<_> = points.iter().filter(|p| p.1.is_finite()).collect();
    let first = finite.first().map_or(0, |p| p.0) as f64;
    let last = finite.last().map_or(1, |p| p.0).max(first as u64 + 1) as f64;
    let min = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let max = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if min.is_finite() && max > min {
        let pad = 0.05 * (max - min);
        (min - pad, max + pad)
    } else if min.is_finite() {
        (min - 0.5, min + 0.5)
    } else {
        (0.0, 1.0)
    };
    let lr_max = points.iter().map(|p| p.2).fold(0.0, f64::max);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(MARGIN as u32)
        .build_cartesian_2d(first..last, lo..hi)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .disable_x_axis()
        .disable_y_axis()
        .draw()
        .map_err(|e| fail(&e))?;
    if lr_max > 0.0 {
        let scaled = points
            .iter()
            .map(|p| (p.0 as f64, lo + (hi - lo) * p.2 / lr_max));
        chart
            .draw_series(LineSeries::new(scaled, &RGBColor(170, 170, 170)))
            .map_err(|e| fail(&e))?;
    }
    let curve = finite.iter().map(|p| (p.0 as f64, p.1));
    chart
        .draw_series(LineSeries::new(curve, BLUE.stroke_width(2)))
        .map_err(|e| fail(&e))?;
    let (w, h) = (SIZE.0 as i32, SIZE.1 as i32);
    let figures = [
        (format!("{first}"), (MARGIN, h - MARGIN + 12)),
        (format!("{last}"), (w - MARGIN - 60, h - MARGIN + 12)),
        (format!("{lo:.3}"), (4, h - MARGIN - 16)),
        (format!("{hi:.3}"), (4, MARGIN)),
    ];
    for (text, at) in figures {
        for segment in seven_segments(&text, at) {
            root.draw(&PathElement::new(segment, BLACK.stroke_width(2)))
                .map_err(|e| fail(&e))?;
        }
    }
    root.present().map_err(|e| fail(&e))
}

/// Line segments drawing `text` (digits, '.', '-') from `at` (top left),
/// 10 × 16 pixels a character.
fn seven_segments(text: &str, (x0, y0): (i32, i32)) -> Vec<Vec<(i32, i32)>> {
    // Segments a..g as (from, to) in a 8 × 14 cell.
    const SEG: [((i32, i32), (i32, i32)); 7] = [
        ((0, 0), (8, 0)),
        ((8, 0), (8, 7)),
        ((8, 7), (8, 14)),
        ((0, 14), (8, 14)),
        ((0, 7), (0, 14)),
        ((0, 0), (0, 7)),
        ((0, 7), (8, 7)),
    ];
    // Which of a..g each digit lights.
    const DIGITS: [u8; 10] = [
        0b0111111, 0b0000110, 0b1011011, 0b1001111, 0b1100110, 0b1101101, 0b1111101, 0b0000111,
        0b1111111, 0b1101111,
    ];
    let mut out = Vec::new();
    for (i, c) in text.chars().enumerate() {
        let x = x0 + 11 * i as i32;
        let mask = match c {
            '0'..='9' => DIGITS[c as usize - '0' as usize],
            '-' => 0b1000000,
            '.' => {
                out.push(vec![(x + 3, y0 + 13), (x + 4, y0 + 14)]);
                continue;
            }
            _ => continue,
        };
        for (s, ((ax, ay), (bx, by))) in SEG.iter().enumerate() {
            if mask >> s & 1 == 1 {
                out.push(vec![(x + ax, y0 + ay), (x + bx, y0 + by)]);
            }
        }
    }
    out
}
