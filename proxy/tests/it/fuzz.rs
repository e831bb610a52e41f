//! Proof by fuzzing: arbitrary submissions thrown at a real `daisy serve`
//! (with a worker) never get `INTERNAL`, never take it down, and never
//! wedge its run log.
//!
//! It runs for `DAISY_FUZZ_SECS` seconds (60 by default, as in CI; `make
//! fuzz` runs it for 10 minutes). A failing case is printed whole.

use std::time::{Duration, Instant};

use proptest::{
    prelude::*,
    strategy::{Strategy, ValueTree},
    test_runner::TestRunner,
};
use proto::{
    prost_types::{ListValue, Struct, Value, value::Kind},
    v1::{ProcessRequest, RunState},
};
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

use crate::util::*;

/// Strings as they come: any unicode, sometimes a NUL, sometimes huge.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        60 => "[^\u{0}]{0,40}",
        1 => "[^\u{0}]{0,8}\u{0}[^\u{0}]{0,8}",
        1 => (0usize..200_000).prop_map(|n| "é".repeat(n / 2)),
        6 => "[\u{1F600}-\u{1F64F}\u{202E}\u{FEFF}\u{FFFF}]{1,20}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        10 => Just(Kind::NullValue(0)),
        10 => any::<bool>().prop_map(Kind::BoolValue),
        20 => (-1e15f64..1e15f64).prop_map(Kind::NumberValue),
        1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e308)]
            .prop_map(Kind::NumberValue),
        30 => any_string().prop_map(Kind::StringValue),
    ]
    .prop_map(|kind| Value { kind: Some(kind) })
}

/// Any value: trees a few levels deep and wide.
fn any_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(6, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..12).prop_map(|values| Value {
                kind: Some(Kind::ListValue(ListValue { values })),
            }),
            prop::collection::btree_map(any_string(), inner, 0..12).prop_map(|fields| Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: fields.into_iter().collect(),
                })),
            }),
        ]
    })
}

/// A value nested `depth` levels, alternating objects and lists.
fn deep(depth: usize) -> Value {
    (0..depth).fold(
        Value {
            kind: Some(Kind::NumberValue(1.0)),
        },
        |inner, i| Value {
            kind: Some(if i % 3 == 2 {
                Kind::ListValue(ListValue {
                    values: vec![inner],
                })
            } else {
                Kind::StructValue(Struct {
                    fields: [("d".to_owned(), inner)].into(),
                })
            }),
        },
    )
}

fn any_submission() -> impl Strategy<Value = Struct> {
    prop_oneof![
        4 => prop::collection::btree_map(any_string(), any_value(), 0..16)
            .prop_map(|fields| Struct { fields: fields.into_iter().collect() }),
        1 => (1usize..90).prop_map(|d| Struct { fields: [("deep".to_owned(), deep(d))].into() }),
        1 => (0usize..20_000).prop_map(|n| Struct {
            fields: (0..n).map(|i| (format!("k{i}"), Value { kind: Some(Kind::BoolValue(true)) })).collect(),
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_submissions_never_get_internal_nor_wedge_serve() {
    let budget = Duration::from_secs(
        std::env::var("DAISY_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let mut stack =
        test_support::Stack::start(&[("echo", "echo"), ("testkit", "testkit")], &[]).await;
    let (sync_form, async_form) = (Uuid::new_v4(), Uuid::new_v4());
    stack.attach(sync_form, "echo", "echo", "echo", false, &json!({}));
    stack.attach(async_form, "echo", "echo", "echo", false, &json!({}));
    stack.attach(async_form, "later", "testkit", "config", true, &json!({}));
    let mut runner = TestRunner::default();
    let strategy = any_submission();
    let started = Instant::now();
    let (mut cases, mut refused) = (0u64, 0u64);
    while started.elapsed() < budget {
        for _ in 0..20 {
            let submission = strategy
                .new_tree(&mut runner)
                .expect("a submission")
                .current();
            let form = if cases % 2 == 0 {
                sync_form
            } else {
                async_form
            };
            let request = ProcessRequest {
                form_id: form.to_string(),
                submission_id: Uuid::new_v4().to_string(),
                submission: Some(submission),
                context: None,
            };
            cases += 1;
            match stack.client.process(request.clone()).await {
                Ok(_) => {}
                Err(status)
                    if matches!(
                        status.code(),
                        Code::InvalidArgument | Code::ResourceExhausted
                    ) =>
                {
                    refused += 1
                }
                Err(status) => {
                    let mut shown = format!("{request:?}");
                    shown.truncate(4000);
                    panic!("case {cases}: {status:?} for {shown}");
                }
            }
        }
        // A clean call is recorded within 2 s: the run log is not wedged.
        let (submission, _) = stack.process(sync_form, json!({"clean": true})).await;
        let logged = wait_for_runs(
            &mut stack.client,
            &submission,
            Duration::from_secs(2),
            |runs| runs.iter().any(|r| r.state() == RunState::Succeeded),
        )
        .await;
        assert!(
            !logged.is_empty(),
            "after {cases} cases the run log is wedged"
        );
    }
    eprintln!(
        "fuzz: {cases} cases in {:?}, {refused} refused",
        started.elapsed()
    );
    assert!(cases > 0);
}
