//! Classification of AWS API errors into [`ProviderError`] classes.
//!
//! The class decides how the operator retries, so it must be right: a throttled call slows the
//! whole provider down, a permission problem is fatal (retrying will not grant it), and a bad
//! user-given ID names the annotation the user must fix.

use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::http::Response as HttpResponse;

use super::annotations as ann;
use crate::ProviderError;

/// Codes AWS uses to say "slow down".
const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequests",
    "TooManyRequestsException",
    "SlowDown",
    "PriorRequestNotComplete",
];

/// Codes that mean the credentials or permissions are wrong.
const FATAL: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "UnrecognizedClientException",
    "MissingAuthenticationToken",
    "OptInRequired",
    "Blocked",
];

/// Codes that mean something of the same name exists and is not ours.
const CONFLICT: &[&str] = &[
    "DuplicateLoadBalancerName",
    "DuplicateTargetGroupName",
    "InvalidGroup.Duplicate",
    "TooManyLoadBalancers",
    "TooManyTargetGroups",
    "TooManyListeners",
    "TooManyTargets",
    "RulesPerSecurityGroupLimitExceeded",
    "SecurityGroupLimitExceeded",
    "AddressLimitExceeded",
];

/// Codes that name a user-given thing that does not exist or cannot be used, with the
/// annotation the user gave it in.
const USER_INPUT: &[(&str, &str)] = &[
    ("InvalidSubnetID.NotFound", ann::SUBNETS),
    ("InvalidSubnet", ann::SUBNETS),
    ("SubnetNotFound", ann::SUBNETS),
    ("InvalidSubnetID.Malformed", ann::SUBNETS),
    ("CertificateNotFound", ann::SSL_CERT),
    ("UnsupportedCertificate", ann::SSL_CERT),
    ("InvalidCertificate", ann::SSL_CERT),
    ("SSLPolicyNotFound", ann::SSL_NEGOTIATION_POLICY),
    ("InvalidAllocationID.NotFound", ann::EIP_ALLOCATIONS),
    ("AllocationIdNotFound", ann::EIP_ALLOCATIONS),
    ("InvalidSecurityGroup", ann::SECURITY_GROUPS),
    ("InvalidGroupId.Malformed", ann::SECURITY_GROUPS),
    ("InvalidGroup.NotFound", ann::SECURITY_GROUPS),
    ("InvalidSecurityGroupID.NotFound", ann::SECURITY_GROUPS),
];

/// Codes that reject the request's content.
const VALIDATION: &[&str] = &[
    "ValidationError",
    "ValidationException",
    "InvalidParameter",
    "InvalidParameterValue",
    "InvalidParameterCombination",
    "InvalidConfigurationRequest",
    "InvalidScheme",
    "IncompatibleProtocols",
    "UnsupportedProtocol",
    "InvalidTarget",
];

/// How a call failed before or after reaching AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request could not be built (often: no credentials or region).
    Construction,
    /// The call timed out.
    Timeout,
    /// The request never got an answer (connection refused, DNS, TLS).
    Dispatch,
    /// An answer that could not be understood.
    Response,
    /// AWS answered with an error code.
    Service,
}

/// A failed AWS call, with what is needed to decide what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The operation, e.g. `CreateLoadBalancer`.
    pub operation: &'static str,
    /// How it failed.
    pub kind: FailureKind,
    /// The AWS error code, when AWS answered.
    pub code: Option<String>,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// AWS's message or the transport's description.
    pub message: String,
    /// The annotation the request's user-given values came from, if any.
    pub field: Option<&'static str>,
}

impl ApiError {
    /// Builds an `ApiError` from an SDK error.
    pub fn from_sdk<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (kind, status) = match &err {
            SdkError::ConstructionFailure(_) => (FailureKind::Construction, None),
            SdkError::TimeoutError(_) => (FailureKind::Timeout, None),
            SdkError::DispatchFailure(_) => (FailureKind::Dispatch, None),
            SdkError::ResponseError(e) => (FailureKind::Response, Some(e.raw().status().as_u16())),
            SdkError::ServiceError(e) => (FailureKind::Service, Some(e.raw().status().as_u16())),
            _ => (FailureKind::Dispatch, None),
        };
        let code = err.code().map(str::to_owned);
        let message = match err.message() {
            Some(m) => m.to_owned(),
            None => aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
        };
        Self { operation, kind, code, status, message, field: None }
    }

    /// Whether AWS answered with `code`.
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// Whether AWS said the thing asked about does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code.as_deref().is_some_and(|c| c.contains("NotFound"))
    }

    /// Whether this is a throttling answer.
    pub fn is_throttling(&self) -> bool {
        self.code.as_deref().is_some_and(|c| THROTTLING.contains(&c)) || self.status == Some(429)
    }

    /// The error class, as the operator sees it.
    pub fn classify(&self) -> ProviderError {
        let code = self.code.as_deref().unwrap_or("");
        let what = format!("{}: {}{}", self.operation, if code.is_empty() { "" } else { code }, self.describe());
        if self.is_throttling() {
            return ProviderError::Throttled { retry_after: None, message: what };
        }
        match self.kind {
            FailureKind::Timeout | FailureKind::Dispatch | FailureKind::Response => {
                return ProviderError::Transient(what);
            }
            FailureKind::Construction => {
                // The SDK cannot even build the request: no credentials, no region. Retrying
                // the same process will not find them.
                return ProviderError::Fatal(what);
            }
            FailureKind::Service => {}
        }
        if FATAL.contains(&code) {
            return ProviderError::Fatal(what);
        }
        if CONFLICT.contains(&code) {
            return ProviderError::Conflict(what);
        }
        if let Some((_, field)) = USER_INPUT.iter().find(|(c, _)| *c == code) {
            return ProviderError::invalid(*field, format!("AWS rejected it: {what}"));
        }
        if VALIDATION.contains(&code) {
            let field = self.field.unwrap_or("hawser.dev/aws-*");
            return ProviderError::invalid(field, format!("AWS rejected the configuration: {what}"));
        }
        if self.status.is_some_and(|s| s >= 500) {
            return ProviderError::Transient(what);
        }
        // Everything else (a resource in use, a dependency still attached, state that changed
        // under us) is expected to pass.
        ProviderError::Transient(what)
    }

    fn describe(&self) -> String {
        if self.message.is_empty() { String::new() } else { format!(" ({})", self.message) }
    }

    /// Names the annotation the request's user-given values came from.
    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }
}

