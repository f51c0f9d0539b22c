//! Settings of the AWS provider (the operator's `--aws-*` flags).

use std::time::Duration;

use aws_credential_types::Credentials;

/// How the AWS provider connects and how hard it may push the APIs.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// The cluster name: scopes ownership tags and matches `kubernetes.io/cluster/<name>` tags on
    /// subnets and node security groups, so it should be the EKS cluster's name.
    pub cluster: String,
    /// The region; from the default chain (env, profile, IMDS) when `None`.
    pub region: Option<String>,
    /// The VPC; discovered from the nodes' instances when `None`.
    pub vpc_id: Option<String>,
    /// An endpoint for every API (moto in tests, a VPC endpoint proxy in odd setups).
    pub endpoint_url: Option<String>,
    /// Fixed credentials instead of the default chain (tests against moto).
    pub static_credentials: Option<Credentials>,
    /// Attempts per call, including the first, for the SDK's own retries.
    pub max_attempts: u32,
    /// Read calls (`Describe*`) per second this provider makes at most.
    pub read_rate: f64,
    /// Mutating calls per second this provider makes at most.
    pub write_rate: f64,
    /// How long discovered subnets and node security groups are reused before being read again.
    pub discovery_ttl: Duration,
    /// How long resource tags read with `DescribeTags` are reused.
    pub tag_cache_ttl: Duration,
    /// Most time spent retrying a deletion that waits for AWS to release a dependency.
    pub delete_retry_budget: Duration,
}

impl AwsConfig {
    /// Defaults suitable for EKS: credentials and region from the default chain (IRSA works
    /// unchanged), 3 attempts per call, 10 reads and 5 writes a second (well below ELB's and
    /// EC2's account-wide limits, which the LBC and other tools share).
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            region: None,
            vpc_id: None,
            endpoint_url: None,
            static_credentials: None,
            max_attempts: 3,
            read_rate: 10.0,
            write_rate: 5.0,
            discovery_ttl: Duration::from_secs(300),
            tag_cache_ttl: Duration::from_secs(600),
            delete_retry_budget: Duration::from_secs(60),
        }
    }

    /// Checks the values that no AWS call can correct.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() {
            return Err("the AWS provider needs a cluster name".into());
        }
        if self.max_attempts == 0 {
            return Err("AWS max attempts must be at least 1".into());
        }
        for (name, rate) in [("read", self.read_rate), ("write", self.write_rate)] {
            if rate.is_nan() || rate <= 0.0 {
                return Err(format!("AWS {name} rate limit must be a positive number of calls per second"));
            }
        }
        Ok(())
    }
}
