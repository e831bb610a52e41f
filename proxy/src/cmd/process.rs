//! `daisy process`: call Process on a running server and print the
//! response as JSON.

use anyhow::Context;
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
    let response = runtime.block_on(proxy::grpc::call_process(
        server,
        &form.to_string(),
        &submission_id.to_string(),
        submission,
    ))?;
    println!("{}", serde_json::to_string_pretty(&response)?);
    Ok(())
}
