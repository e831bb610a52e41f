//! `validate`: business rules over a submission's answers (synchronous).
//!
//! Each rule is an expression over the answers, evaluated with `evalexpr`
//! (comparisons, arithmetic, `&&`, `||`, `!`, `if(c, a, b)`, string
//! functions); a rule passes when it evaluates to `true`. A rule may apply
//! only when a condition holds (`when`), and a field may be required when a
//! condition holds (`required` + `when`). Output: `{"valid": bool, "flags":
//! [{"rule": name, "message": text}]}` so the flags go back to the data
//! collector in the submit response. See README.md for the config.

use evalexpr::{
    ContextWithMutableVariables, EvalexprError, HashMapContext, Node, Value as Ev,
    build_operator_tree,
};
use plugin_api::{Input, Task, TaskError, Value, json};
use schemars::JsonSchema;
use serde::Deserialize;

/// The task's config: the rules, checked in order on every submission.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct Config {
    /// The rules.
    pub rules: Vec<RuleConfig>,
}

/// One rule: exactly one of `expr` and `required`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(default)]
pub struct RuleConfig {
    /// Its name in flags (`rule N`, from 1, if not given).
    pub name: Option<String>,
    /// An expression over the answers that must be true, e.g. `age >= 18`.
    pub expr: Option<String>,
    /// An answer that must be present and not empty.
    pub required: Option<String>,
    /// An expression over the answers: the rule applies only when it is true.
    pub when: Option<String>,
    /// The flag's message (a default names the expression or the field).
    pub message: Option<String>,
}

/// One configured rule, compiled.
struct Rule {
    name: String,
    message: String,
    check: Check,
    when: Option<Node>,
}

enum Check {
    /// An expression that must be true.
    Expr(Node),
    /// An answer that must be present (and not empty).
    Required(String),
}

/// The validation task.
pub struct Validate {
    rules: Vec<Rule>,
}

fn compile(rule: &str, what: &str, source: &str) -> Result<Node, TaskError> {
    build_operator_tree(source).map_err(|err| {
        TaskError::permanent(format!(
            "rule '{rule}': syntax error in {what} '{source}': {err}"
        ))
    })
}

impl Validate {
    /// Compiles the configured rules; a rule with a syntax error, or with
    /// both or neither of `expr` and `required`, is refused.
    pub fn new(config: Config) -> Result<Self, TaskError> {
        let rules = config
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| {
                let name = rule.name.unwrap_or_else(|| format!("rule {}", i + 1));
                let check = match (&rule.expr, rule.required) {
                    (Some(expr), None) => Check::Expr(compile(&name, "expr", expr)?),
                    (None, Some(field)) => Check::Required(field),
                    _ => {
                        return Err(TaskError::permanent(format!(
                            "rule '{name}' needs exactly one of 'expr' or 'required'"
                        )));
                    }
                };
                let when = rule
                    .when
                    .as_deref()
                    .map(|w| compile(&name, "when", w))
                    .transpose()?;
                let message = rule.message.unwrap_or_else(|| match (&check, &rule.expr) {
                    (Check::Required(field), _) => format!("'{field}' is required"),
                    (_, Some(expr)) => format!("{expr} does not hold"),
                    _ => "rule broken".to_owned(),
                });
                Ok(Rule {
                    name,
                    message,
                    check,
                    when,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Validate { rules })
    }
}

fn to_ev(value: &Value) -> Option<Ev> {
    Some(match value {
        Value::Bool(b) => Ev::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ev::Int(i),
            None => Ev::Float(n.as_f64()?),
        },
        Value::String(s) => Ev::String(s.clone()),
        _ => return None,
    })
}

fn evaluate(rule: &str, node: &Node, context: &HashMapContext) -> Result<bool, String> {
    match node.eval_boolean_with_context(context) {
        Ok(b) => Ok(b),
        Err(EvalexprError::VariableIdentifierNotFound(name)) => Err(format!(
            "rule '{rule}' references a missing answer '{name}'"
        )),
        Err(err) => Err(format!("rule '{rule}' could not be evaluated: {err}")),
    }
}

impl Task for Validate {
    fn run(&self, input: &Input) -> Result<Value, TaskError> {
        let answers = input.answers();
        let mut context = HashMapContext::new();
        for (key, value) in answers {
            if let Some(v) = to_ev(value) {
                // Keys that are not identifiers simply cannot be referenced.
                let _ = context.set_value(key.clone(), v);
            }
        }
        let mut flags = Vec::new();
        for rule in &self.rules {
            if let Some(when) = &rule.when {
                match evaluate(&rule.name, when, &context) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(message) => {
                        flags.push(json!({ "rule": rule.name, "message": message }));
                        continue;
                    }
                }
            }
            let outcome = match &rule.check {
                Check::Expr(node) => evaluate(&rule.name, node, &context),
                Check::Required(field) => Ok(answers.get(field).is_some_and(|v| {
                    !(v.is_null() || v.as_str().is_some_and(|s| s.trim().is_empty()))
                })),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => flags.push(json!({ "rule": rule.name, "message": rule.message })),
                Err(message) => flags.push(json!({ "rule": rule.name, "message": message })),
            }
        }
        Ok(json!({ "valid": flags.is_empty(), "flags": flags }))
    }
}

