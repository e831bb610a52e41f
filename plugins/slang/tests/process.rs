//! `slang` through the real loader and `Process`.

use serde_json::json;
use test_support::Stack;
use uuid::Uuid;

#[tokio::test]
async fn meanings_come_back_in_the_process_response() {
    let mut stack = Stack::start(&[("slang", "slang")], &[]).await;
    let form = Uuid::new_v4();
    stack.attach(
        form,
        "slang",
        "slang",
        "slang",
        false,
        &json!({
            "text_field": "comment", "city_field": "city",
            "dictionaries": {"Lagos": {"wahala": "trouble", "japa": "to emigrate"}},
        }),
    );

    let (_, response) = stack
        .process(
            form,
            json!({"answers": {"comment": "Too much wahala, I go japa", "city": "Lagos"}}),
        )
        .await;

    assert_eq!(
        response.results[0].outcome(),
        proto::v1::Outcome::Succeeded,
        "{response:?}"
    );
    let output = proto::json::value_to_json(response.results[0].output.as_ref().expect("output"));
    assert_eq!(
        output,
        json!({"city": "Lagos", "known_city": true, "matches": [
            {"term": "wahala", "meaning": "trouble"},
            {"term": "japa", "meaning": "to emigrate"},
        ]})
    );
}
