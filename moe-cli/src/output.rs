//! Rendering of rows as an aligned terminal table, CSV or Markdown.

/// Output formats of the reporting commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns for a terminal.
    Table,
    /// Pretty JSON (a documented, typed structure).
    Json,
    /// Comma-separated values with a header line.
    Csv,
    /// A Markdown table.
    Markdown,
}

/// A table of strings: headers and rows. Numeric columns are right-aligned in the terminal form.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// Renders as a terminal table, CSV or Markdown (JSON is rendered by the caller from typed data).
    pub(crate) fn render(&self, format: Format) -> String {
        match format {
            Format::Csv => {
                let mut s = self
                    .headers
                    .iter()
                    .map(|h| csv_field(h))
                    .collect::<Vec<_>>()
                    .join(",");
                s.push('\n');
                for r in &self.rows {
                    s.push_str(&r.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
                    s.push('\n');
                }
                s
            }
            Format::Markdown => {
                let mut s = format!(
                    "| {} |\n",
                    self.headers
                        .iter()
                        .map(|h| escape_control(h).replace('|', "\\|"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
                s.push_str(&format!(
                    "|{}\n",
                    self.headers.iter().map(|_| " --- |").collect::<String>()
                ));
                for r in &self.rows {
                    s.push_str(&format!(
                        "| {} |\n",
                        r.iter()
                            .map(|c| escape_control(c).replace('|', "\\|"))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ));
                }
                s
            }
            Format::Table | Format::Json => {
                let escaped = Table {
                    headers: self.headers.iter().map(|h| escape_control(h)).collect(),
                    rows: self
                        .rows
                        .iter()
                        .map(|r| r.iter().map(|c| escape_control(c)).collect())
                        .collect(),
                };
                escaped.render_aligned()
            }
        }
    }

    /// The aligned terminal form.
    fn render_aligned(&self) -> String {
        let n = self.headers.len();
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String], s: &mut String| {
            for (i, c) in cells.iter().enumerate().take(n) {
                let pad = w[i] - c.chars().count();
                let numeric = i > 0
                    && c.chars()
                        .next()
                        .is_some_and(|ch| ch.is_ascii_digit() || ch == '-');
                if i > 0 {
                    s.push_str("  ");
                }
                if numeric {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    if i + 1 < n {
                        s.push_str(&" ".repeat(pad));
                    }
                }
            }
            s.push('\n');
        };
        let mut s = String::new();
        line(&self.headers, &mut s);
        let rule: Vec<String> = w.iter().map(|&x| "-".repeat(x)).collect();
        line(&rule, &mut s);
        for r in &self.rows {
            line(r, &mut s);
        }
        s
    }
}

/// `s` with control characters written as escapes (`\n`, `\t`, `\u{1b}`), for names and labels read from
/// files and printed on one line.
pub(crate) fn escape_control(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
