//! Parsing of router lists: `all`, `name[:key=value[,key=value]...][,name...]`, or a TOML file of router configs.

use moe_core::{MoeError, RouterArgs, RouterRegistry};
use serde_json::{Map, Value};

use crate::CliError;

/// One router to build: its registry name, a display label and its options as typed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouterChoice {
    pub name: String,
    pub label: String,
    pub options: Map<String, Value>,
}

/// Parses `--routers`. Commas separate routers; a piece with `=` and no `:` continues the previous router's
/// options, so `switch-top1:capacity_factor=1.25,drop=probability,hash` is two routers. Commas inside brackets,
/// braces or double quotes belong to the value (`hash:table=balanced,counts=[1,2,3]`).
pub(crate) fn parse_routers(
    text: &str,
    registry: &RouterRegistry,
) -> Result<Vec<RouterChoice>, CliError> {
    if text.trim() == "all" {
        return Ok(registry
            .names()
            .into_iter()
            .map(|n| RouterChoice {
                label: n.clone(),
                name: n,
                options: Map::new(),
            })
            .collect());
    }
    let mut out: Vec<RouterChoice> = Vec::new();
    for piece in split_top_level(text)?
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let (name, opt) = match piece.split_once(':') {
            Some((n, o)) => (Some(n.trim()), Some(o.trim())),
            None if piece.contains('=') => (None, Some(piece)),
            None => (Some(piece), None),
        };
        if let Some(n) = name {
            if registry.get(n).is_none() {
                return Err(CliError::Usage(format!(
                    "unknown router {n:?}; valid routers: {} (or `all`)",
                    registry.names().join(", ")
                )));
            }
            out.push(RouterChoice {
                name: n.to_string(),
                label: n.to_string(),
                options: Map::new(),
            });
        }
        if let Some(o) = opt.filter(|o| !o.is_empty()) {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("router option {o:?} must be key=value")))?;
            let last = out.last_mut().ok_or_else(|| {
                CliError::Usage(format!("option {o:?} comes before any router name"))
            })?;
            let mut a = RouterArgs::new(0, 0, 0, 0);
            a.set_option_str(k.trim(), v.trim());
            last.options.extend(a.options);
            // The label keeps the options in the order the user wrote them.
            last.label = if last.label.contains(':') {
                format!("{},{}={}", last.label, k.trim(), v.trim())
            } else {
                format!("{}:{}={}", last.label, k.trim(), v.trim())
            };
        }
    }
    if out.is_empty() {
        return Err(CliError::Usage(format!(
            "no routers given; valid routers: {}",
            registry.names().join(", ")
        )));
    }
    Ok(out)
}

/// `text` split at the commas outside `[...]`, `{...}` and `"..."` (a JSON value's own commas stay in it).
///
/// # Errors
/// [`CliError::Usage`] for an unclosed bracket, brace or quote.
fn split_top_level(text: &str) -> Result<Vec<&str>, CliError> {
    let (mut out, mut depth, mut quoted, mut escaped, mut start) =
        (Vec::new(), 0usize, false, false, 0);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '[' | '{' if !quoted => depth += 1,
            ']' | '}' if !quoted => depth = depth.saturating_sub(1),
            ',' if !quoted && depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return Err(CliError::Usage(format!(
            "router list {text:?} has an unclosed bracket, brace or quote"
        )));
    }
    out.push(&text[start..]);
    Ok(out)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A TOML file of router configs:
///
/// ```toml
/// [[router]]
/// name = "switch-top1"
/// label = "switch cf 1.5"      # optional
/// options = { capacity_factor = 1.5, drop = "probability" }
/// ```
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    router: Vec<ConfigEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigEntry {
    name: String,
    label: Option<String>,
    #[serde(default)]
    options: toml::Table,
}

/// Largest router config file read (1 MiB).
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a text file the user names: a regular file, at most `cap` bytes, UTF-8; errors name the file.
pub(crate) fn read_text_capped(path: &std::path::Path, cap: u64) -> Result<String, CliError> {
    use std::io::Read;
    let shown = crate::output::escape_control(&path.display().to_string());
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::Usage(format!("cannot read {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(CliError::Usage(format!(
            "{shown} is not a regular file (a directory, device or pipe)"
        )));
    }
    if meta.len() > cap {
        return Err(CliError::Usage(format!(
            "{shown} is {} bytes, over the limit of {cap} bytes",
            meta.len()
        )));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(cap + 1).read_to_string(&mut text))
        .map_err(|e| CliError::Usage(format!("cannot read {shown}: {e}")))?;
    if text.len() as u64 > cap {
        return Err(CliError::Usage(format!(
            "{shown} is over the limit of {cap} bytes"
        )));
    }
    Ok(text)
}

