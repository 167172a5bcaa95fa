//! The router registry: routers are created by name from serde options, and the built-ins are registered exactly
//! the way a third-party plugin is.

use serde::de::DeserializeOwned;
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

    /// Sets an option from text as a user types it: `true`/`false`, numbers and JSON values are parsed, anything
    /// else is a string.
    pub fn set_option_str(&mut self, key: &str, value: &str) {
        let v = serde_json::from_str::<Value>(value)
            .unwrap_or_else(|_| Value::String(value.to_string()));
        self.options.insert(key.to_string(), v);
    }

    /// Sets an option.
    pub fn with_option(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.options.insert(key.to_string(), value.into());
        self
    }

    /// Deserialises the options into a router's config type (which should `deny_unknown_fields`).
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

/// Documentation of one router option.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OptionDoc {
    /// Option name (snake_case).
    pub name: &'static str,
    /// Default value, as it would be written.
    pub default: &'static str,
    /// One line of documentation.
    pub doc: &'static str,
}

/// Builds a router from arguments.
pub type RouterFactory = fn(&RouterArgs) -> Result<Box<dyn Router>, MoeError>;

/// One registered router.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouterEntry {
    /// Registry name, kebab-case.
    pub name: String,
    /// One-line description.
    pub description: String,
    /// Whether the routing of a token depends only on that token and earlier ones.
    pub causal: bool,
    /// The options with defaults and docs.
    pub options: Vec<OptionDoc>,
    /// The factory.
    #[serde(skip)]
    pub factory: RouterFactory,
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
