//! The `hawser.dev/*` annotation vocabulary shared by every cloud, parsed strictly.
//!
//! Every problem is collected, so the user sees all of them in one Event rather than one per
//! edit. Provider-specific annotations (`hawser.dev/<cloud>-*`) are handed to the provider;
//! those of other clouds are ignored so one manifest can serve EKS and GKE.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hawser_providers::{InvalidField, PROVIDER_ANNOTATION_PREFIXES, Scheme};
use ipnet::IpNet;

use crate::names::ANNOTATION_PREFIX;

/// `internet-facing` or `internal`.
pub const SCHEME: &str = "hawser.dev/scheme";
/// The load-balancer address(es) to use, at most one per IP family.
pub const ADDRESS: &str = "hawser.dev/address";
/// Client CIDRs allowed in; an alias of `spec.loadBalancerSourceRanges`.
pub const SOURCE_RANGES: &str = "hawser.dev/source-ranges";
/// Seconds between health probes.
pub const HEALTH_CHECK_INTERVAL: &str = "hawser.dev/health-check-interval";
/// Seconds one health probe may take.
pub const HEALTH_CHECK_TIMEOUT: &str = "hawser.dev/health-check-timeout";
/// Successes before a node is healthy.
pub const HEALTH_CHECK_HEALTHY_THRESHOLD: &str = "hawser.dev/health-check-healthy-threshold";
/// Failures before a node is unhealthy.
pub const HEALTH_CHECK_UNHEALTHY_THRESHOLD: &str = "hawser.dev/health-check-unhealthy-threshold";
/// User tags for every cloud resource, `k=v,k2=v2`.
pub const TAGS: &str = "hawser.dev/tags";
/// The load-balancer group whose load balancer the Service shares, in its namespace.
pub const LOAD_BALANCER_GROUP: &str = "hawser.dev/load-balancer-group";

/// The annotations every cloud understands.
pub const COMMON: &[&str] = &[
    SCHEME,
    ADDRESS,
    SOURCE_RANGES,
    HEALTH_CHECK_INTERVAL,
    HEALTH_CHECK_TIMEOUT,
    HEALTH_CHECK_HEALTHY_THRESHOLD,
    HEALTH_CHECK_UNHEALTHY_THRESHOLD,
    TAGS,
    LOAD_BALANCER_GROUP,
];

/// Accepted health-check interval, in seconds (the range every supported cloud accepts).
pub const INTERVAL_RANGE: (u64, u64) = (5, 300);
/// Accepted health-check timeout, in seconds.
pub const TIMEOUT_RANGE: (u64, u64) = (2, 120);
/// Accepted health-check thresholds.
pub const THRESHOLD_RANGE: (u32, u32) = (2, 10);
/// Most user tags accepted: clouds allow 50 per resource and hawser uses 4.
pub const MAX_TAGS: usize = 40;

/// The common annotations of one Service, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommonAnnotations {
    /// `hawser.dev/scheme`.
    pub scheme: Option<Scheme>,
    /// `hawser.dev/address`.
    pub addresses: Vec<IpAddr>,
    /// `hawser.dev/source-ranges`.
    pub source_ranges: Option<Vec<IpNet>>,
    /// `hawser.dev/health-check-interval`.
    pub health_check_interval: Option<Duration>,
    /// `hawser.dev/health-check-timeout`.
    pub health_check_timeout: Option<Duration>,
    /// `hawser.dev/health-check-healthy-threshold`.
    pub healthy_threshold: Option<u32>,
    /// `hawser.dev/health-check-unhealthy-threshold`.
    pub unhealthy_threshold: Option<u32>,
    /// `hawser.dev/tags`.
    pub tags: BTreeMap<String, String>,
    /// `hawser.dev/load-balancer-group`.
    pub group: Option<String>,
    /// This provider's `hawser.dev/<cloud>-*` annotations, unparsed.
    pub provider: BTreeMap<String, String>,
}