impl From<ApiError> for ProviderError {
    fn from(e: ApiError) -> Self {
        e.classify()
    }
}

/// Bounded backoff for deletions that wait for AWS to release a dependency.
pub(crate) fn backoff_delay(attempt: u32) -> Duration {
    // 0.5 s, 1 s, 2 s, 4 s, 5 s, ... with jitter so that several Services deleted together do
    // not retry in lock step.
    let base = Duration::from_millis(500).saturating_mul(1u32 << attempt.min(4)).min(Duration::from_secs(5));
    let jitter = {
        use rand::{Rng, SeedableRng};
        rand::rngs::SmallRng::from_os_rng().random::<f64>() * 0.25
    };
    base.mul_f64(1.0 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    fn service(code: &str, status: u16) -> ApiError {
        ApiError {
            operation: "Op",
            kind: FailureKind::Service,
            code: Some(code.to_owned()),
            status: Some(status),
            message: "m".into(),
            field: None,
        }
    }

    #[test]
    fn codes_are_classified() {
        let cases: &[(&str, u16, ErrorClass)] = &[
            ("Throttling", 400, ErrorClass::Throttled),
            ("ThrottlingException", 400, ErrorClass::Throttled),
            ("RequestLimitExceeded", 503, ErrorClass::Throttled),
            ("TooManyRequests", 429, ErrorClass::Throttled),
            ("Whatever", 429, ErrorClass::Throttled),
            ("AccessDenied", 403, ErrorClass::Fatal),
            ("UnauthorizedOperation", 403, ErrorClass::Fatal),
            ("InvalidClientTokenId", 403, ErrorClass::Fatal),
            ("DuplicateLoadBalancerName", 400, ErrorClass::Conflict),
            ("DuplicateTargetGroupName", 400, ErrorClass::Conflict),
            ("InvalidGroup.Duplicate", 400, ErrorClass::Conflict),
            ("ValidationError", 400, ErrorClass::InvalidInput),
            ("InvalidParameterValue", 400, ErrorClass::InvalidInput),
            ("InvalidConfigurationRequest", 400, ErrorClass::InvalidInput),
            ("InvalidSubnetID.NotFound", 400, ErrorClass::InvalidInput),
            ("CertificateNotFound", 400, ErrorClass::InvalidInput),
            ("InternalFailure", 500, ErrorClass::Transient),
            ("ServiceUnavailable", 503, ErrorClass::Transient),
            ("ResourceInUse", 400, ErrorClass::Transient),
            ("DependencyViolation", 400, ErrorClass::Transient),
        ];
        for (code, status, class) in cases {
            assert_eq!(service(code, *status).classify().class(), *class, "{code} {status}");
        }
    }

    #[test]
    fn user_given_things_name_their_annotation() {
        let err = service("CertificateNotFound", 400).classify();
        let ProviderError::InvalidInput(fields) = err else { panic!("{err:?}") };
        assert_eq!(fields[0].field, ann::SSL_CERT);
        let err = service("InvalidAllocationID.NotFound", 400).classify();
        let ProviderError::InvalidInput(fields) = err else { panic!("{err:?}") };
        assert_eq!(fields[0].field, ann::EIP_ALLOCATIONS);
        let err = service("ValidationError", 400).with_field(ann::PROXY_PROTOCOL).classify();
        let ProviderError::InvalidInput(fields) = err else { panic!("{err:?}") };
        assert_eq!(fields[0].field, ann::PROXY_PROTOCOL);
    }

    #[test]
    fn transport_failures() {
        for (kind, class) in [
            (FailureKind::Dispatch, ErrorClass::Transient),
            (FailureKind::Timeout, ErrorClass::Transient),
            (FailureKind::Response, ErrorClass::Transient),
            (FailureKind::Construction, ErrorClass::Fatal),
        ] {
            let e = ApiError { operation: "Op", kind, code: None, status: None, message: "x".into(), field: None };
            assert_eq!(e.classify().class(), class, "{kind:?}");
        }
    }

    #[test]
    fn backoff_is_bounded() {
        assert!(backoff_delay(0) >= Duration::from_millis(500));
        assert!(backoff_delay(30) <= Duration::from_millis(6250));
    }
}
