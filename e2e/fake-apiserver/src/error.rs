//! Kubernetes `Status` failures: every error the server answers with is one of these.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// Why one field of an object is invalid, as a `StatusCause` of a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Kubernetes cause reason, e.g. `FieldValueInvalid`.
    pub reason: &'static str,
    /// Dotted field path, e.g. `spec.ports[1].nodePort`.
    pub field: String,
    /// Human-readable explanation.
    pub message: String,
}

impl FieldError {
    /// The value is not acceptable.
    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, detail: &str) -> Self {
        let field = field.into();
        Self { reason: "FieldValueInvalid", message: format!("{field}: Invalid value: {value}: {detail}"), field }
    }

    /// The value is missing.
    pub fn required(field: impl Into<String>, detail: &str) -> Self {
        let field = field.into();
        let message = if detail.is_empty() {
            format!("{field}: Required value")
        } else {
            format!("{field}: Required value: {detail}")
        };
        Self { reason: "FieldValueRequired", message, field }
    }

    /// The value repeats one given earlier in the same list.
    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        let field = field.into();
        Self { reason: "FieldValueDuplicate", message: format!("{field}: Duplicate value: {value}"), field }
    }

    /// The field may not be set in this situation.
    pub fn forbidden(field: impl Into<String>, detail: &str) -> Self {
        let field = field.into();
        Self { reason: "FieldValueForbidden", message: format!("{field}: Forbidden: {detail}"), field }
    }

    /// The value is not one of the supported ones.
    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let field = field.into();
        let list = supported.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        Self {
            reason: "FieldValueNotSupported",
            message: format!("{field}: Unsupported value: \"{value}\": supported values: {list}"),
            field,
        }
    }
}

/// A failed request, rendered as a `v1.Status` body with the matching HTTP code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable `StatusReason`.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details` of the Status, if any.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, group: &str, kind: &str, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": group, "kind": kind}));
        self
    }

    /// 404 for a named object of a resource (`plural`).
    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        let gr = group_resource(group, plural);
        Self::new(404, "NotFound", format!("{gr} \"{name}\" not found")).with_details(group, plural, name)
    }

    /// 404 for a path the server does not serve.
    pub fn path_not_found(path: &str) -> Self {
        Self::new(404, "NotFound", format!("the server could not find the requested resource (path {path})"))
    }

    /// 409 because an object with that name exists.
    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        let gr = group_resource(group, plural);
        Self::new(409, "AlreadyExists", format!("{gr} \"{name}\" already exists")).with_details(group, plural, name)
    }

    /// 409 because the client's resourceVersion (or uid precondition) is stale.
    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> Self {
        let gr = group_resource(group, plural);
        Self::new(409, "Conflict", format!("Operation cannot be fulfilled on {gr} \"{name}\": {why}"))
            .with_details(group, plural, name)
    }

    /// 422 with one cause per invalid field.
    pub fn invalid(group: &str, kind: &str, name: &str, errors: Vec<FieldError>) -> Self {
        let summary = errors.iter().map(|e| e.message.clone()).collect::<Vec<_>>();
        let message = if summary.len() == 1 {
            format!("{kind} \"{name}\" is invalid: {}", summary.join(""))
        } else {
            format!("{kind} \"{name}\" is invalid: [{}]", summary.join(", "))
        };
        let causes: Vec<Value> =
            errors.iter().map(|e| json!({"reason": e.reason, "message": e.message, "field": e.field})).collect();
        Self {
            code: 422,
            reason: "Invalid",
            message,
            details: Some(json!({"name": name, "group": group, "kind": kind, "causes": causes})),
        }
    }

    /// 400 for a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 401 for a missing or wrong bearer token.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 403, e.g. creating in a terminating namespace.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// 405 for a verb the path does not support.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method} {path})"),
        )
    }

    /// 410 for a resourceVersion older than the kept history.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 415 for a body type the server does not accept.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    /// 500 for a bug or an I/O failure inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `v1.Status` body.
    pub fn status_json(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(details), Some(map)) = (&self.details, status.as_object_mut()) {
            map.insert("details".into(), details.clone());
        }
        status
    }
}

fn group_resource(group: &str, plural: &str) -> String {
    if group.is_empty() { plural.to_string() } else { format!("{plural}.{group}") }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (code, self.status_json().to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// Result alias for API operations.
pub type ApiResult<T> = Result<T, ApiError>;
