//! The component as designers see it: `component.json` and the metadata schemas it names.
//!
//! Both are compiled into the binary, so a container or a CLI user needs no files beside it; the
//! [`check`](check::check) command can also read them from a directory to test a change before
//! building. Schemas are written in the elastic.io dialect and reach validators only through
//! [`dialect::to_json_schema`].

pub mod check;
pub mod dialect;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

/// The manifest file, as compiled in.
pub const MANIFEST: &str = include_str!("../../component.json");

/// Files the manifest may name, as compiled in (path relative to the repository root).
const EMBEDDED: &[(&str, &str)] = &[
    (
        "schemas/actions/sendRequest.in.json",
        include_str!("../../schemas/actions/sendRequest.in.json"),
    ),
    (
        "schemas/actions/sendRequest.out.json",
        include_str!("../../schemas/actions/sendRequest.out.json"),
    ),
];

/// `component.json`, the parts that code depends on. Unknown keys are allowed: the platform
/// defines more than we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub title: String,
    pub description: String,
    pub version: String,
    #[serde(default)]
    pub docs_url: Option<String>,
    pub credentials: Credentials,
    #[serde(default)]
    pub actions: BTreeMap<String, Action>,
    #[serde(default)]
    pub triggers: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct Credentials {
    pub fields: BTreeMap<String, Field>,
}

#[derive(Debug, Deserialize)]
pub struct Action {
    pub title: String,
    #[serde(default)]
    pub fields: BTreeMap<String, Field>,
    #[serde(default)]
    pub metadata: Metadata,
}

#[derive(Debug, Default, Deserialize)]
pub struct Metadata {
    #[serde(rename = "in")]
    pub input: Option<String>,
    #[serde(rename = "out")]
    pub output: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Field {
    pub label: String,
    pub view_class: String,
    #[serde(default)]
    pub required: bool,
    /// For select views: an inline `{value: label}` map, or the name of a model function.
    #[serde(default)]
    pub model: Option<Value>,
}

/// Which side of an action a metadata schema describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// A manifest plus the place its files come from.
pub struct Component {
    pub manifest: Manifest,
    root: Option<PathBuf>,
}

impl Component {
    /// The component compiled into this binary. Parsed once; a broken manifest is a build
    /// defect that `cargo test` (which runs `check`) catches, hence the panic.
    pub fn embedded() -> &'static Component {
        static COMPONENT: OnceLock<Component> = OnceLock::new();
        COMPONENT.get_or_init(|| Component {
            manifest: serde_json::from_str(MANIFEST).expect("embedded component.json is valid"),
            root: None,
        })
    }

    /// A component read from a directory holding `component.json` and its schemas.
    pub fn from_dir(root: &Path) -> Result<Component, String> {
        let path = root.join("component.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let manifest = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a valid manifest: {e}", path.display()))?;
        Ok(Component {
            manifest,
            root: Some(root.to_path_buf()),
        })
    }

    /// The dialect schema an action's metadata names, parsed.
    pub fn metadata(&self, action: &str, direction: Direction) -> Result<Value, String> {
        let def = self
            .manifest
            .actions
            .get(action)
            .ok_or_else(|| format!("component.json has no action `{action}`"))?;
        let path = match direction {
            Direction::In => &def.metadata.input,
            Direction::Out => &def.metadata.output,
        }
        .as_deref()
        .ok_or_else(|| format!("action `{action}` declares no {direction:?} metadata"))?;
        let text = self.read(path)?;
        serde_json::from_str(&text).map_err(|e| format!("{path} is not valid JSON: {e}"))
    }

    /// The metadata schema converted to standard JSON Schema.
    pub fn schema(&self, action: &str, direction: Direction) -> Result<Value, String> {
        self.metadata(action, direction)
            .map(|dialect| dialect::to_json_schema(&dialect))
    }

    fn read(&self, path: &str) -> Result<String, String> {
        let relative = path.trim_start_matches("./");
        match &self.root {
            Some(root) => std::fs::read_to_string(root.join(relative))
                .map_err(|e| format!("metadata file {path} cannot be read: {e}")),
            None => EMBEDDED
                .iter()
                .find(|(name, _)| *name == relative)
                .map(|(_, text)| text.to_string())
                .ok_or_else(|| format!("metadata file {path} is not compiled into the binary")),
        }
    }
}

/// A compiled schema of the embedded component, built once per process.
///
/// The hot path validates every message, so compilation must not happen per message.
pub fn compiled(action: &'static str, direction: Direction) -> &'static validate::Schema {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<(&str, bool), &'static validate::Schema>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (action, direction == Direction::In);
    let mut map = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    map.entry(key).or_insert_with(|| {
        let schema = Component::embedded()
            .schema(action, direction)
            .and_then(|s| validate::Schema::compile(&s))
            .expect("embedded schemas compile (checked by `chatgpt-component check`)");
        Box::leak(Box::new(schema))
    })
}
