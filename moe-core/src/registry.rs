//! The router registry: routers are created by name from serde options, and the built-ins are registered exactly
//! the way a third-party plugin is.
//!
//! A router's options are declared once, with [`router_options!`](crate::router_options): that one declaration
//! yields the serde config struct, its defaults, the option docs `moe list` prints ([`OptionDoc`]) and the value
//! sets the registry enumerates. The config type also answers [`RouterConfig::is_causal`], the one source of the
//! router's causality: [`RouterEntry::new`] derives the registry's answer from it, and the router's own
//! [`Router::is_causal`] must give the same answer (checked for every option combination by
//! `moe_core::testing::check_registered`).

use serde::de::{DeserializeOwned, Deserializer, Visitor};
use serde::{Serialize, forward_to_deserialize_any};
use serde_json::{Map, Value};

use crate::error::MoeError;
use crate::router::Router;

/// What a factory gets: the layer shape, a seed for the router's own parameters, and the user's options.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterArgs {
    /// Hidden width `d`.
    pub d_model: usize,
    /// Number of experts `E` (PEER: the number of singleton experts `N`).
    pub n_experts: usize,
    /// Experts per token `k` (a default the router may override through its options).
    pub top_k: usize,
    /// Seed for initialising the router's parameters (gate matrix, hash table).
    pub seed: u64,
    /// Router options (from `key=value` flags, TOML or JSON).
    pub options: Map<String, Value>,
}

impl RouterArgs {
    /// Arguments with no options.
    pub fn new(d_model: usize, n_experts: usize, top_k: usize, seed: u64) -> Self {
        RouterArgs {
            d_model,
            n_experts,
            top_k,
            seed,
            options: Map::new(),
        }
    }

    /// Sets an option from text exactly as the CLI reads `key=value`: key and value are trimmed, then the value
    /// is read as JSON (`true`, `3`, `0.5`, `[1, 2]`, `"quoted"`) and, where it is not JSON, kept as a string
    /// (`fixed`, `deepseek_v3`).
    pub fn set_option_str(&mut self, key: &str, value: &str) {
        let value = value.trim();
        let v = serde_json::from_str::<Value>(value)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        self.options.insert(key.trim().to_string(), v);
    }

    /// Sets an option, the way the CLI would for text: a string value (`"3"`, `"fixed"`) goes through
    /// [`RouterArgs::set_option_str`], so `with_option("token_cap", "3")` stores the number 3; numbers, booleans
    /// and other JSON values (`2.0`, `true`, `json!([5, 1])`) are stored as they are. To store a string that would
    /// read as JSON (the text `"3"`), use [`RouterArgs::with_option_value`].
    pub fn with_option(mut self, key: &str, value: impl Into<Value>) -> Self {
        match value.into() {
            Value::String(s) => self.set_option_str(key, &s),
            v => {
                self.options.insert(key.to_string(), v);
            }
        }
        self
    }

    /// Sets an option to exactly this JSON value (no text parsing).
    pub fn with_option_value(mut self, key: &str, value: Value) -> Self {
        self.options.insert(key.to_string(), value);
        self
    }

    /// Deserialises the options into a router's config type (which should `deny_unknown_fields`, as the types of
    /// [`router_options!`](crate::router_options) do).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] with serde's message, which names the field and the expected values.
    pub fn parse<T: DeserializeOwned>(&self, router: &str) -> Result<T, MoeError> {
        serde_json::from_value(Value::Object(self.options.clone())).map_err(|e| {
            MoeError::config(
                format!("{router} options"),
                Value::Object(self.options.clone()),
                e.to_string(),
            )
        })
    }
}

/// Documentation of one router option, as `moe list` prints it. Built by [`router_options!`](crate::router_options)
/// from the field's doc comment, its default expression and its type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OptionDoc {
    /// Option name (snake_case), as written in `key=value`.
    pub name: &'static str,
    /// Default value, as it would be written on the command line (`none` where unset means "not used" or the
    /// default is computed, which the doc then states).
    pub default: String,
    /// The first paragraph of the field's doc comment, on one line.
    pub doc: String,
    /// Every value the option accepts when that set is finite: the variants of an enum (their serde names, without
    /// aliases) or `false`, `true`; empty for numbers, strings and lists.
    pub values: Vec<&'static str>,
}

