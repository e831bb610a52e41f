//! The gRPC client for Daisy's `Process`.

use std::time::Duration;

use proto::{
    json::{json_to_struct, value_to_json},
    v1::{ProcessRequest, post_sub_proxy_client::PostSubProxyClient},
};
use serde_json::json;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

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
    /// The TLS settings or the API key cannot be used.
    #[error("Daisy client credentials: {0}")]
    Credentials(String),
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
            DaisyError::Deadline(_) | DaisyError::Address(_) | DaisyError::Credentials(_) => false,
        }
    }
}

/// How the client proves itself to Daisy and checks Daisy: TLS trust, an
/// optional client certificate (mutual TLS) and an API key.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The CA (PEM) Daisy's certificate must chain to; needed for `https://`.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), for a Daisy that requires them.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// An API key (`daisy key create`), sent as `authorization: Bearer`.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for Credentials {
    /// Says what is set, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Credentials {
    /// From the environment: `DAISY_CA_FILE`, `DAISY_CLIENT_CERT` and
    /// `DAISY_CLIENT_KEY` (PEM files), and `DAISY_API_KEY_FILE` (a file
    /// holding the key) or `DAISY_API_KEY`. Unset variables are left out.
    pub fn from_env() -> Result<Credentials, DaisyError> {
        let file = |var: &str| -> Result<Option<Vec<u8>>, DaisyError> {
            match std::env::var_os(var) {
                None => Ok(None),
                Some(path) => std::fs::read(&path).map(Some).map_err(|err| {
                    DaisyError::Credentials(format!(
                        "reading {var} '{}': {err}",
                        std::path::Path::new(&path).display()
                    ))
                }),
            }
        };
        let identity_pem = match (file("DAISY_CLIENT_CERT")?, file("DAISY_CLIENT_KEY")?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(DaisyError::Credentials(
                    "set both DAISY_CLIENT_CERT and DAISY_CLIENT_KEY, or neither".into(),
                ));
            }
        };
        let api_key = match file("DAISY_API_KEY_FILE")? {
            Some(bytes) => Some(
                String::from_utf8(bytes)
                    .map_err(|_| DaisyError::Credentials("DAISY_API_KEY_FILE is not UTF-8".into()))?
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("DAISY_API_KEY").ok(),
        };
        Ok(Credentials {
            ca_pem: file("DAISY_CA_FILE")?,
            identity_pem,
            api_key,
        })
    }

    fn endpoint(&self, addr: &str, deadline: Duration) -> Result<Endpoint, DaisyError> {
        let mut endpoint = Channel::from_shared(addr.to_owned())
            .map_err(|_| DaisyError::Address(addr.to_owned()))?
            .connect_timeout(deadline);
        if self.ca_pem.is_some() || self.identity_pem.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &self.identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|err| DaisyError::Credentials(format!("TLS settings: {err}")))?;
        }
        Ok(endpoint)
    }

    fn authorization(&self) -> Result<Option<MetadataValue<Ascii>>, DaisyError> {
        self.api_key
            .as_ref()
            .map(|key| {
                format!("Bearer {key}").parse().map_err(|_| {
                    DaisyError::Credentials("the API key is not printable ASCII".into())
                })
            })
            .transpose()
    }
}

/// A lazily connecting client of Daisy's `PostSubProxy` service.
#[derive(Debug, Clone)]
pub struct DaisyClient {
    client: PostSubProxyClient<Channel>,
    deadline: Duration,
    authorization: Option<MetadataValue<Ascii>>,
}

impl DaisyClient {
    /// A client of the server at `addr` (`http://host:port`); it connects
    /// on first use and reconnects by itself. `deadline` bounds each call
    /// made by the layer.
    pub fn connect_lazy(addr: &str, deadline: Duration) -> Result<DaisyClient, DaisyError> {
        DaisyClient::connect_lazy_with(addr, deadline, &Credentials::default())
    }

    /// [`DaisyClient::connect_lazy`] with TLS settings and an API key, for a
    /// Daisy served with `--tls-cert` (address `https://host:port`) and
    /// `--auth token`.
    pub fn connect_lazy_with(
        addr: &str,
        deadline: Duration,
        credentials: &Credentials,
    ) -> Result<DaisyClient, DaisyError> {
        let channel = credentials.endpoint(addr, deadline)?.connect_lazy();
        Ok(DaisyClient {
            client: PostSubProxyClient::new(channel),
            deadline,
            authorization: credentials.authorization()?,
        })
    }

    /// A client balancing its calls across several Daisy servers (`daisy
    /// serve` processes sharing one database and broker). A server that
    /// stops answering is taken out of rotation until it comes back, so one
    /// serve going down costs the calls in flight on it, which the resender
    /// sends again.
    pub fn connect_balanced(addrs: &[&str], deadline: Duration) -> Result<DaisyClient, DaisyError> {
        DaisyClient::connect_balanced_with(addrs, deadline, &Credentials::default())
    }

    /// [`DaisyClient::connect_balanced`] with TLS settings and an API key.
    pub fn connect_balanced_with(
        addrs: &[&str],
        deadline: Duration,
        credentials: &Credentials,
    ) -> Result<DaisyClient, DaisyError> {
        let endpoints = addrs
            .iter()
            .map(|addr| credentials.endpoint(addr, deadline))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(DaisyError::Address(String::new()));
        }
        Ok(DaisyClient {
            client: PostSubProxyClient::new(Channel::balance_list(endpoints.into_iter())),
            deadline,
            authorization: credentials.authorization()?,
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
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        // The call is a span of the backend's trace, and Daisy continues it
        // from the W3C `traceparent` (when the backend exports traces).
        let span = tracing::info_span!(
            "daisy.process",
            form.id = %stored.form_id,
            submission.id = %stored.submission_id,
        );
        opentelemetry::propagation::TextMapPropagator::inject_context(
            &opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            &tracing_opentelemetry::OpenTelemetrySpanExt::context(&span),
            &mut MetadataInjector(request.metadata_mut()),
        );
        let mut client = self.client.clone();
        let call = tracing::Instrument::instrument(client.process(request), span);
        let response = match tokio::time::timeout(deadline, call).await {
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

/// Writes trace context fields into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}
