//! Validation of a message against a converted schema, with errors a user can act on.
//!
//! One [`Violations`] error lists every problem, each with the JSON pointer of the field at fault
//! (relative to the message body) and what was expected. The texts never repeat the offending
//! value: message bodies can be large and may carry personal data.

use std::fmt;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{ValidationError, Validator};
use serde::Serialize;
use serde_json::Value;

/// A compiled schema.
pub struct Schema {
    validator: Validator,
}

/// One problem: where, and what was expected there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer into the message body (`""` is the body itself).
    pub pointer: String,
    pub expected: String,
}

/// Every problem found in one message, in document order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violations(pub Vec<Violation>);

impl Schema {
    /// Compiles a standard JSON Schema. The error names what is wrong with the schema itself.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        jsonschema::validator_for(schema)
            .map(|validator| Schema { validator })
            .map_err(|e| format!("{} (at {})", e.masked(), e.schema_path().as_str()))
    }

    /// Checks an instance, collecting every violation.
    pub fn check(&self, instance: &Value) -> Result<(), Violations> {
        if self.validator.is_valid(instance) {
            return Ok(());
        }
        let mut found: Vec<Violation> = self
            .validator
            .iter_errors(instance)
            .map(|e| describe(&e))
            .collect();
        found.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        found.dedup();
        Err(Violations(found))
    }
}

fn describe(error: &ValidationError<'_>) -> Violation {
    let mut pointer = error.instance_path().as_str().to_string();
    let expected = match error.kind() {
        ValidationErrorKind::Required { property } => {
            pointer = format!("{pointer}/{}", property.as_str().unwrap_or_default());
            "a value: this field is required".to_string()
        }
        ValidationErrorKind::Type { kind } => {
            format!("{}, not {}", type_names(kind), json_type(error.instance()))
        }
        ValidationErrorKind::Enum { options } => format!("one of {}", list(options)),
        ValidationErrorKind::Constant { expected_value } => format!("exactly {expected_value}"),
        ValidationErrorKind::Minimum { limit } => format!("a number >= {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("a number <= {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("a number > {limit}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("a number < {limit}"),
        ValidationErrorKind::MinItems { limit } => format!("at least {limit} item(s)"),
        ValidationErrorKind::MaxItems { limit } => format!("at most {limit} item(s)"),
        ValidationErrorKind::MinLength { limit } => format!("at least {limit} character(s)"),
        ValidationErrorKind::MaxLength { limit } => format!("at most {limit} character(s)"),
        ValidationErrorKind::MinProperties { limit } => format!("at least {limit} key(s)"),
        ValidationErrorKind::MaxProperties { limit } => format!("at most {limit} key(s)"),
        ValidationErrorKind::Pattern { pattern } => format!("text matching {pattern}"),
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            let forms: Vec<String> = context
                .iter()
                .filter_map(|branch| branch.first())
                .map(|first| describe(first).expected)
                .collect();
            format!("one of these forms: {}", forms.join("; or "))
        }
        _ => error.masked_with("the value").to_string(),
    };
    Violation { pointer, expected }
}

fn type_names(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => article(&t.to_string()),
        TypeKind::Multiple(set) => {
            let names: Vec<String> = set.iter().map(|t| article(&t.to_string())).collect();
            names.join(" or ")
        }
    }
}

fn article(name: &str) -> String {
    match name {
        "null" => "null".into(),
        "array" | "object" | "integer" => format!("an {name}"),
        _ => format!("a {name}"),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn list(options: &Value) -> String {
    match options.as_array() {
        Some(items) => items
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        None => options.to_string(),
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "The message body does not match the input schema ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for v in &self.0 {
            let at = if v.pointer.is_empty() {
                "(body)"
            } else {
                &v.pointer
            };
            write!(f, "\n  {at}: expected {}", v.expected)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "required": ["messages"],
            "properties": {
                "messages": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["role"],
                    "properties": {"role": {"enum": ["user", "system"]}}
                }},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "stop": {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 4}]}
            }
        }))
        .unwrap()
    }

    #[test]
    fn lists_every_violation_with_its_pointer() {
        let err = schema()
            .check(&json!({"messages": [{"role": "robot"}, {}], "temperature": "hot", "stop": 3}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "The message body does not match the input schema (4 problems):\n  \
             /messages/0/role: expected one of \"user\", \"system\"\n  \
             /messages/1/role: expected a value: this field is required\n  \
             /stop: expected one of these forms: a string, not an integer; or an array, not an integer\n  \
             /temperature: expected a number, not a string"
        );
    }

    #[test]
    fn reports_ranges_and_missing_fields() {
        let err = schema().check(&json!({"temperature": 2.5})).unwrap_err();
        assert_eq!(
            err.0,
            vec![
                Violation {
                    pointer: "/messages".into(),
                    expected: "a value: this field is required".into()
                },
                Violation {
                    pointer: "/temperature".into(),
                    expected: "a number <= 2".into()
                },
            ]
        );
    }

    #[test]
    fn never_echoes_the_offending_value() {
        let err = schema()
            .check(&json!({"messages": "my secret diary"}))
            .unwrap_err();
        assert!(!err.to_string().contains("diary"), "{err}");
    }

    #[test]
    fn valid_input_passes() {
        assert!(schema()
            .check(&json!({"messages": [{"role": "user"}]}))
            .is_ok());
    }
}
