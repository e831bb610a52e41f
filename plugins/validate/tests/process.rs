//! `validate` through the real loader and `Process`.

use serde_json::json;
use test_support::Stack;
use uuid::Uuid;

#[tokio::test]
async fn flags_come_back_in_the_process_response() {
    let mut stack = Stack::start(&[("validate", "validate")], &[]).await;
    let form = Uuid::new_v4();
    stack.attach(form, "rules", "validate", "validate", false, &json!({"rules": [
        {"name": "savings", "expr": "monthly_savings <= monthly_income", "message": "Savings cannot exceed income"},
        {"name": "phone_if_contact", "required": "phone", "when": "contact_ok"},
    ]}));

    let (_, ok) = stack.process(form, json!({"answers": {"monthly_savings": 200, "monthly_income": 1500, "contact_ok": false}})).await;
    assert_eq!(
        ok.results[0].outcome(),
        proto::v1::Outcome::Succeeded,
        "{ok:?}"
    );
    let output = proto::json::value_to_json(ok.results[0].output.as_ref().expect("output"));
    assert_eq!(output, json!({"valid": true, "flags": []}));

    let (_, bad) = stack.process(form, json!({"answers": {"monthly_savings": 2000, "monthly_income": 1500, "contact_ok": true}})).await;
    let output = proto::json::value_to_json(bad.results[0].output.as_ref().expect("output"));
    assert_eq!(
        output,
        json!({"valid": false, "flags": [
            {"rule": "savings", "message": "Savings cannot exceed income"},
            {"rule": "phone_if_contact", "message": "'phone' is required"},
        ]})
    );
}

#[tokio::test]
async fn a_broken_rule_fails_only_its_task_with_a_clear_error() {
    let mut stack = Stack::start(&[("validate", "validate")], &[]).await;
    let form = Uuid::new_v4();
    stack.attach(
        form,
        "broken",
        "validate",
        "validate",
        false,
        &json!({"rules": [{"name": "oops", "expr": "a <= (b"}]}),
    );
    stack.attach(
        form,
        "fine",
        "validate",
        "validate",
        false,
        &json!({"rules": [{"expr": "a == 1"}]}),
    );

    let (_, response) = stack.process(form, json!({"answers": {"a": 1}})).await;

    let broken = response
        .results
        .iter()
        .find(|r| r.name == "broken")
        .expect("broken");
    assert_eq!(broken.outcome(), proto::v1::Outcome::Failed);
    assert!(
        broken.error.contains("rule 'oops': syntax error"),
        "{}",
        broken.error
    );
    let fine = response
        .results
        .iter()
        .find(|r| r.name == "fine")
        .expect("fine");
    assert_eq!(fine.outcome(), proto::v1::Outcome::Succeeded);
}