impl OptionDoc {
    /// The doc of option `name` of type `T`: `docs` are the lines of its doc comment, `shown` a default written out
    /// by hand (for one computed from the layer), `default` the default value, printed as serde writes it.
    /// Used by [`router_options!`](crate::router_options); a hand-written config may call it too.
    pub fn describe<T: Serialize + DeserializeOwned>(
        name: &'static str,
        docs: &[&str],
        shown: Option<&str>,
        default: Option<fn() -> T>,
    ) -> Self {
        let doc = docs
            .iter()
            .map(|l| l.trim())
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let default = match (shown, default) {
            (Some(s), _) => s.to_string(),
            (None, Some(f)) => show_value(&f()),
            (None, None) => "none".to_string(),
        };
        OptionDoc {
            name,
            default,
            doc,
            values: finite_values::<T>(),
        }
    }
}

/// A value as a user would type it after `key=`: strings without quotes, everything else as JSON.
/// (`serde_json::to_string`, not `to_value`, so that an f32 prints as its shortest f32 text, `0.01`).
fn show_value<T: Serialize>(v: &T) -> String {
    match serde_json::to_string(v) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::String(s)) => s,
            _ => text,
        },
        Err(e) => format!("<{e}>"),
    }
}

/// The values of `T` when they form a finite set: enum variants (the canonical serde names: each name that
/// deserialises to a variant serialising back to the same name, so aliases are left out) or `false`/`true`.
fn finite_values<T: Serialize + DeserializeOwned>() -> Vec<&'static str> {
    match T::deserialize(Probe) {
        Err(Probed::Bool) => vec!["false", "true"],
        Err(Probed::Enum(variants)) => variants
            .iter()
            .copied()
            .filter(|&name| {
                serde_json::from_value::<T>(Value::String(name.to_string()))
                    .is_ok_and(|v| show_value(&v) == name)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What [`Probe`] learned of a type: asked for a bool, asked for an enum with these variants, or anything else.
#[derive(Debug)]
enum Probed {
    Bool,
    Enum(&'static [&'static str]),
    Open,
}

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "probed {self:?}")
    }
}

impl std::error::Error for Probed {}

impl serde::de::Error for Probed {
    fn custom<M: std::fmt::Display>(_msg: M) -> Self {
        Probed::Open
    }
}

/// A deserializer that produces no value: it reports which kind of value the type asked for (serde's derive passes
/// an enum's variant names to `deserialize_enum`), so option value sets come from the types themselves.
struct Probe;

impl<'de> Deserializer<'de> for Probe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probed> {
        Err(Probed::Open)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Probed> {
        Err(Probed::Bool)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed::Enum(variants))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Probed> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Probed> {
        visitor.visit_newtype_struct(self)
    }

    forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

/// The options of a router as one serde struct, with their docs: implemented by
/// [`router_options!`](crate::router_options).
pub trait RouterOptions:
    Default + Clone + std::fmt::Debug + Serialize + DeserializeOwned + 'static
{
    /// One [`OptionDoc`] per option, in declaration order.
    fn option_docs() -> Vec<OptionDoc>;
}

/// What the registry needs of a router's config beyond its options: the router's causality, written once.
pub trait RouterConfig: RouterOptions {
    /// Whether a router built from these options routes each token from that token and earlier ones only: changing
    /// the hidden states or ids of tokens after position `p` never changes the assignments (kept or dropped) of
    /// tokens before `p`. The number of tokens `T` and the padding mask may be used (a capacity `ceil(T/E · cf)`
    /// is allowed). It must depend only on options with a finite value set (enums, booleans), so that the
    /// registry can enumerate it, and it must equal [`Router::is_causal`] of every router built from these options.
    fn is_causal(&self) -> bool;
}

/// Builds a router from arguments.
pub type RouterFactory = fn(&RouterArgs) -> Result<Box<dyn Router>, MoeError>;

/// Answers whether the router built from these arguments is causal, without building it.
pub type CausalFn = fn(&RouterArgs) -> Result<bool, MoeError>;

/// The registry's [`CausalFn`] for config type `C`: parse the options, ask the config.
fn causal_of<C: RouterConfig>(args: &RouterArgs) -> Result<bool, MoeError> {
    let name = std::any::type_name::<C>();
    let short = name.rsplit("::").next().unwrap_or(name);
    Ok(args.parse::<C>(short)?.is_causal())
}

/// Largest number of option combinations [`RouterEntry::option_grid`] enumerates.
pub const MAX_OPTION_GRID: usize = 1 << 16;

/// How a registered router's causality depends on its options.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Causality {
    /// Causal whatever the options.
    Causal,
    /// Not causal whatever the options.
    NotCausal,
    /// Causal for some values of these options and not for others.
    DependsOn(Vec<&'static str>),
}

impl std::fmt::Display for Causality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Causality::Causal => f.write_str("causal"),
            Causality::NotCausal => f.write_str("not causal"),
            Causality::DependsOn(o) => write!(f, "causality depends on options: {}", o.join(", ")),
        }
    }
}

