//! Draws columns of a tab-separated file with a header line as a line chart: the first column is
//! x, each named column a line with a marker at every row. `tools/demo/curve.sh` uses it for the
//! demo model's held-out learning curves.
//!
//! ```sh
//! cargo run --release -p inspector-charts --example tsv -- \
//!     curve.tsv curve.png "Held-out metrics" "metric" binary_f1 citation_accuracy
//! ```

use std::{path::PathBuf, process::ExitCode};

use inspector_charts::{Chart, Series};

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, title, y_label, columns @ ..] = args.as_slice() else {
        return Err("usage: tsv INPUT.tsv OUTPUT.png TITLE Y_LABEL COLUMN...".into());
    };
    if columns.is_empty() {
        return Err("name at least one column to draw".into());
    }
    let text = std::fs::read_to_string(input).map_err(|e| format!("{input}: {e}"))?;
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or_else(|| format!("{input}: empty file"))?;
    let names: Vec<&str> = header.split('\t').collect();
    let index: Vec<usize> = columns
        .iter()
        .map(|c| {
            names
                .iter()
                .position(|n| n == c)
                .ok_or_else(|| format!("{input}: no column {c:?} (it has {})", names.join(", ")))
        })
        .collect::<Result<_, _>>()?;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let row = line
            .split('\t')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{input}, line {}: {e}", n + 1))?;
        if row.len() != names.len() {
            return Err(format!(
                "{input}, line {}: {} fields, the header has {}",
                n + 1,
                row.len(),
                names.len()
            ));
        }
        rows.push(row);
    }
    rows.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let series = columns
        .iter()
        .zip(&index)
        .map(|(name, &i)| {
            Series::new(name.as_str(), rows.iter().map(|r| (r[0], r[i])).collect()).with_markers()
        })
        .collect();
    Chart {
        title: title.clone(),
        x_label: names[0].into(),
        y_label: y_label.clone(),
        log_y: false,
        series,
    }
    .save_png(&PathBuf::from(output))
    .map_err(|e| format!("{output}: {e}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
