//! Statuses at the edge: registry failures as `Status`, tonic's own
//! statuses put right, and gRPC codes' names for metrics.

use tonic::{Code, Status};

use crate::error::RegistryError;

/// A registry failure as the caller sees it (the detail goes to the log).
pub(super) fn registry_status(err: impl std::ops::Deref<Target = RegistryError>) -> Status {
    let err = &*err;
    // The detail (host, driver message) goes to the log, not to the caller.
    tracing::error!(error = %err, cause = ?std::error::Error::source(err).map(|s| s.to_string()), "task registry failed");
    if err.is_unreachable() {
        Status::unavailable("the task registry (PostgreSQL) is unreachable; retry later")
    } else {
        Status::internal("the task registry failed; see the server log")
    }
}

/// A gRPC code's canonical name, as a metrics label.
pub(super) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Puts right the statuses tonic gives before the service sees a request:
/// a request over `max_decoding_message_size` is `RESOURCE_EXHAUSTED` (not
/// `OUT_OF_RANGE`), and one protobuf cannot decode (too deeply nested,
/// malformed) is `INVALID_ARGUMENT` (not `INTERNAL`), with a message that
/// says what to fix instead of the decoder's internals.
pub fn edge_statuses<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").cloned();
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if status.as_ref().is_some_and(|s| s == "11") && message.contains("message length too large") {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    } else if status.as_ref().is_some_and(|s| s == "13")
        && message.starts_with("failed to decode Protobuf message")
    {
        let why = if message.contains("recursion limit") {
            "request is nested too deeply to decode: a submission may nest at most 32 levels of objects and lists"
        } else {
            "request is not a valid protobuf message for this method"
        };
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        let encoded =
            percent_encoding::utf8_percent_encode(why, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        if let Ok(value) = http::HeaderValue::from_str(&encoded) {
            headers.insert("grpc-message", value);
        }
    }
    response
}
