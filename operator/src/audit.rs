//! `hawser-operator audit`: every cloud load balancer this cluster owns next to every Service of
//! our class, with a verdict per row. Read-only: one list of Services and Nodes, one cloud
//! inventory, a read-only plan of each Service the inventory cannot vouch for, nothing written
//! anywhere.

use std::collections::HashMap;

use hawser_providers::{OwnedLoadBalancer, Provider, ProviderError, Targets};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use serde::Serialize;

use crate::desired::{self, DesiredConfig};
use crate::gc::{Orphaned, find_orphans, owners};
use crate::reconcile::is_ours;

/// What audit found for one Service or load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The load balancer exists and matches what the Service asks for.
    Ok,
    /// A load balancer whose Service is gone, or no longer of our class.
    Orphan,
    /// A Service of ours without a load balancer.
    Missing,
    /// The load balancer differs from what the Service asks for.
    Drifted,
    /// The Service's configuration is invalid: hawser builds nothing for it.
    Invalid,
    /// A cloud resource has the name hawser would give this Service's but not hawser's
    /// ownership tags: hawser cannot build the load balancer and never touches that resource.
    ForeignNameConflict,
}

impl Verdict {
    /// Whether this row needs attention.
    pub fn is_problem(self) -> bool {
        self != Self::Ok
    }
}

/// One row of the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// `namespace/name` of the Service (for an orphan: of the Service that owned it).
    pub service: String,
    /// The Service's UID (for an orphan: the owner's UID from the ownership tags).
    pub uid: String,
    /// The cloud's identifier of the load balancer, when there is one.
    pub load_balancer: Option<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, in words.
    pub detail: String,
}

