//! `daisy process`: call Process on a running server and print the
//! response as JSON.

use anyhow::Context;
use proto::{
    json::{json_to_struct, value_to_json},
    prost_types,
    v1::{ProcessRequest, post_sub_proxy_client::PostSubProxyClient},
};
use uuid::Uuid;

/// `daisy process`.
pub(crate) fn run(
    server: &str,
    form: Uuid,
    submission_id: Option<Uuid>,
    submission: &str,
) -> anyhow::Result<()> {
    let submission: serde_json::Value =
        serde_json::from_str(submission).context("--submission is not valid JSON")?;
    let submission_id = submission_id.unwrap_or_else(Uuid::new_v4);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let response = runtime.block_on(call_process(
        server,
        &form.to_string(),
        &submission_id.to_string(),
        submission,
    ))?;
    println!("{}", serde_json::to_string_pretty(&response)?);
    Ok(())
}

/// Calls `Process` on the server at `addr` (`http://host:port`) and returns
/// the response as JSON, with enum values by name.
async fn call_process(
    addr: &str,
    form_id: &str,
    submission_id: &str,
    submission: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let Some(submission) = json_to_struct(submission) else {
        anyhow::bail!("the submission must be a JSON object");
    };
    let mut client = PostSubProxyClient::connect(addr.to_owned())
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let response = client
        .process(ProcessRequest {
            form_id: form_id.to_owned(),
            submission_id: submission_id.to_owned(),
            submission: Some(submission),
            context: None,
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!("Process failed: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    let output =
        |v: &Option<prost_types::Value>| v.as_ref().map_or(serde_json::Value::Null, value_to_json);
    Ok(serde_json::json!({
        "results": response.results.iter().map(|r| serde_json::json!({
            "task_id": r.task_id,
            "name": r.name,
            "outcome": r.outcome().as_str_name(),
            "output": output(&r.output),
            "error": r.error,
            "duration_us": r.duration_us,
        })).collect::<Vec<_>>(),
        "enqueued": response.enqueued.iter().map(|e| serde_json::json!({
            "task_id": e.task_id,
            "name": e.name,
            "run_id": e.run_id,
        })).collect::<Vec<_>>(),
    }))
}
