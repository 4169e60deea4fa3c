//! `chatgpt-component check`: the manifest and the code must agree.
//!
//! The platform reads `component.json`; the runtime executes Rust. Nothing but this check stops
//! them drifting apart (an action with no handler, a select field naming a function that does not
//! exist, a schema that does not compile, a configuration key the code reads but no form asks for).

use super::{Component, Direction};
use crate::actions;
use crate::credentials;

/// View classes the elastic.io designer renders.
pub const VIEW_CLASSES: &[&str] = &[
    "TextFieldView",
    "TextAreaView",
    "TextAreaWithNoteView",
    "PasswordFieldView",
    "SelectView",
    "MultiSelectView",
    "CheckBox",
    "CodeFieldView",
    "JSONataView",
    "WebHookURLView",
    "OAuthFieldView",
];

/// Every problem found; empty means the manifest and the code agree.
pub fn check(component: &Component) -> Vec<String> {
    let mut problems = Vec::new();
    let manifest = &component.manifest;
    for (name, field) in &manifest.credentials.fields {
        check_field(
            &format!("credentials.fields.{name}"),
            field,
            None,
            &mut problems,
        );
    }
    for key in credentials::CFG_KEYS {
        if !manifest.credentials.fields.contains_key(*key) {
            problems.push(format!(
                "the code reads credential `{key}` but component.json declares no such credentials field"
            ));
        }
    }
    for (name, action) in &manifest.actions {
        let at = format!("actions.{name}");
        let Some(def) = actions::find(name) else {
            problems.push(format!("{at}: no handler for this action in the code"));
            continue;
        };
        for (field_name, field) in &action.fields {
            check_field(
                &format!("{at}.fields.{field_name}"),
                field,
                Some(def),
                &mut problems,
            );
        }
        for key in def.cfg_keys {
            if !action.fields.contains_key(*key) {
                problems.push(format!(
                    "{at}: the code reads field `{key}` but the action declares no such field"
                ));
            }
        }
        for direction in [Direction::In, Direction::Out] {
            let compiled = component
                .schema(name, direction)
                .and_then(|schema| super::validate::Schema::compile(&schema));
            if let Err(e) = compiled {
                problems.push(format!("{at}.metadata.{direction:?}: {e}"));
            }
        }
    }
    for def in actions::ACTIONS {
        if !manifest.actions.contains_key(def.name) {
            problems.push(format!(
                "the code has a handler for `{}` but component.json declares no such action",
                def.name
            ));
        }
    }
    problems
}

fn check_field(
    at: &str,
    field: &super::Field,
    action: Option<&actions::ActionDef>,
    problems: &mut Vec<String>,
) {
    if !VIEW_CLASSES.contains(&field.view_class.as_str()) {
        problems.push(format!(
            "{at}: unknown viewClass `{}` (known: {})",
            field.view_class,
            VIEW_CLASSES.join(", ")
        ));
    }
    let select = matches!(field.view_class.as_str(), "SelectView" | "MultiSelectView");
    match (&field.model, select) {
        (None, true) => problems.push(format!("{at}: a select view needs a `model`")),
        (Some(serde_json::Value::String(function)), _) => {
            let known = action.is_some_and(|def| def.model_functions.contains(&function.as_str()));
            if !known {
                problems.push(format!(
                    "{at}: model function `{function}` does not exist in the code"
                ));
            }
        }
        (Some(serde_json::Value::Object(_)), _) | (None, false) => {}
        (Some(_), _) => problems.push(format!(
            "{at}: `model` must be a function name or a {{value: label}} object"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_component_passes() {
        assert_eq!(check(Component::embedded()), Vec::<String>::new());
    }

    #[test]
    fn finds_drift_between_manifest_and_code() {
        let manifest = serde_json::json!({
            "title": "t", "description": "d", "version": "1",
            "credentials": {"fields": {"apiKey": {"label": "K", "viewClass": "FancyView"}}},
            "actions": {
                "sendRequest": {"title": "S", "fields": {
                    "model": {"label": "M", "viewClass": "SelectView", "model": "listEverything"}
                }, "metadata": {"in": "./nope.json"}},
                "other": {"title": "O"}
            }
        });
        let component = Component {
            manifest: serde_json::from_value(manifest).unwrap(),
            root: None,
        };
        let problems = check(&component).join("\n");
        for expected in [
            "credentials.fields.apiKey: unknown viewClass `FancyView`",
            "model function `listEverything` does not exist",
            "actions.other: no handler",
            "the code reads field `requestTimeout`",
            "the code reads credential `baseUrl`",
            "metadata file ./nope.json is not compiled into the binary",
            "declares no Out metadata",
        ] {
            assert!(
                problems.contains(expected),
                "missing {expected:?} in:\n{problems}"
            );
        }
    }
}