plugin_api::export_plugin!("validate" => Validate::new);

#[cfg(test)]
mod tests {
    use super::*;

    fn new(config: Value) -> Result<Validate, TaskError> {
        Validate::new(plugin_api::decode_config(config)?)
    }

    fn run(config: Value, answers: Value) -> Result<Value, TaskError> {
        new(config)?.run(&Input::new("f", "s", json!({ "answers": answers }), 1))
    }

    #[test]
    fn rules_flag_what_they_catch() {
        let config = json!({"rules": [
            {"name": "savings", "expr": "monthly_savings <= monthly_income", "message": "savings exceed income"},
            {"name": "phone_if_contact", "required": "phone", "when": "contact_ok"},
            {"name": "adult", "expr": "age >= 18", "when": "employed == true"},
        ]});
        let ok = run(
            config.clone(),
            json!({"monthly_savings": 100, "monthly_income": 2000, "contact_ok": false, "age": 16, "employed": false}),
        );
        assert_eq!(ok, Ok(json!({"valid": true, "flags": []})));
        let bad = run(config, json!({"monthly_savings": 3000, "monthly_income": 2000.5, "contact_ok": true, "phone": " ", "age": 16, "employed": true}))
            .expect("runs");
        assert_eq!(bad["valid"], false);
        let rules: Vec<_> = bad["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .map(|f| f["rule"].clone())
            .collect();
        assert_eq!(
            rules,
            [json!("savings"), json!("phone_if_contact"), json!("adult")]
        );
        assert_eq!(bad["flags"][0]["message"], "savings exceed income");
    }

    #[test]
    fn a_missing_answer_is_reported_not_panicked() {
        let out = run(
            json!({"rules": [{"name": "r", "expr": "a < b"}]}),
            json!({"a": 1}),
        )
        .expect("runs");
        assert_eq!(out["valid"], false);
        assert_eq!(
            out["flags"][0]["message"],
            "rule 'r' references a missing answer 'b'"
        );
    }

    #[test]
    fn a_syntax_error_is_a_config_error_naming_the_rule() {
        let err = new(json!({"rules": [{"name": "broken", "expr": "a <= (b"}]}))
            .err()
            .expect("refused");
        assert!(
            err.message().contains("rule 'broken': syntax error"),
            "{err}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_config_of_the_wrong_shape_is_refused_naming_the_field() {
        let err = new(json!({"rules": 5})).err().expect("refused");
        assert!(err.message().contains("`rules`"), "{err}");
        assert!(err.message().contains("expected a sequence"), "{err}");
    }
}