/// Compares the Services with the cloud inventory; the caller lists both. A Service whose load
/// balancer the inventory cannot vouch for (no fingerprint, or a different one) is planned,
/// read-only, to say which fields differ or what is in the way.
pub async fn audit(
    services: &[Service],
    targets: &Targets,
    inventory: &[OwnedLoadBalancer],
    provider: &dyn Provider,
    cfg: &DesiredConfig,
    class: &str,
) -> Result<Vec<Row>, ProviderError> {
    let by_uid: HashMap<&str, &OwnedLoadBalancer> =
        inventory.iter().filter(|lb| !lb.detached).map(|lb| (lb.identity.uid.as_str(), lb)).collect();
    let mut rows = Vec::new();
    for svc in services.iter().filter(|s| is_ours(s, class)) {
        let service = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let uid = svc.uid().unwrap_or_default();
        let lb = by_uid.get(uid.as_str());
        let load_balancer = lb.map(|l| l.id.clone());
        let spec = desired::build(svc, targets.clone(), cfg).and_then(|spec| provider.validate(&spec).map(|()| spec));
        let (verdict, detail) = match (spec, lb) {
            (Err(fields), _) => {
                (Verdict::Invalid, fields.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            }
            (Ok(spec), lb) => {
                let vouched =
                    lb.is_some_and(|lb| lb.fingerprint.is_some() && lb.fingerprint == provider.fingerprint(&spec));
                if vouched {
                    (Verdict::Ok, String::new())
                } else {
                    let plan = match provider.plan(&spec).await {
                        Ok(plan) => plan,
                        Err(ProviderError::InvalidInput(fields)) => {
                            let detail = fields.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                            rows.push(Row { service, uid, load_balancer, verdict: Verdict::Invalid, detail });
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if !plan.conflicts.is_empty() {
                        let detail = plan
                            .conflicts
                            .iter()
                            .map(|c| format!("{} {}: {}", c.kind, c.name, c.message))
                            .collect::<Vec<_>>()
                            .join("; ");
                        (Verdict::ForeignNameConflict, detail)
                    } else if lb.is_none() {
                        (Verdict::Missing, "no load balancer in the cloud".to_owned())
                    } else if plan.changes.is_empty() {
                        (Verdict::Ok, String::new())
                    } else {
                        (Verdict::Drifted, plan.changed_fields().join("; "))
                    }
                }
            }
        };
        rows.push(Row { service, uid, load_balancer, verdict, detail });
    }
    let owners = owners(services.iter(), class);
    for (lb, why) in find_orphans(inventory, &owners) {
        let detail = match why {
            Orphaned::ServiceGone => "no Service with the owner's UID exists",
            Orphaned::NotOurs => "the Service is no longer a LoadBalancer of this class and has no hawser finalizer",
            Orphaned::Leftover => "on no load balancer: left by an interrupted change",
        };
        rows.push(Row {
            service: lb.identity.service_key(),
            uid: lb.identity.uid.clone(),
            load_balancer: Some(lb.id.clone()),
            verdict: Verdict::Orphan,
            detail: detail.to_owned(),
        });
    }
    rows.sort_by(|a, b| (&a.service, &a.uid).cmp(&(&b.service, &b.uid)));
    Ok(rows)
}

/// The rows as an aligned table.
pub fn table(rows: &[Row]) -> String {
    let header = ["SERVICE", "UID", "LOAD BALANCER", "VERDICT", "DETAIL"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let verdict = serde_json::to_value(r.verdict).ok().and_then(|v| v.as_str().map(str::to_owned));
            [
                r.service.clone(),
                r.uid.clone(),
                r.load_balancer.clone().unwrap_or_else(|| "-".to_owned()),
                verdict.unwrap_or_default(),
                r.detail.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: [&str; 5]| {
        let mut out = String::new();
        for (i, (c, w)) in cols.iter().zip(widths).enumerate() {
            if i == cols.len() - 1 {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}   "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header);
    for row in &cells {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use hawser_providers::mock::{MockCloud, MockConfig};
    use serde_json::json;

    use super::*;

    fn svc(name: &str, uid: &str, extra: serde_json::Value) -> Service {
        let mut v = json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "ports": [{"port": 80}]}
        });
        crate::testutil::merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn cfg(cloud: &MockCloud) -> DesiredConfig {
        DesiredConfig { capabilities: cloud.capabilities(), ..crate::testutil::mock_desired_config() }
    }

    #[tokio::test]
    async fn every_row_gets_the_verdict_a_user_would_give_it() {
        let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
        let targets = crate::testutil::one_target();
        let cfg = cfg(&cloud);
        let ok = svc("ok", "u-ok", json!({}));
        let drifted = svc("drifted", "u-drifted", json!({}));
        let missing = svc("missing", "u-missing", json!({}));
        let invalid =
            svc("invalid", "u-invalid", json!({"metadata": {"annotations": {"hawser.dev/scheme": "public"}}}));
        let other = svc("other", "u-other", json!({"spec": {"loadBalancerClass": "x.io/lb"}}));
        for s in [&ok, &drifted] {
            let spec = desired::build(s, targets.clone(), &cfg).unwrap();
            cloud.ensure(&spec).await.unwrap();
        }
        // drifted's ports changed after its load balancer was made; gone's Service is gone.
        let drifted = svc("drifted", "u-drifted", json!({"spec": {"ports": [{"port": 8443}]}}));
        let gone = svc("gone", "u-gone", json!({}));
        cloud.ensure(&desired::build(&gone, targets.clone(), &cfg).unwrap()).await.unwrap();
        let inventory = cloud.list_owned().await.unwrap();

        // taken's name is held by a load balancer someone else made.
        let taken = svc("taken", "u-taken", json!({}));
        let spec = desired::build(&taken, targets.clone(), &cfg).unwrap();
        let name = MockCloud::name_for(&spec.identity);
        cloud.insert_foreign(&name, "203.0.113.250".parse().unwrap(), Default::default());

        let services = [ok, drifted, missing, invalid, other, taken];
        let rows = audit(&services, &targets, &inventory, &cloud, &cfg, "hawser.dev/lb").await.unwrap();
        let verdicts: Vec<(&str, Verdict)> = rows.iter().map(|r| (r.service.as_str(), r.verdict)).collect();
        assert_eq!(
            verdicts,
            vec![
                ("shop/drifted", Verdict::Drifted),
                ("shop/gone", Verdict::Orphan),
                ("shop/invalid", Verdict::Invalid),
                ("shop/missing", Verdict::Missing),
                ("shop/ok", Verdict::Ok),
                ("shop/taken", Verdict::ForeignNameConflict),
            ],
            "another class's Service is not ours to audit"
        );
        let invalid_row = rows.iter().find(|r| r.verdict == Verdict::Invalid).unwrap();
        assert!(invalid_row.detail.contains("hawser.dev/scheme"), "{}", invalid_row.detail);
        let drifted_row = rows.iter().find(|r| r.verdict == Verdict::Drifted).unwrap();
        assert!(drifted_row.detail.contains(": listeners"), "names the field: {}", drifted_row.detail);
        let taken_row = rows.iter().find(|r| r.verdict == Verdict::ForeignNameConflict).unwrap();
        assert!(taken_row.detail.contains(&name) && taken_row.detail.contains("not owned"), "{}", taken_row.detail);
        let writes = cloud.calls().iter().filter(|c| c.is_mutating()).count();
        assert_eq!(writes, 3, "the audit wrote nothing (the 3 ensures are the test's own)");
        let text = table(&rows);
        assert!(text.starts_with("SERVICE"), "{text}");
        assert!(text.lines().any(|l| l.contains("shop/gone") && l.contains("orphan")), "{text}");
    }
}