/// A TOML option value as JSON; non-finite floats (`nan`, `inf`) are refused as on the command line, naming the
/// option.
fn toml_to_json(key: &str, v: toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => {
            if !f.is_finite() {
                return Err(format!("option {key} = {f}: must be a finite number"));
            }
            Value::from(f)
        }
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(
            a.into_iter()
                .map(|x| toml_to_json(key, x))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => Value::Object(
            t.into_iter()
                .map(|(k, x)| toml_to_json(&format!("{key}.{k}"), x).map(|j| (k, j)))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Reads router choices from a TOML file.
pub(crate) fn parse_config_file(
    path: &std::path::Path,
    registry: &RouterRegistry,
) -> Result<Vec<RouterChoice>, CliError> {
    let text = read_text_capped(path, MAX_CONFIG_BYTES)?;
    parse_config_text(&text, path, registry)
}

/// Router choices from the text of a TOML router config file; `path` names it in errors.
pub(crate) fn parse_config_text(
    text: &str,
    path: &std::path::Path,
    registry: &RouterRegistry,
) -> Result<Vec<RouterChoice>, CliError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        CliError::Usage(format!(
            "{} is not a router config file: {}",
            path.display(),
            e.message()
        ))
    })?;
    if file.router.is_empty() {
        return Err(CliError::Usage(format!(
            "{} lists no [[router]]",
            path.display()
        )));
    }
    file.router
        .into_iter()
        .map(|r| {
            if registry.get(&r.name).is_none() {
                return Err(CliError::Usage(format!(
                    "{}: unknown router {:?}; valid routers: {}",
                    path.display(),
                    r.name,
                    registry.names().join(", ")
                )));
            }
            let options: Map<String, Value> = r
                .options
                .into_iter()
                .map(|(k, v)| toml_to_json(&k, v).map(|j| (k, j)))
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    CliError::Usage(format!("{}: router {}: {e}", path.display(), r.name))
                })?;
            let label = r.label.unwrap_or_else(|| {
                if options.is_empty() {
                    r.name.clone()
                } else {
                    let o: Vec<String> = options
                        .iter()
                        .map(|(k, v)| format!("{k}={}", show(v)))
                        .collect();
                    format!("{}:{}", r.name, o.join(","))
                }
            });
            Ok(RouterChoice {
                name: r.name,
                label,
                options,
            })
        })
        .collect()
}

/// Parses a list that must name exactly one router (`moe route`, `moe bench`).
pub(crate) fn parse_one(
    text: &str,
    registry: &RouterRegistry,
    command: &str,
) -> Result<RouterChoice, CliError> {
    let mut choices = parse_routers(text, registry)?;
    if choices.len() != 1 {
        return Err(CliError::Usage(format!(
            "`moe {command}` takes one router, got {}; use `moe compare` for several",
            choices.len()
        )));
    }
    Ok(choices.remove(0))
}

impl RouterChoice {
    /// Maps an error of this router to a CLI error that names it: bad options become a usage error listing the
    /// router's options; other usage errors get the label; the rest get it as context.
    pub(crate) fn error_mapper(
        &self,
        registry: &RouterRegistry,
    ) -> impl Fn(MoeError) -> CliError + use<> {
        let opts = registry
            .get(&self.name)
            .map(|r| {
                r.options
                    .iter()
                    .map(|o| o.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let label = self.label.clone();
        move |e| match e {
            MoeError::InvalidConfig { .. } => {
                CliError::Usage(format!("{label}: {e}; its options are: {opts}"))
            }
            other => match CliError::from(other) {
                CliError::Usage(m) => CliError::Usage(format!("{label}: {m}")),
                CliError::Other(o) => CliError::Other(o.context(format!("running {label}"))),
            },
        }
    }

    /// The factory arguments for this choice.
    pub(crate) fn args(&self, d: usize, e: usize, k: usize, seed: u64) -> RouterArgs {
        let mut a = RouterArgs::new(d, e, k, seed);
        a.options = self.options.clone();
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_attach_to_the_previous_router() {
        let reg = moe_routers::builtin();
        let c = parse_routers("softmax-topk:preset=olmoe,k=1,softmax-topk", &reg).expect("parse");
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].options.get("preset"),
            Some(&Value::String("olmoe".into()))
        );
        assert_eq!(c[0].options.get("k"), Some(&Value::from(1)));
        assert_eq!(c[0].label, "softmax-topk:preset=olmoe,k=1");
        assert!(c[1].options.is_empty());
        assert!(matches!(
            parse_routers("nope", &reg),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            parse_routers("k=1", &reg),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn list_values_keep_their_commas() {
        let reg = moe_routers::builtin();
        let c =
            parse_routers("hash:table=balanced,counts=[1,2,3],softmax-topk", &reg).expect("parse");
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].options.get("counts"),
            Some(&serde_json::json!([1, 2, 3]))
        );
        assert_eq!(c[0].label, "hash:table=balanced,counts=[1,2,3]");
        assert_eq!(c[1].name, "softmax-topk");
        assert!(matches!(
            parse_routers("hash:counts=[1,2", &reg),
            Err(CliError::Usage(_))
        ));
    }
}
