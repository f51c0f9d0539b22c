//! The SDK clients: construction, a record of every call made, and client-side rate limits.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::Response as HttpResponse;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::RetryConfig;
use serde::Serialize;

pub use crate::limiter::RateLimiter;

use super::config::AwsConfig;
use super::errors::ApiError;
use crate::ProviderError;

/// Every IAM action the provider's code calls, as `service:Operation`. The IAM policy shipped
/// with hawser must allow each of them (checked by a test), and the moto tests check that no
/// call outside this list is ever made.
pub const API_ACTIONS: &[&str] = &[
    "ec2:DescribeInstances",
    "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups",
    "ec2:CreateSecurityGroup",
    "ec2:CreateTags",
    "ec2:DeleteSecurityGroup",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:RevokeSecurityGroupIngress",
    "elasticloadbalancing:DescribeLoadBalancers",
    "elasticloadbalancing:DescribeLoadBalancerAttributes",
    "elasticloadbalancing:DescribeListeners",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetGroupAttributes",
    "elasticloadbalancing:DescribeTargetHealth",
    "elasticloadbalancing:DescribeTags",
    "elasticloadbalancing:CreateLoadBalancer",
    "elasticloadbalancing:CreateTargetGroup",
    "elasticloadbalancing:CreateListener",
    "elasticloadbalancing:AddTags",
    "elasticloadbalancing:RemoveTags",
    "elasticloadbalancing:ModifyLoadBalancerAttributes",
    "elasticloadbalancing:SetSubnets",
    "elasticloadbalancing:SetSecurityGroups",
    "elasticloadbalancing:SetIpAddressType",
    "elasticloadbalancing:ModifyTargetGroup",
    "elasticloadbalancing:ModifyTargetGroupAttributes",
    "elasticloadbalancing:ModifyListener",
    "elasticloadbalancing:RegisterTargets",
    "elasticloadbalancing:DeregisterTargets",
    "elasticloadbalancing:DeleteListener",
    "elasticloadbalancing:DeleteTargetGroup",
    "elasticloadbalancing:DeleteLoadBalancer",
];

/// How many recorded calls are kept.
const CALL_LOG_LIMIT: usize = 10_000;

/// One request the SDK put on the wire (each retry attempt is its own entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedCall {
    /// `ec2` or `elasticloadbalancing`, as IAM spells the service.
    pub service: &'static str,
    /// The operation, e.g. `DescribeLoadBalancers`.
    pub operation: String,
}

impl RecordedCall {
    /// Whether the call may change cloud state.
    pub fn is_mutating(&self) -> bool {
        !self.operation.starts_with("Describe")
    }

    /// `service:Operation`, the IAM action.
    pub fn action(&self) -> String {
        format!("{}:{}", self.service, self.operation)
    }
}

/// The calls made so far, shared by both clients' interceptors.
#[derive(Debug, Clone, Default)]
pub struct CallLog(Arc<Mutex<Vec<RecordedCall>>>);

impl CallLog {
    fn lock(&self) -> MutexGuard<'_, Vec<RecordedCall>> {
        // Pushing one entry cannot leave the log half-written, so a poisoned lock is fine.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every call so far (bounded to the most recent ones).
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.lock().clone()
    }

    /// Forgets the calls made so far.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn push(&self, call: RecordedCall) {
        let mut log = self.lock();
        if log.len() >= CALL_LOG_LIMIT {
            log.remove(0);
        }
        log.push(call);
    }
}

/// Records each attempt from inside the SDK, so the log shows what really went on the wire,
/// retries included, not what the provider meant to send.
#[derive(Debug)]
struct Recorder {
    service: &'static str,
    log: CallLog,
}

impl Intercept for Recorder {
    fn name(&self) -> &'static str {
        "hawser-call-log"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map_or_else(|| "unknown".to_owned(), |m| m.name().to_owned());
        self.log.push(RecordedCall { service: self.service, operation });
        Ok(())
    }
}

/// Both SDK clients with the call log and the rate limiter.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Elastic Load Balancing v2.
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    /// EC2.
    pub ec2: aws_sdk_ec2::Client,
    /// Every call made.
    pub log: CallLog,
    limiter: Arc<RateLimiter>,
}

