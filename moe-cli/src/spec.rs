//! Parsing of router lists: `all`, or `name[:key=value[,key=value]...][,name...]`.

use moe_core::{RouterArgs, RouterRegistry};

use crate::CliError;

/// One router to build: its registry name, a display label and its options as typed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouterChoice {
    pub name: String,
    pub label: String,
    pub options: Vec<(String, String)>,
}

/// Parses `--routers`. Commas separate routers; a piece with `=` and no `:` continues the previous router's
/// options, so `switch-top1:capacity_factor=1.25,drop=probability,hash` is two routers.
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
                options: Vec::new(),
            })
            .collect());
    }
    let mut out: Vec<RouterChoice> = Vec::new();
    for piece in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
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
                options: Vec::new(),
            });
        }
        if let Some(o) = opt.filter(|o| !o.is_empty()) {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| CliError::Usage(format!("router option {o:?} must be key=value")))?;
            let last = out.last_mut().ok_or_else(|| {
                CliError::Usage(format!("option {o:?} comes before any router name"))
            })?;
            last.options
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if out.is_empty() {
        return Err(CliError::Usage(format!(
            "no routers given; valid routers: {}",
            registry.names().join(", ")
        )));
    }
    for c in &mut out {
        if !c.options.is_empty() {
            let opts: Vec<String> = c.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
            c.label = format!("{}:{}", c.name, opts.join(","));
        }
    }
    Ok(out)
}

impl RouterChoice {
    /// The factory arguments for this choice.
    pub(crate) fn args(&self, d: usize, e: usize, k: usize, seed: u64) -> RouterArgs {
        let mut a = RouterArgs::new(d, e, k, seed);
        for (key, v) in &self.options {
            a.set_option_str(key, v);
        }
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
            c[0].options,
            vec![("preset".into(), "olmoe".into()), ("k".into(), "1".into())]
        );
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
}
