//! `cargo xtask tidy`: the house rules that are checked as code (STYLE.md), over every `.rs` file of the workspace
//! outside `target/` and hidden folders:
//! - every file opens with a `//!` line saying what it is for;
//! - no function is longer than [`MAX_FN_LINES`] lines, from its `fn` line to its closing brace (tests excepted:
//!   files under a `tests/` folder and `#[cfg(test)]` modules);
//! - no file in `moe-backends/src` is longer than [`MAX_BACKEND_FILE_LINES`] lines;
//! - every `#[allow(...)]` / `#![allow(...)]` gives its `reason = "..."` (or the code uses `#[expect]`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Longest function allowed outside tests, in lines.
pub const MAX_FN_LINES: usize = 120;

/// Longest file allowed in `moe-backends/src`, in lines.
pub const MAX_BACKEND_FILE_LINES: usize = 500;

/// Runs every check and lists every violation.
pub fn run(root: &Path) -> Result<()> {
    let mut files = Vec::new();
    collect(root, &mut files)?;
    files.sort();
    let mut bad = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(root).unwrap_or(path);
        let rel_s = rel.display().to_string();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if !text.trim_start().starts_with("//!") {
            bad.push(format!(
                "{rel_s}: does not open with a `//!` line saying what it is for"
            ));
        }
        let lines = text.lines().count();
        if rel.starts_with("moe-backends/src") && lines > MAX_BACKEND_FILE_LINES {
            bad.push(format!(
                "{rel_s}: {lines} lines (at most {MAX_BACKEND_FILE_LINES} in moe-backends/src): split it by stage"
            ));
        }
        let masked = mask(&text);
        for a in allows_without_reason(&masked) {
            bad.push(format!(
                "{rel_s}:{a}: `allow` without `reason = \"...\"` (say why, or use `#[expect]`)"
            ));
        }
        let in_tests_dir = rel.components().any(|c| c.as_os_str() == "tests");
        if !in_tests_dir {
            for (name, line, len) in long_functions(&masked) {
                bad.push(format!(
                    "{rel_s}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES}): split it"
                ));
            }
        }
    }
    if !bad.is_empty() {
        bail!(
            "tidy found {} problem(s):\n  {}",
            bad.len(),
            bad.join("\n  ")
        );
    }
    println!(
        "tidy: {} Rust files: //! lines, functions <= {MAX_FN_LINES} lines, moe-backends/src files <= {MAX_BACKEND_FILE_LINES} lines, every allow with a reason",
        files.len()
    );
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                collect(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The source with comments, string literals and char literals replaced by spaces (newlines kept), so braces and
/// keywords inside them do not count.
fn mask(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&b, i) {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            out.push(' ');
            out.extend(std::iter::repeat_n(' ', j - i));
            j += 1;
            while j < b.len() {
                if b[j] == '"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    out.extend(std::iter::repeat_n(' ', 1 + hashes));
                    break;
                }
                out.push(blank(b[j]));
                j += 1;
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): a literal closes within a few chars.
            let close = if next == Some('\\') {
                (i + 2..b.len().min(i + 12)).find(|&j| b[j] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(j) => {
                    out.extend(std::iter::repeat_n(' ', j + 1 - i));
                    i = j + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_before(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// Line numbers (1-based) of `allow` attributes without a `reason`.
fn allows_without_reason(masked: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for (start, _) in masked.match_indices("allow(") {
        let before = masked[..start].trim_end();
        if !(before.ends_with("#[") || before.ends_with("#![")) {
            continue;
        }
        // The reason is a string, masked to spaces: find `reason` and `=` inside the attribute's parentheses.
        let rest = &masked[start + "allow(".len()..];
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map_or(rest.len(), |(j, _)| j);
        if !rest[..end].contains("reason") {
            out.push(masked[..start].matches('\n').count() + 1);
        }
    }
    out
}

/// `(name, first line, length in lines)` of every function longer than [`MAX_FN_LINES`], outside `#[cfg(test)]`
/// modules.
fn long_functions(masked: &str) -> Vec<(String, usize, usize)> {
    let chars: Vec<char> = masked.chars().collect();
    let line_of = |pos: usize| chars[..pos].iter().filter(|&&c| c == '\n').count() + 1;
    let test_ranges = cfg_test_ranges(masked, &chars);
    let mut out = Vec::new();
    let text: String = chars.iter().collect();
    for (pos, _) in text.match_indices("fn ") {
        if ident_before(&chars, pos) || test_ranges.iter().any(|&(a, b)| pos > a && pos < b) {
            continue;
        }
        let name: String = chars[pos + 3..]
            .iter()
            .take_while(|c| c.is_alphanumeric() || **c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body starts at the first `{` unless a `;` (a declaration without body) comes first.
        let Some(open) = (pos..chars.len()).find(|&j| chars[j] == '{' || chars[j] == ';') else {
            continue;
        };
        if chars[open] == ';' {
            continue;
        }
        let Some(close) = matching_brace(&chars, open) else {
            continue;
        };
        let (first, last) = (line_of(pos), line_of(close));
        let len = last - first + 1;
        if len > MAX_FN_LINES {
            out.push((name, first, len));
        }
    }
    out
}

/// Character ranges of modules marked `#[cfg(test)]`.
fn cfg_test_ranges(masked: &str, chars: &[char]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let char_pos = |byte: usize| masked[..byte].chars().count();
    for (byte, _) in masked.match_indices("#[cfg(test)]") {
        let start = char_pos(byte);
        let Some(open) = (start..chars.len()).find(|&j| chars[j] == '{' || chars[j] == ';') else {
            continue;
        };
        if chars[open] == ';' {
            continue;
        }
        if let Some(close) = matching_brace(chars, open) {
            out.push((start, close));
        }
    }
    out
}

fn matching_brace(chars: &[char], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (j, &c) in chars.iter().enumerate().skip(open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_hides_braces_in_strings_comments_and_chars() {
        let src = "fn a() { let s = \"}}\"; let c = '{'; // }\n /* { */ let r = r#\"}\"#; }\n";
        let m = mask(src);
        assert_eq!(m.matches('{').count(), 1);
        assert_eq!(m.matches('}').count(), 1);
        assert_eq!(m.lines().count(), src.lines().count());
    }

    #[test]
    fn long_functions_are_found_outside_tests_only() {
        let body = "    x();\n".repeat(MAX_FN_LINES);
        let src = format!(
            "fn long() {{\n{body}}}\nfn short() {{ }}\n#[cfg(test)]\nmod tests {{\n    fn long_test() {{\n{body}    }}\n}}\n"
        );
        let found = long_functions(&mask(&src));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "long");
        assert_eq!(found[0].2, MAX_FN_LINES + 2);
    }

    #[test]
    fn allows_need_a_reason() {
        let src = "#[allow(dead_code)]\nfn a() {}\n#[allow(unused, reason = \"why\")]\nfn b() {}\n#![allow(\n    unsafe_code,\n    reason = \"x\"\n)]\n";
        assert_eq!(allows_without_reason(&mask(src)), vec![1]);
    }
}
