//! The report: a table printed at the end (`target/bench/report.md` too) and
//! the same figures as JSON (`target/bench/report.json`).

use std::path::Path;

use serde_json::{Map, Value, json};

/// What the scenarios found so far.
#[derive(Default)]
pub struct Report {
    /// Figures by key, for `report.json`.
    pub json: Map<String, Value>,
    /// The table's rows (what, result), in order.
    pub rows: Vec<(String, String)>,
    /// Ratios and overheads against the yardsticks, under `ratios` in the JSON.
    pub ratios: Map<String, Value>,
    /// Rows set against a target, printed after the others.
    pub targets: Vec<(String, String)>,
}

impl Report {
    /// Prints the table and writes `report.json` and `report.md` to `out`;
    /// `tail` rows come last, after the targets.
    pub fn write(
        mut self,
        tail: Vec<(String, String)>,
        quick: bool,
        out: &Path,
    ) -> anyhow::Result<()> {
        self.json
            .insert("ratios".into(), Value::Object(self.ratios));
        let rows: Vec<_> = self
            .rows
            .into_iter()
            .chain(self.targets)
            .chain(tail)
            .collect();
        let machine = format!(
            "{} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            if quick { "quick run" } else { "full run" }
        );
        self.json.insert("machine".into(), json!(machine));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut md = format!("| scenario ({machine}) | result |\n|---|---|\n");
        println!();
        for (k, v) in &rows {
            println!("{k:<width$}  {v}");
            md.push_str(&format!("| {k} | {} |\n", v.trim()));
        }
        std::fs::create_dir_all(out)?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&Value::Object(self.json))?,
        )?;
        std::fs::write(out.join("report.md"), md)?;
        println!(
            "\nwrote {} and report.md",
            out.join("report.json").display()
        );
        Ok(())
    }
}