/// One registered router. Build it with [`RouterEntry::new`], which takes the option docs and the causality from
/// the config type.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouterEntry {
    /// Registry name, kebab-case.
    pub name: String,
    /// One-line description.
    pub description: String,
    /// The options with defaults and docs.
    pub options: Vec<OptionDoc>,
    /// Whether the router these arguments build is causal ([`RouterConfig::is_causal`] of the parsed options).
    #[serde(skip)]
    pub causal: CausalFn,
    /// The factory.
    #[serde(skip)]
    pub factory: RouterFactory,
}

impl RouterEntry {
    /// The entry of a router whose options are `C`: the option docs are `C::option_docs()` and the causality is
    /// `C::is_causal` of the parsed options.
    pub fn new<C: RouterConfig>(
        name: impl Into<String>,
        description: impl Into<String>,
        factory: RouterFactory,
    ) -> Self {
        RouterEntry {
            name: name.into(),
            description: description.into(),
            options: C::option_docs(),
            causal: causal_of::<C>,
            factory,
        }
    }

    /// Whether the router built from `args` is causal.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] when the options do not parse.
    pub fn is_causal(&self, args: &RouterArgs) -> Result<bool, MoeError> {
        (self.causal)(args)
    }

    /// Every combination of the options with a finite value set ([`OptionDoc::values`], plus unset) that `base`
    /// does not set, each added to a copy of `base`; the first combination sets nothing.
    ///
    /// # Errors
    /// [`MoeError::TooLarge`] past [`MAX_OPTION_GRID`] combinations.
    pub fn option_grid(&self, base: &RouterArgs) -> Result<Vec<RouterArgs>, MoeError> {
        let axes = self.grid_axes(base);
        let size = axes
            .iter()
            .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len() + 1))
            .filter(|&n| n <= MAX_OPTION_GRID)
            .ok_or_else(|| MoeError::TooLarge {
                what: format!("{} option combinations", self.name),
                size: axes.iter().map(|(_, v)| v.len() as u128 + 1).product(),
                limit: MAX_OPTION_GRID as u128,
            })?;
        Ok((0..size)
            .map(|mut i| {
                let mut a = base.clone();
                for (name, values) in &axes {
                    let digit = i % (values.len() + 1);
                    i /= values.len() + 1;
                    if let Some(v) = digit.checked_sub(1).and_then(|j| values.get(j)) {
                        a.options.insert((*name).to_string(), v.clone());
                    }
                }
                a
            })
            .collect())
    }

    /// The axes of [`RouterEntry::option_grid`]: each finite-valued option (enum or bool) not set in `base`, with
    /// its values as JSON, in grid order (the first varies fastest).
    pub fn option_axes(&self, base: &RouterArgs) -> Vec<(&'static str, Vec<Value>)> {
        self.grid_axes(base)
    }

    /// The finite-valued options not set in `base`, with their values as JSON (grid order: the first varies fastest).
    fn grid_axes(&self, base: &RouterArgs) -> Vec<(&'static str, Vec<Value>)> {
        self.options
            .iter()
            .filter(|o| !o.values.is_empty() && !base.options.contains_key(o.name))
            .map(|o| {
                let values = o
                    .values
                    .iter()
                    .map(|&v| match v {
                        "false" => Value::Bool(false),
                        "true" => Value::Bool(true),
                        s => Value::String(s.to_string()),
                    })
                    .collect();
                (o.name, values)
            })
            .collect()
    }

    /// How causality depends on the options: the answer of [`RouterEntry::is_causal`] over the whole
    /// [`RouterEntry::option_grid`]; an option is listed when changing it alone changes the answer somewhere.
    ///
    /// # Errors
    /// [`MoeError::TooLarge`] for a grid too large to enumerate.
    pub fn causality(&self) -> Result<Causality, MoeError> {
        let base = RouterArgs::new(1, 1, 1, 0);
        let axes = self.grid_axes(&base);
        let answers: Vec<Option<bool>> = self
            .option_grid(&base)?
            .iter()
            .map(|a| self.is_causal(a).ok())
            .collect();
        let known: Vec<bool> = answers.iter().flatten().copied().collect();
        if known.iter().all(|&c| c) {
            return Ok(Causality::Causal);
        }
        if known.iter().all(|&c| !c) {
            return Ok(Causality::NotCausal);
        }
        let mut depends = Vec::new();
        let mut stride = 1usize;
        for (name, values) in &axes {
            let radix = values.len() + 1;
            let varies = (0..answers.len())
                .filter(|i| (i / stride).is_multiple_of(radix))
                .any(|i| {
                    let first = answers.get(i).copied().flatten();
                    (1..radix).any(|d| {
                        let other = answers.get(i + d * stride).copied().flatten();
                        matches!((first, other), (Some(a), Some(b)) if a != b)
                    })
                });
            if varies {
                depends.push(*name);
            }
            stride *= radix;
        }
        Ok(Causality::DependsOn(depends))
    }
}