impl Clients {
    /// Builds the clients: credentials from the default chain unless static ones are given
    /// (the chain includes web identity, so IRSA on EKS works unchanged).
    pub async fn new(config: &AwsConfig) -> Result<Self, ProviderError> {
        // The ring-based rustls client: the SDK's default would compile aws-lc, which the rest
        // of the workspace does not need.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts));
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some(creds) = &config.static_credentials {
            loader = loader.credentials_provider(creds.clone());
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(ProviderError::Fatal(
                "no AWS region: set --aws-region (HAWSER_AWS_REGION) or AWS_REGION".to_owned(),
            ));
        }
        let log = CallLog::default();
        let elb = aws_sdk_elasticloadbalancingv2::config::Builder::from(&sdk)
            .interceptor(Recorder { service: "elasticloadbalancing", log: log.clone() })
            .build();
        let ec2 =
            aws_sdk_ec2::config::Builder::from(&sdk).interceptor(Recorder { service: "ec2", log: log.clone() }).build();
        Ok(Self {
            elb: aws_sdk_elasticloadbalancingv2::Client::from_conf(elb),
            ec2: aws_sdk_ec2::Client::from_conf(ec2),
            log,
            limiter: Arc::new(RateLimiter::new(config.read_rate, config.write_rate)),
        })
    }

    /// Runs one SDK call under the rate limit and turns its error into an [`ApiError`].
    pub async fn call<T, E, F>(&self, operation: &'static str, request: F) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mutating = !operation.starts_with("Describe");
        self.limiter.acquire(mutating).await;
        match request.await {
            Ok(v) => {
                self.limiter.succeeded(mutating);
                Ok(v)
            }
            Err(e) => {
                let err = ApiError::from_sdk(operation, e);
                if err.is_throttling() {
                    let pause = self.limiter.throttled(mutating);
                    tracing::warn!(operation, ?pause, "AWS throttled a call; slowing down");
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn actions_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for a in API_ACTIONS {
            assert!(seen.insert(*a), "{a} twice");
            let (svc, op) = a.split_once(':').unwrap();
            assert!(svc == "ec2" || svc == "elasticloadbalancing", "{a}");
            assert!(op.chars().next().unwrap().is_ascii_uppercase(), "{a}");
        }
    }
}

#[cfg(test)]
mod iam_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::API_ACTIONS;

    /// Every (action, condition keys) pair the policy allows.
    fn statements() -> Vec<(Vec<String>, Vec<String>)> {
        let policy: serde_json::Value = serde_json::from_str(super::super::IAM_POLICY).expect("the IAM policy is JSON");
        assert_eq!(policy["Version"], "2012-10-17");
        policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert_eq!(s["Effect"], "Allow");
                let actions = match &s["Action"] {
                    serde_json::Value::String(a) => vec![a.clone()],
                    v => v.as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect(),
                };
                let keys = s["Condition"]
                    .as_object()
                    .map(|c| c.values().flat_map(|m| m.as_object().unwrap().keys().cloned()).collect())
                    .unwrap_or_default();
                (actions, keys)
            })
            .collect()
    }

    #[test]
    fn every_action_the_code_calls_is_allowed() {
        let statements = statements();
        for action in API_ACTIONS {
            assert!(statements.iter().any(|(a, _)| a.iter().any(|x| x == action)), "{action} missing from the policy");
        }
    }

    #[test]
    fn the_policy_allows_nothing_the_code_does_not_call() {
        for (actions, _) in statements() {
            for a in actions {
                assert!(!a.contains('*'), "{a}: no wildcards");
                assert!(API_ACTIONS.contains(&a.as_str()), "{a} is allowed but never called");
            }
        }
    }

    #[test]
    fn mutating_actions_are_conditioned_on_ownership_tags() {
        for (actions, keys) in statements() {
            let mutating: Vec<_> =
                actions.iter().filter(|a| !a.split(':').nth(1).unwrap().starts_with("Describe")).collect();
            if mutating.is_empty() {
                continue;
            }
            // CreateSecurityGroup also needs the VPC as a resource, which carries no hawser tag.
            if actions == ["ec2:CreateSecurityGroup"] && keys.is_empty() {
                continue;
            }
            assert!(
                keys.iter().any(|k| k.starts_with("aws:RequestTag/") || k.starts_with("aws:ResourceTag/")),
                "{mutating:?} must be conditioned on tags, has {keys:?}"
            );
            for k in &keys {
                if k.starts_with("aws:RequestTag/") || k.starts_with("aws:ResourceTag/") {
                    assert!(k.ends_with("/hawser.dev/cluster") || k.contains("kubernetes.io/cluster/"), "{k}");
                }
            }
        }
    }
}
