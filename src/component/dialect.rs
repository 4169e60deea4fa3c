//! The elastic.io schema dialect, converted to standard JSON Schema in exactly one place.
//!
//! Designers render the dialect: each property says `"required": true|false` about itself and
//! carries its UI text in `help.description` (input) or `label`/`title` (output). Validators speak
//! JSON Schema, where `required` is an array on the parent. [`to_json_schema`] moves the booleans
//! into parent arrays, turns `help.description` into `description` and `label` into `title`, and
//! leaves every standard keyword alone. The conversion is pure and total: a dialect document
//! always converts, and compiling the result is what finds real mistakes.

use serde_json::{Map, Value};

/// Keywords whose value is one subschema.
const SUBSCHEMA: &[&str] = &["items", "additionalProperties", "not", "contains"];
/// Keywords whose value is an array of subschemas.
const SUBSCHEMA_LISTS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems"];

/// Converts an elastic.io dialect schema to standard JSON Schema (draft 2020-12).
pub fn to_json_schema(dialect: &Value) -> Value {
    match dialect {
        Value::Object(node) => Value::Object(convert_node(node)),
        // `items` may be a list of schemas in old drafts; booleans are valid schemas.
        Value::Array(list) => Value::Array(list.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

fn convert_node(node: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in node {
        match key.as_str() {
            // A node's own `required: bool` belongs to its parent, which has already read it.
            "required" if value.is_boolean() => {}
            "help" => {
                if let Some(text) = value.get("description") {
                    out.entry("description").or_insert_with(|| text.clone());
                }
            }
            "label" => {
                out.entry("title").or_insert_with(|| value.clone());
            }
            "properties" => {
                let Some(properties) = value.as_object() else {
                    out.insert(key.clone(), value.clone());
                    continue;
                };
                let required: Vec<Value> = properties
                    .iter()
                    .filter(|(_, p)| p.get("required") == Some(&Value::Bool(true)))
                    .map(|(name, _)| Value::String(name.clone()))
                    .collect();
                if !required.is_empty() {
                    out.insert("required".into(), Value::Array(required));
                }
                let converted = properties
                    .iter()
                    .map(|(name, p)| (name.clone(), to_json_schema(p)))
                    .collect();
                out.insert(key.clone(), Value::Object(converted));
            }
            k if SUBSCHEMA.contains(&k) || SUBSCHEMA_LISTS.contains(&k) => {
                out.insert(key.clone(), to_json_schema(value));
            }
            _ => {
                // `description`/`title` written directly win over converted UI text.
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn moves_required_flags_into_the_parent_array() {
        let dialect = json!({
            "type": "object",
            "properties": {
                "a": {"type": "string", "required": true, "help": {"description": "A."}},
                "b": {"type": "number", "required": false, "label": "B"},
                "c": {"type": "object", "required": true, "properties": {
                    "d": {"type": "string", "required": true}
                }}
            }
        });
        assert_eq!(
            to_json_schema(&dialect),
            json!({
                "type": "object",
                "required": ["a", "c"],
                "properties": {
                    "a": {"type": "string", "description": "A."},
                    "b": {"type": "number", "title": "B"},
                    "c": {"type": "object", "required": ["d"], "properties": {
                        "d": {"type": "string"}
                    }}
                }
            })
        );
    }

    #[test]
    fn descends_into_items_and_alternatives() {
        let dialect = json!({
            "type": "array",
            "items": {"type": "object", "properties": {"x": {"type": "string", "required": true}}},
            "anyOf": [{"type": "object", "properties": {"y": {"required": true}}}],
            "additionalProperties": {"label": "V"}
        });
        let schema = to_json_schema(&dialect);
        assert_eq!(schema["items"]["required"], json!(["x"]));
        assert_eq!(schema["anyOf"][0]["required"], json!(["y"]));
        assert_eq!(schema["additionalProperties"], json!({"title": "V"}));
    }

    #[test]
    fn a_standard_required_array_is_kept_and_explicit_text_wins() {
        let schema =
            json!({"required": ["a"], "description": "own", "help": {"description": "ui"}});
        assert_eq!(
            to_json_schema(&schema),
            json!({"required": ["a"], "description": "own"})
        );
    }
}
