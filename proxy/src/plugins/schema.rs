//! Checking a task's config against the JSON Schema its plugin declares
//! (`plugin_api::export_plugin!` with a typed config), before it is attached.

use serde_json::Value;

/// Checks `config` against `schema`. On failure, one line per problem, each
/// naming the field's path (`/rules`) and what is wrong with it.
pub fn check_config(schema: &Value, config: &Value) -> Result<(), Vec<String>> {
    let validator = jsonschema::validator_for(schema)
        .map_err(|err| vec![format!("the plugin's config schema is not valid: {err}")])?;
    let problems: Vec<String> = validator
        .iter_errors(config)
        .map(|err| {
            let path = err.instance_path.to_string();
            let at = if path.is_empty() { "/" } else { &path };
            format!("at `{at}`: {err}")
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::check_config;

    #[test]
    fn names_the_field_and_the_expected_type() {
        let schema = json!({
            "type": "object",
            "properties": {"rules": {"type": "array"}},
            "required": ["rules"],
        });
        let problems = check_config(&schema, &json!({"rules": 5})).expect_err("refused");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("`/rules`"), "{problems:?}");
        assert!(problems[0].contains("array"), "{problems:?}");
        assert!(check_config(&schema, &json!({"rules": []})).is_ok());
        let missing = check_config(&schema, &json!({})).expect_err("refused");
        assert!(missing[0].contains("rules"), "{missing:?}");
    }
}
