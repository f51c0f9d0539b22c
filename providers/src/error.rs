//! Classified provider errors: the class decides how the operator retries.

use std::time::Duration;

/// One thing the user must change, named as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InvalidField {
    /// The annotation or Service field at fault, e.g. `hawser.dev/scheme` or `spec.ports[1].protocol`.
    pub field: String,
    /// What was wrong and what is accepted.
    pub message: String,
}

impl InvalidField {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for InvalidField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// How an error should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The user must change something; retrying unchanged input cannot help.
    InvalidInput,
    /// The cloud asked us to slow down.
    Throttled,
    /// A passing fault; retry with backoff.
    Transient,
    /// The cloud holds something in the way (e.g. a same-named resource we do not own).
    Conflict,
    /// Something is broken that retrying will not fix soon (credentials, permissions).
    Fatal,
}

impl ErrorClass {
    /// The label used in metrics and conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::Throttled => "throttled",
            Self::Transient => "transient",
            Self::Conflict => "conflict",
            Self::Fatal => "fatal",
        }
    }
}

/// An error from a provider, classified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The spec cannot be realised as given; every problem found is listed.
    #[error("invalid configuration: {}", join(.0))]
    InvalidInput(Vec<InvalidField>),
    /// The cloud throttled us.
    #[error("throttled by the cloud API{}: {message}", retry_after.map(|d| format!(" (retry after {d:?})")).unwrap_or_default())]
    Throttled {
        /// When the cloud said to come back, if it did.
        retry_after: Option<Duration>,
        /// The cloud's words.
        message: String,
    },
    /// A passing fault.
    #[error("transient cloud error: {0}")]
    Transient(String),
    /// Something in the cloud is in the way.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Retrying will not help soon.
    #[error("fatal cloud error: {0}")]
    Fatal(String),
}

fn join(fields: &[InvalidField]) -> String {
    fields.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl ProviderError {
    /// A single invalid field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidInput(vec![InvalidField::new(field, message)])
    }

    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidInput(_) => ErrorClass::InvalidInput,
            Self::Throttled { .. } => ErrorClass::Throttled,
            Self::Transient(_) => ErrorClass::Transient,
            Self::Conflict(_) => ErrorClass::Conflict,
            Self::Fatal(_) => ErrorClass::Fatal,
        }
    }
}
