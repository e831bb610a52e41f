//! The gRPC client for Daisy's `Process`.

use std::time::Duration;

use proto::{
    json::{json_to_struct, value_to_json},
    v1::{ProcessRequest, post_sub_proxy_client::PostSubProxyClient},
};
use serde_json::json;
use tonic::transport::Channel;

use crate::Stored;

/// Why Daisy did not accept a submission.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaisyError {
    /// No answer within the deadline.
    #[error("Daisy did not answer within {0:?}")]
    Deadline(Duration),
    /// Daisy answered with an error status.
    #[error("Daisy answered {code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The submission is not a JSON object.
    #[error("the stored submission is not a JSON object")]
    NotAnObject,
    /// The address is not a valid URI.
    #[error("invalid Daisy address '{0}'")]
    Address(String),
}

impl DaisyError {
    /// Whether sending the same submission again cannot succeed: Daisy
    /// refused it (`INVALID_ARGUMENT`, `ALREADY_EXISTS`, `PERMISSION_DENIED`),
    /// or it is not a JSON object.
    pub fn is_final(&self) -> bool {
        match self {
            DaisyError::Status { code, .. } => matches!(
                code,
                tonic::Code::InvalidArgument
                    | tonic::Code::AlreadyExists
                    | tonic::Code::PermissionDenied
            ),
            DaisyError::NotAnObject => true,
            DaisyError::Deadline(_) | DaisyError::Address(_) => false,
        }
    }
}

/// A lazily connecting client of Daisy's `PostSubProxy` service.
#[derive(Debug, Clone)]
pub struct DaisyClient {
    client: PostSubProxyClient<Channel>,
    deadline: Duration,
}

impl DaisyClient {
    /// A client of the server at `addr` (`http://host:port`); it connects
    /// on first use and reconnects by itself. `deadline` bounds each call
    /// made by the layer.
    pub fn connect_lazy(addr: &str, deadline: Duration) -> Result<DaisyClient, DaisyError> {
        let channel = Channel::from_shared(addr.to_owned())
            .map_err(|_| DaisyError::Address(addr.to_owned()))?
            .connect_timeout(deadline)
            .connect_lazy();
        Ok(DaisyClient {
            client: PostSubProxyClient::new(channel),
            deadline,
        })
    }

    /// A client balancing its calls across several Daisy servers (`daisy
    /// serve` processes sharing one database and broker). A server that
    /// stops answering is taken out of rotation until it comes back, so one
    /// serve going down costs the calls in flight on it, which the resender
    /// sends again.
    pub fn connect_balanced(addrs: &[&str], deadline: Duration) -> Result<DaisyClient, DaisyError> {
        let endpoints = addrs
            .iter()
            .map(|addr| {
                Channel::from_shared((*addr).to_owned())
                    .map(|endpoint| endpoint.connect_timeout(deadline))
                    .map_err(|_| DaisyError::Address((*addr).to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(DaisyError::Address(String::new()));
        }
        Ok(DaisyClient {
            client: PostSubProxyClient::new(Channel::balance_list(endpoints.into_iter())),
            deadline,
        })
    }

    /// The deadline the layer uses.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Calls `Process` for `stored` within `deadline`; returns the
    /// `post_submission` JSON (`status: done`).
    pub async fn process(
        &self,
        stored: &Stored,
        deadline: Duration,
    ) -> Result<serde_json::Value, DaisyError> {
        let submission =
            json_to_struct(stored.submission.clone()).ok_or(DaisyError::NotAnObject)?;
        let mut request = tonic::Request::new(ProcessRequest {
            form_id: stored.form_id.to_string(),
            submission_id: stored.submission_id.to_string(),
            submission: Some(submission),
            context: stored.context.clone(),
        });
        request.set_timeout(deadline);
        let mut client = self.client.clone();
        let response = match tokio::time::timeout(deadline, client.process(request)).await {
            Err(_) => return Err(DaisyError::Deadline(deadline)),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(DaisyError::Deadline(deadline));
            }
            Ok(Err(status)) => {
                return Err(DaisyError::Status {
                    code: status.code(),
                    message: status.message().to_owned(),
                });
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        Ok(json!({
            "status": "done",
            "results": response.results.iter().map(|r| {
                let outcome = match r.outcome() {
                    proto::v1::Outcome::Succeeded => "succeeded",
                    proto::v1::Outcome::Failed => "failed",
                    proto::v1::Outcome::TimedOut => "timed_out",
                    proto::v1::Outcome::Unspecified => "unspecified",
                };
                json!({
                    "task_id": r.task_id,
                    "name": r.name,
                    "outcome": outcome,
                    "output": r.output.as_ref().map_or(serde_json::Value::Null, value_to_json),
                    "error": (!r.error.is_empty()).then_some(&r.error),
                    "duration_us": r.duration_us,
                })
            }).collect::<Vec<_>>(),
            "enqueued": response.enqueued.iter().map(|e| json!({
                "task_id": e.task_id,
                "name": e.name,
                "run_id": e.run_id,
            })).collect::<Vec<_>>(),
        }))
    }
}