/// Routers by name, in registration order.
#[derive(Debug, Clone, Default)]
pub struct RouterRegistry {
    entries: Vec<RouterEntry>,
}

impl RouterRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        RouterRegistry::default()
    }

    /// Registers a router.
    ///
    /// # Errors
    /// [`MoeError::DuplicateRouter`] if the name is taken.
    pub fn register(&mut self, entry: RouterEntry) -> Result<(), MoeError> {
        if self.get(&entry.name).is_some() {
            return Err(MoeError::DuplicateRouter { name: entry.name });
        }
        self.entries.push(entry);
        Ok(())
    }

    /// The entry for `name`, if registered.
    pub fn get(&self, name: &str) -> Option<&RouterEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Creates router `name` from `args`.
    ///
    /// # Errors
    /// [`MoeError::UnknownRouter`] listing the known names, or the factory's error.
    pub fn create(&self, name: &str, args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
        let entry = self.get(name).ok_or_else(|| MoeError::UnknownRouter {
            name: name.to_string(),
            known: self.names().join(", "),
        })?;
        (entry.factory)(args)
    }

    /// All entries, in registration order.
    pub fn describe(&self) -> &[RouterEntry] {
        &self.entries
    }

    /// Registered names, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }
}

/// Declares a router's options once: the serde config struct, the defaults, the docs `moe list` prints, and the
/// value sets the registry enumerates.
///
/// ```
/// use moe_core::registry::{RouterConfig, RouterOptions};
///
/// moe_core::router_options! {
///     /// Options of a capacity router.
///     pub struct CapConfig {
///         /// Capacity factor `cf`: each expert takes `ceil(T / E · cf)` tokens.
///         capacity_factor: f64 = 1.25,
///         /// Keep the most confident tokens instead of the first ones.
///         by_probability: bool = false,
///         /// Experts per token.
///         #[default_doc = "the layer's k"]
///         k: usize,
///     }
/// }
///
/// impl RouterConfig for CapConfig {
///     /// First come, first served depends only on earlier tokens; probability order does not.
///     fn is_causal(&self) -> bool {
///         !self.by_probability()
///     }
/// }
///
/// let cfg: CapConfig = moe_core::RouterArgs::new(8, 4, 2, 0)
///     .with_option("capacity_factor", "2")
///     .parse("cap")?;
/// assert_eq!((cfg.capacity_factor, cfg.capacity_factor()), (Some(2.0), 2.0));
/// assert_eq!((cfg.by_probability, cfg.by_probability()), (None, false));
/// let docs = CapConfig::option_docs();
/// assert_eq!((docs[0].name, docs[0].default.as_str()), ("capacity_factor", "1.25"));
/// assert_eq!(docs[1].values, ["false", "true"]);
/// assert_eq!(docs[2].default, "the layer's k");
/// # Ok::<(), moe_core::MoeError>(())
/// ```
///
/// For each field `name: T = default`, the struct gets `pub name: Option<T>` (unset = `None`, so a router can tell
/// an option the user set from one left at its default) and a method `name(&self) -> T` giving the value or the
/// default. A field without `= default` has no such method; `#[default_doc = "..."]` (after the doc comment) says
/// what unset means when that is computed (`min(16, n)`), otherwise `moe list` shows `none`. The struct derives
/// `Debug, Clone, Default, PartialEq` and serde with `deny_unknown_fields`; every field type must be
/// `Serialize + DeserializeOwned` (and `Clone` where it has a default). The struct also gets
/// `with_unset_from(self, base: &Self) -> Self` (each unset option takes `base`'s value: presets) and implements
/// [`RouterOptions`]. Write [`RouterConfig`] by hand, then register with [`RouterEntry::new`].
///
/// The generated serde attributes name the crate as `moe_core`: depend on it under that name.
#[macro_export]
macro_rules! router_options {
    (@shown) => { ::core::option::Option::None };
    (@shown $shown:literal) => { ::core::option::Option::Some($shown) };
    (@default $ty:ty) => { ::core::option::Option::None::<fn() -> $ty> };
    (@default $ty:ty, $default:expr) => {
        ::core::option::Option::Some((|| -> $ty { $default }) as fn() -> $ty)
    };
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[default_doc = $shown:literal])?
                $field:ident : $ty:ty $(= $default:expr)?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            ::core::fmt::Debug,
            ::core::clone::Clone,
            ::core::default::Default,
            ::core::cmp::PartialEq,
            $crate::serde::Serialize,
            $crate::serde::Deserialize
        )]
        #[serde(crate = "moe_core::serde", deny_unknown_fields)]
        $vis struct $name {
            $(
                $(#[doc = $doc])*
                $(#[doc = ""] #[doc = concat!("Unset: ", $shown, ".")])?
                $(#[doc = ""] #[doc = concat!("Unset: `", stringify!($default), "`.")])?
                pub $field: ::core::option::Option<$ty>,
            )*
        }

        impl $name {
            $($(
                #[doc = concat!("The value of `", stringify!($field), "`, or `", stringify!($default), "` when unset.")]
                pub fn $field(&self) -> $ty {
                    match &self.$field {
                        ::core::option::Option::Some(v) => ::core::clone::Clone::clone(v),
                        ::core::option::Option::None => $default,
                    }
                }
            )?)*

            /// These options, with each unset one taken from `base` (a preset's settings under the user's).
            pub fn with_unset_from(self, base: &Self) -> Self {
                $name {
                    $($field: self.$field.or_else(|| ::core::clone::Clone::clone(&base.$field)),)*
                }
            }
        }

        impl $crate::registry::RouterOptions for $name {
            fn option_docs() -> ::std::vec::Vec<$crate::registry::OptionDoc> {
                ::std::vec![$(
                    $crate::registry::OptionDoc::describe::<$ty>(
                        stringify!($field),
                        &[$($doc),*],
                        $crate::router_options!(@shown $($shown)?),
                        $crate::router_options!(@default $ty $(, $default)?),
                    ),
                )*]
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{DropPolicy, RouterInput};
    use crate::routing::Routing;

    crate::router_options! {
        /// Test options.
        pub struct TestConfig {
            /// Drop order.
            ///
            /// A second paragraph that `moe list` leaves out.
            drop: DropPolicy = DropPolicy::Position,
            /// A factor,
            /// on two lines.
            factor: f32 = 1e-2,
            /// A flag.
            flag: bool = true,
            /// Per-layer.
            #[default_doc = "the layer's k"]
            k: usize,
            /// A list.
            counts: Vec<u64>,
        }
    }

    impl RouterConfig for TestConfig {
        fn is_causal(&self) -> bool {
            self.drop() == DropPolicy::Position
        }
    }

    #[derive(Clone, Debug)]
    struct Nothing;

    impl Router for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }
        fn n_experts(&self) -> usize {
            1
        }
        fn d_model(&self) -> Option<usize> {
            None
        }
        fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
            Ok(Routing::empty(input.n_tokens(), 1))
        }
    }

    fn factory(_: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
        Ok(Box::new(Nothing))
    }

    #[test]
    fn option_docs_come_from_the_declaration() {
        let d = TestConfig::option_docs();
        let names: Vec<&str> = d.iter().map(|o| o.name).collect();
        assert_eq!(names, ["drop", "factor", "flag", "k", "counts"]);
        assert_eq!(d[0].default, "position");
        assert_eq!(d[0].doc, "Drop order.");
        assert_eq!(
            d[0].values,
            ["position", "probability", "random", "batch_prioritized"]
        );
        // f32 1e-2 is printed as serde_json writes it: the shortest text that reads back as the same f32.
        assert_eq!(d[1].default, "0.01");
        assert_eq!(d[1].doc, "A factor, on two lines.");
        assert!(d[1].values.is_empty());
        assert_eq!((d[2].default.as_str(), d[2].values.len()), ("true", 2));
        assert_eq!(d[3].default, "the layer's k");
        assert_eq!(d[4].default, "none");
        assert!(d[4].values.is_empty());
    }

    #[test]
    fn getters_defaults_and_presets() {
        let c = TestConfig::default();
        assert_eq!(
            (c.drop(), c.factor(), c.flag()),
            (DropPolicy::Position, 1e-2, true)
        );
        let preset = TestConfig {
            factor: Some(0.5),
            flag: Some(false),
            ..Default::default()
        };
        let user = TestConfig {
            flag: Some(true),
            ..Default::default()
        }
        .with_unset_from(&preset);
        assert_eq!((user.factor, user.flag), (Some(0.5), Some(true)));
        let unknown = RouterArgs::new(1, 1, 1, 0).with_option("fator", 1.0);
        assert!(matches!(
            unknown.parse::<TestConfig>("test"),
            Err(MoeError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn with_option_reads_text_as_the_cli_does() {
        let mut cli = RouterArgs::new(1, 1, 1, 0);
        for (k, v) in [
            ("token_cap", "3"),
            ("drop", "random"),
            ("flag", "false"),
            ("counts", "[1, 2]"),
            (" factor ", " 0.5 "),
        ] {
            cli.set_option_str(k, v);
        }
        let code = RouterArgs::new(1, 1, 1, 0)
            .with_option("token_cap", "3")
            .with_option("drop", "random")
            .with_option("flag", "false")
            .with_option("counts", "[1, 2]")
            .with_option("factor", "0.5");
        assert_eq!(cli, code);
        assert_eq!(code.options["token_cap"], Value::from(3));
        assert_eq!(code.options["factor"], Value::from(0.5));
        // Typed values are stored as they are; with_option_value keeps a string that would read as JSON.
        let typed = RouterArgs::new(1, 1, 1, 0)
            .with_option("token_cap", 3)
            .with_option("flag", false)
            .with_option("counts", serde_json::json!([1, 2]))
            .with_option_value("name", Value::String("3".into()));
        assert_eq!(typed.options["token_cap"], Value::from(3));
        assert_eq!(typed.options["flag"], Value::Bool(false));
        assert_eq!(typed.options["counts"], serde_json::json!([1, 2]));
        assert_eq!(typed.options["name"], Value::String("3".into()));
    }

    #[test]
    fn grid_and_causality() {
        let entry = RouterEntry::new::<TestConfig>("t", "test", factory);
        // drop: 4 values + unset, flag: 2 + unset.
        let grid = entry
            .option_grid(&RouterArgs::new(1, 1, 1, 0))
            .expect("grid");
        assert_eq!(grid.len(), 15);
        assert!(grid[0].options.is_empty());
        let fixed = RouterArgs::new(1, 1, 1, 0).with_option("drop", "random");
        assert_eq!(entry.option_grid(&fixed).expect("grid").len(), 3);
        assert_eq!(entry.is_causal(&fixed), Ok(false));
        assert_eq!(entry.causality(), Ok(Causality::DependsOn(vec!["drop"])));
        assert_eq!(
            entry.causality().expect("causality").to_string(),
            "causality depends on options: drop"
        );
    }
}