/// Parses every `hawser.dev/*` annotation; `provider_name` and `provider_known` say which
/// provider-specific annotations exist for the running provider.
pub fn parse(
    annotations: &BTreeMap<String, String>,
    provider_name: &str,
    provider_known: &[&str],
) -> Result<CommonAnnotations, Vec<InvalidField>> {
    let mut out = CommonAnnotations::default();
    let mut errors = Vec::new();
    let own_prefix = format!("{ANNOTATION_PREFIX}{provider_name}-");
    for (key, value) in annotations {
        if !key.starts_with(ANNOTATION_PREFIX) {
            continue;
        }
        let value = value.trim();
        let result = match key.as_str() {
            SCHEME => parse_scheme(value).map(|s| out.scheme = Some(s)),
            ADDRESS => parse_addresses(value).map(|a| out.addresses = a),
            SOURCE_RANGES => parse_cidrs(value).map(|r| out.source_ranges = Some(r)),
            HEALTH_CHECK_INTERVAL => parse_seconds(value, INTERVAL_RANGE).map(|d| out.health_check_interval = Some(d)),
            HEALTH_CHECK_TIMEOUT => parse_seconds(value, TIMEOUT_RANGE).map(|d| out.health_check_timeout = Some(d)),
            HEALTH_CHECK_HEALTHY_THRESHOLD => parse_threshold(value).map(|t| out.healthy_threshold = Some(t)),
            HEALTH_CHECK_UNHEALTHY_THRESHOLD => parse_threshold(value).map(|t| out.unhealthy_threshold = Some(t)),
            TAGS => parse_tags(value).map(|t| out.tags = t),
            LOAD_BALANCER_GROUP => parse_group(value).map(|g| out.group = Some(g)),
            k if provider_known.contains(&k) => {
                out.provider.insert(key.clone(), value.to_owned());
                Ok(())
            }
            k if k.starts_with(&own_prefix) => Err(unknown(k, provider_known.iter().copied())),
            k if PROVIDER_ANNOTATION_PREFIXES.iter().any(|p| k.starts_with(p)) => Ok(()),
            k => Err(unknown(k, COMMON.iter().chain(provider_known).copied())),
        };
        if let Err(message) = result {
            errors.push(InvalidField::new(key.clone(), message));
        }
    }
    if let (Some(interval), Some(timeout)) = (out.health_check_interval, out.health_check_timeout)
        && timeout > interval
    {
        errors.push(InvalidField::new(
            HEALTH_CHECK_TIMEOUT,
            format!(
                "timeout {}s is longer than the interval {}s ({HEALTH_CHECK_INTERVAL}); use a timeout no longer than the interval",
                timeout.as_secs(),
                interval.as_secs()
            ),
        ));
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

fn unknown<'a>(key: &str, known: impl Iterator<Item = &'a str> + Clone) -> String {
    let closest = known.clone().map(|k| (strsim::levenshtein(key, k), k)).min();
    match closest {
        Some((distance, k)) if distance <= key.len().max(4) / 2 => {
            format!("unknown hawser annotation; did you mean {k}?")
        }
        _ => format!("unknown hawser annotation; known ones are {}", known.collect::<Vec<_>>().join(", ")),
    }
}

fn parse_scheme(value: &str) -> Result<Scheme, String> {
    match value {
        "internet-facing" => Ok(Scheme::InternetFacing),
        "internal" => Ok(Scheme::Internal),
        other => Err(format!("{other:?} is not a scheme; accepted values are \"internet-facing\" and \"internal\"")),
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// One address per family at most: `203.0.113.10` or `203.0.113.10,2001:db8::10`.
pub fn parse_addresses(value: &str) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for item in list(value) {
        let addr: IpAddr = item.parse().map_err(|_| {
            format!("{item:?} is not an IP address; give one IPv4 and/or one IPv6 address, comma-separated")
        })?;
        if out.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
            return Err(format!(
                "more than one {} address given; give at most one per IP family",
                if addr.is_ipv4() { "IPv4" } else { "IPv6" }
            ));
        }
        out.push(addr);
    }
    if out.is_empty() {
        return Err("empty; give one IPv4 and/or one IPv6 address, comma-separated".to_owned());
    }
    Ok(out)
}

/// CIDRs, comma-separated, as `spec.loadBalancerSourceRanges` takes them.
pub fn parse_cidrs(value: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for item in list(value) {
        let net: IpNet = item.parse().map_err(|_| {
            format!("{item:?} is not a CIDR; give ranges like 203.0.113.0/24 or 2001:db8::/32, comma-separated")
        })?;
        out.push(net.trunc());
    }
    if out.is_empty() {
        return Err(
            "empty; give CIDRs like 203.0.113.0/24, comma-separated (omit the annotation to allow everyone)".to_owned()
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whole seconds within `range`: `10`, `10s` or `1m`.
pub fn parse_seconds(value: &str, (min, max): (u64, u64)) -> Result<Duration, String> {
    let accepted = format!("accepted: whole seconds from {min} to {max}, like \"{min}\", \"{min}s\" or \"1m\"");
    let (digits, unit) = match value.strip_suffix('s') {
        Some(d) => (d, 1),
        None => match value.strip_suffix('m') {
            Some(d) => (d, 60),
            None => (value, 1),
        },
    };
    let n: u64 = digits.parse().map_err(|_| format!("{value:?} is not a duration; {accepted}"))?;
    let secs = n.saturating_mul(unit);
    if !(min..=max).contains(&secs) {
        return Err(format!("{value} is out of range; {accepted}"));
    }
    Ok(Duration::from_secs(secs))
}

fn parse_threshold(value: &str) -> Result<u32, String> {
    let (min, max) = THRESHOLD_RANGE;
    match value.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{value:?} is not accepted; give a whole number from {min} to {max}")),
    }
}

/// A group name: a DNS label, as it goes into cloud names and tags.
fn parse_group(value: &str) -> Result<String, String> {
    let label = !value.is_empty()
        && value.len() <= 63
        && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if label {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a group name; use 1-63 lowercase letters, digits and '-', starting and ending with a \
             letter or digit (a DNS label)"
        ))
    }
}

/// `k=v,k2=v2`; keys 1-128 characters, values up to 256; `hawser.dev/` and `aws:` keys are reserved.
pub fn parse_tags(value: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in list(value) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!("{item:?} is not key=value; give tags like \"team=web,env=prod\""));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k.len() > 128 {
            return Err(format!("tag key {k:?} must be 1 to 128 characters"));
        }
        if v.len() > 256 {
            return Err(format!("tag value of {k:?} is longer than 256 characters"));
        }
        if k.starts_with(ANNOTATION_PREFIX) || k.to_ascii_lowercase().starts_with("aws:") {
            return Err(format!(
                "tag key {k:?} is reserved (hawser.dev/ and aws: keys belong to hawser and the cloud)"
            ));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(format!("tag key {k:?} is given twice"));
        }
    }
    if out.len() > MAX_TAGS {
        return Err(format!("{} tags given; at most {MAX_TAGS} are accepted", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(pairs: &[(&str, &str)]) -> Result<CommonAnnotations, Vec<InvalidField>> {
        let map = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        parse(&map, "aws", &["hawser.dev/aws-subnets", "hawser.dev/aws-cross-zone"])
    }

    fn error_of(pairs: &[(&str, &str)]) -> InvalidField {
        let errs = run(pairs).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().unwrap()
    }

    #[test]
    fn valid_values_parse() {
        type Check = dyn Fn(&CommonAnnotations) -> bool;
        let cases: &[(&str, &str, &Check)] = &[
            (SCHEME, "internal", &|a| a.scheme == Some(Scheme::Internal)),
            (SCHEME, " internet-facing ", &|a| a.scheme == Some(Scheme::InternetFacing)),
            (ADDRESS, "203.0.113.5", &|a| a.addresses == vec!["203.0.113.5".parse::<IpAddr>().unwrap()]),
            (ADDRESS, "203.0.113.5, 2001:db8::5", &|a| a.addresses.len() == 2),
            (SOURCE_RANGES, "10.0.0.0/8,192.0.2.1/24", &|a| {
                a.source_ranges == Some(vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.0/24".parse().unwrap()])
            }),
            (HEALTH_CHECK_INTERVAL, "10", &|a| a.health_check_interval == Some(Duration::from_secs(10))),
            (HEALTH_CHECK_INTERVAL, "30s", &|a| a.health_check_interval == Some(Duration::from_secs(30))),
            (HEALTH_CHECK_INTERVAL, "2m", &|a| a.health_check_interval == Some(Duration::from_secs(120))),
            (HEALTH_CHECK_TIMEOUT, "2s", &|a| a.health_check_timeout == Some(Duration::from_secs(2))),
            (HEALTH_CHECK_HEALTHY_THRESHOLD, "2", &|a| a.healthy_threshold == Some(2)),
            (HEALTH_CHECK_UNHEALTHY_THRESHOLD, "10", &|a| a.unhealthy_threshold == Some(10)),
            (TAGS, "team=web, env=prod,empty=", &|a| {
                a.tags.len() == 3 && a.tags["team"] == "web" && a.tags["env"] == "prod" && a.tags["empty"].is_empty()
            }),
            ("hawser.dev/aws-subnets", "subnet-1", &|a| a.provider["hawser.dev/aws-subnets"] == "subnet-1"),
            ("hawser.dev/gcp-network-tier", "Standard", &|a| a.provider.is_empty()),
            ("service.beta.kubernetes.io/aws-load-balancer-type", "nlb", &|a| *a == CommonAnnotations::default()),
        ];
        for (key, value, check) in cases {
            let parsed = run(&[(key, value)]).unwrap_or_else(|e| panic!("{key}={value}: {e:?}"));
            assert!(check(&parsed), "{key}={value} parsed as {parsed:?}");
        }
    }

    #[test]
    fn invalid_values_name_the_annotation_and_what_is_accepted() {
        let cases: &[(&str, &str, &str)] = &[
            (SCHEME, "public", "\"internet-facing\" and \"internal\""),
            (ADDRESS, "not-an-ip", "is not an IP address"),
            (ADDRESS, "203.0.113.1,203.0.113.2", "at most one per IP family"),
            (ADDRESS, "", "empty"),
            (SOURCE_RANGES, "10.0.0.0/33", "is not a CIDR"),
            (SOURCE_RANGES, "10.0.0.1", "is not a CIDR"),
            (SOURCE_RANGES, " , ", "empty"),
            (HEALTH_CHECK_INTERVAL, "1s", "from 5 to 300"),
            (HEALTH_CHECK_INTERVAL, "10h", "is not a duration"),
            (HEALTH_CHECK_INTERVAL, "6m", "out of range"),
            (HEALTH_CHECK_TIMEOUT, "1", "from 2 to 120"),
            (HEALTH_CHECK_HEALTHY_THRESHOLD, "1", "from 2 to 10"),
            (HEALTH_CHECK_UNHEALTHY_THRESHOLD, "eleven", "from 2 to 10"),
            (TAGS, "novalue", "key=value"),
            (TAGS, "a=1,a=2", "given twice"),
            (TAGS, "hawser.dev/cluster=x", "reserved"),
            (TAGS, "aws:createdBy=x", "reserved"),
            (TAGS, "=v", "1 to 128"),
            ("hawser.dev/schem", "internal", "did you mean hawser.dev/scheme?"),
            ("hawser.dev/aws-subnet", "x", "did you mean hawser.dev/aws-subnets?"),
            ("hawser.dev/completely-unrelated-thing", "x", "known ones are hawser.dev/scheme"),
        ];
        for (key, value, expect) in cases {
            let err = error_of(&[(key, value)]);
            assert_eq!(err.field, *key);
            assert!(err.message.contains(expect), "{key}={value}: {:?} lacks {expect:?}", err.message);
        }
    }

    #[test]
    fn too_many_tags_are_refused() {
        let tags: Vec<String> = (0..=MAX_TAGS).map(|i| format!("k{i}=v")).collect();
        assert!(error_of(&[(TAGS, &tags.join(","))]).message.contains("at most 40"));
    }

    #[test]
    fn timeout_longer_than_interval_is_refused() {
        let err = error_of(&[(HEALTH_CHECK_INTERVAL, "5"), (HEALTH_CHECK_TIMEOUT, "10")]);
        assert_eq!(err.field, HEALTH_CHECK_TIMEOUT);
        assert!(err.message.contains("longer than the interval"));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = run(&[(SCHEME, "x"), (TAGS, "y"), ("hawser.dev/nope", "z")]).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["hawser.dev/nope", SCHEME, TAGS]);
    }
}
