//! Classification of Compute Engine errors into [`ProviderError`] classes.
//!
//! GCE reports a failure either as an HTTP error (status, `error.errors[].reason`) or inside a
//! finished operation (`error.errors[].code`, `httpErrorStatusCode`). Both are reduced to
//! [`ApiFailure`] and classified here, purely, so every rule has a table test.

use crate::ProviderError;

/// A failed Compute call or operation, reduced to what classification needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiFailure {
    /// The API method, e.g. `forwardingRules.insert`.
    pub method: String,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    /// `reason`s (HTTP errors) or `code`s (operation errors), e.g. `alreadyExists`, `QUOTA_EXCEEDED`.
    pub reasons: Vec<String>,
    /// GCE's message.
    pub message: String,
    /// The request never got an answer (connection, timeout).
    pub transport: bool,
}

/// What a failure means to the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// 404: the resource is absent.
    NotFound,
    /// 409: a resource of that name exists (the caller checks whether it is ours).
    AlreadyExists,
    /// The resource is still used by another one (GCE releases references asynchronously).
    InUse(String),
    /// Anything else, classified.
    Other(ProviderError),
}

impl ApiFailure {
    fn has_reason(&self, wanted: &[&str]) -> bool {
        self.reasons.iter().any(|r| wanted.iter().any(|w| r.eq_ignore_ascii_case(w)))
    }

    /// The quota GCE named, from `Quota 'FORWARDING_RULES' exceeded.`.
    fn quota_name(&self) -> Option<String> {
        let rest = self.message.split("Quota '").nth(1)?;
        Some(rest.split('\'').next()?.to_owned())
    }

    /// Whether Compute asked us to slow down.
    pub fn is_throttling(&self) -> bool {
        matches!(self.classify(), Failure::Other(ProviderError::Throttled { .. }))
    }

    /// Classifies this failure.
    pub fn classify(&self) -> Failure {
        let lower = self.message.to_ascii_lowercase();
        let context = format!("{}: {}", self.method, self.message);
        if self.transport {
            return Failure::Other(ProviderError::Transient(context));
        }
        if self.has_reason(&["quotaExceeded", "QUOTA_EXCEEDED"]) || lower.contains("quota '") {
            let quota = self.quota_name().unwrap_or_else(|| "unknown".to_owned());
            // Retrying cannot help until the user raises the quota or frees resources, so it is
            // reported on the Service like invalid input, naming the quota.
            return Failure::Other(ProviderError::invalid(
                format!("GCP quota {quota}"),
                format!(
                    "the project's {quota} quota is exhausted in this region ({}); free resources or request more quota",
                    self.message
                ),
            ));
        }
        if self.status == Some(429)
            || self.has_reason(&["rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED"])
        {
            return Failure::Other(ProviderError::Throttled { retry_after: None, message: context });
        }
        if self.has_reason(&[
            "resourceInUseByAnotherResource",
            "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE",
            "resourceNotReady",
            "RESOURCE_NOT_READY",
        ]) || lower.contains("is already being used by")
            || lower.contains("resource is not ready")
        {
            return Failure::InUse(context);
        }
        if self.status == Some(404) || self.has_reason(&["notFound", "RESOURCE_NOT_FOUND"]) {
            return Failure::NotFound;
        }
        if self.status == Some(409) || self.has_reason(&["alreadyExists", "RESOURCE_ALREADY_EXISTS"]) {
            return Failure::AlreadyExists;
        }
        match self.status {
            Some(401 | 403) => Failure::Other(ProviderError::Fatal(format!(
                "{context} (check the IAM role of the operator's service account)"
            ))),
            Some(400) => Failure::Other(ProviderError::Fatal(context)),
            Some(412) => Failure::Other(ProviderError::Transient(context)),
            _ => Failure::Other(ProviderError::Transient(context)),
        }
    }

    /// Classifies this failure where none of the special cases is expected.
    pub fn into_error(self) -> ProviderError {
        match self.classify() {
            Failure::Other(e) => e,
            Failure::InUse(m) => ProviderError::Transient(format!("{m} (still in use; retrying later)")),
            Failure::NotFound => ProviderError::Transient(format!("{}: not found: {}", self.method, self.message)),
            Failure::AlreadyExists => ProviderError::Conflict(format!("{}: {}", self.method, self.message)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    fn failure(status: Option<u16>, reason: &str, message: &str) -> ApiFailure {
        ApiFailure {
            method: "forwardingRules.insert".into(),
            status,
            reasons: if reason.is_empty() { vec![] } else { vec![reason.into()] },
            message: message.into(),
            transport: false,
        }
    }

    #[test]
    fn classification_table() {
        let class = |f: ApiFailure| match f.classify() {
            Failure::Other(e) => e.class().as_str(),
            Failure::NotFound => "not_found",
            Failure::AlreadyExists => "already_exists",
            Failure::InUse(_) => "in_use",
        };
        let cases = [
            (failure(Some(429), "", "Too Many Requests"), "throttled"),
            (failure(Some(403), "rateLimitExceeded", "Rate Limit Exceeded"), "throttled"),
            (failure(Some(403), "userRateLimitExceeded", "slow down"), "throttled"),
            (
                failure(
                    Some(403),
                    "quotaExceeded",
                    "Quota 'FORWARDING_RULES' exceeded.  Limit: 15.0 in region europe-west1.",
                ),
                "invalid_input",
            ),
            (failure(Some(403), "QUOTA_EXCEEDED", "Quota 'IN_USE_ADDRESSES' exceeded."), "invalid_input"),
            (failure(Some(409), "alreadyExists", "The resource 'x' already exists"), "already_exists"),
            (failure(Some(404), "notFound", "The resource 'x' was not found"), "not_found"),
            (
                failure(
                    Some(400),
                    "resourceInUseByAnotherResource",
                    "The health_check resource 'x' is already being used by 'y'",
                ),
                "in_use",
            ),
            (failure(None, "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE", "in use"), "in_use"),
            (failure(Some(403), "forbidden", "Required 'compute.firewalls.create' permission"), "fatal"),
            (failure(Some(401), "", "Unauthorized"), "fatal"),
            (failure(Some(400), "invalid", "Invalid value for field"), "fatal"),
            (failure(Some(503), "backendError", "Internal error"), "transient"),
            (failure(None, "", "connection refused"), "transient"),
        ];
        for (f, want) in cases {
            let m = f.message.clone();
            assert_eq!(class(f), want, "{m}");
        }
    }

    #[test]
    fn quota_error_names_the_quota_for_the_user() {
        let f =
            failure(None, "QUOTA_EXCEEDED", "Quota 'FORWARDING_RULES' exceeded.  Limit: 15.0 in region europe-west1.");
        let Failure::Other(ProviderError::InvalidInput(fields)) = f.classify() else { panic!("not invalid input") };
        assert_eq!(fields[0].field, "GCP quota FORWARDING_RULES");
        assert!(fields[0].message.contains("Limit: 15.0"), "{}", fields[0].message);
        assert_eq!(ProviderError::InvalidInput(fields).class(), ErrorClass::InvalidInput);
    }
}
