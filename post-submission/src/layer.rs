//! The tower layer around a submit handler.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::body::Body;
use http::{Request, Response, header};
use http_body_util::BodyExt;
use serde_json::json;
use tower::{Layer, Service};

use crate::{PostSubmission, Stored, SubmissionContext};

/// Wraps a submit handler: see the crate documentation.
#[derive(Debug, Clone)]
pub struct PostSubmissionLayer {
    daisy: PostSubmission,
}

impl PostSubmissionLayer {
    /// The layer for routes whose stored submissions go to `daisy`.
    pub fn new(daisy: PostSubmission) -> PostSubmissionLayer {
        PostSubmissionLayer { daisy }
    }
}

impl<S> Layer<S> for PostSubmissionLayer {
    type Service = PostSubmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PostSubmissionService {
            inner,
            daisy: self.daisy.clone(),
        }
    }
}

/// The service [`PostSubmissionLayer`] builds.
#[derive(Debug, Clone)]
pub struct PostSubmissionService<S> {
    inner: S,
    daisy: PostSubmission,
}

impl<S> Service<Request<Body>> for PostSubmissionService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let daisy = self.daisy.clone();
        let context = request.extensions().get::<SubmissionContext>().cloned();
        Box::pin(async move {
            let response = inner.call(request).await?;
            if !response.status().is_success() {
                return Ok(response);
            }
            let Some(mut stored) = response.extensions().get::<Stored>().cloned() else {
                return Ok(response);
            };
            stored.context = merge_context(stored.context, context);
            let outcome = match daisy.send(&stored, daisy.client.deadline()).await {
                Ok(done) => done,
                Err(err) if err.is_final() => {
                    json!({ "status": "rejected", "reason": err.to_string() })
                }
                Err(err) => {
                    tracing::warn!(submission.id = %stored.submission_id, error = %err, "Daisy did not accept the submission; it stays pending");
                    json!({ "status": "pending", "reason": err.to_string() })
                }
            };
            Ok(merge(response, outcome).await)
        })
    }
}

/// The handler's context, with any field it left empty taken from the
/// request's (an authentication middleware may know the submitter, the
/// handler the form's owners).
fn merge_context(
    handler: Option<SubmissionContext>,
    request: Option<SubmissionContext>,
) -> Option<SubmissionContext> {
    let (mut handler, request) = match (handler, request) {
        (Some(handler), Some(request)) => (handler, request),
        (handler, request) => return handler.or(request),
    };
    let fill = |mine: &mut String, theirs: String| {
        if mine.is_empty() {
            *mine = theirs;
        }
    };
    fill(&mut handler.organisation_id, request.organisation_id);
    fill(&mut handler.submitter, request.submitter);
    fill(&mut handler.locale, request.locale);
    if handler.owner_emails.is_empty() {
        handler.owner_emails = request.owner_emails;
    }
    Some(handler)
}

/// Adds `post_submission` to a JSON object body; other bodies are returned as they were.
async fn merge(response: Response<Body>, outcome: serde_json::Value) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            tracing::warn!(error = %err, "reading the handler's response body failed");
            return Response::from_parts(parts, Body::empty());
        }
    };
    let merged = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut object)) => {
            object.insert("post_submission".into(), outcome);
            serde_json::to_vec(&object).ok()
        }
        _ => None,
    };
    match merged {
        Some(body) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Response::from_parts(parts, Body::from(body))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handlers_context_wins_and_the_request_fills_its_gaps() {
        let handler = SubmissionContext {
            owner_emails: vec!["owner@example.org".into()],
            ..SubmissionContext::default()
        };
        let request = SubmissionContext {
            owner_emails: vec!["ignored@example.org".into()],
            submitter: "ada@example.org".into(),
            locale: "en-GB".into(),
            ..SubmissionContext::default()
        };
        let merged = merge_context(Some(handler.clone()), Some(request.clone())).expect("some");
        assert_eq!(merged.owner_emails, ["owner@example.org"]);
        assert_eq!(merged.submitter, "ada@example.org");
        assert_eq!(merged.locale, "en-GB");
        assert_eq!(merge_context(None, Some(request.clone())), Some(request));
        assert_eq!(merge_context(Some(handler.clone()), None), Some(handler));
        assert_eq!(merge_context(None, None), None);
    }
}
