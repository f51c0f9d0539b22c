#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use hawser_providers::mock::{MockCloud, MockConfig};
use hawser_providers::{Action as ChangeAction, Provider};
use serde_json::json;

use super::*;

const CLASS: &str = "hawser.dev/lb";

fn svc(extra: serde_json::Value) -> Service {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "u-web"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": CLASS, "ports": [{"port": 80, "protocol": "TCP"}]}
    });
    crate::testutil::merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

/// A planner with no other Services.
fn planner<'a>(targets: &'a Targets, provider: &'a dyn Provider, cfg: &'a DesiredConfig) -> Planner<'a> {
    Planner { targets, provider, cfg, class: CLASS, others: &[] }
}

fn cfg(cloud: &MockCloud) -> DesiredConfig {
    DesiredConfig { capabilities: cloud.capabilities(), ..crate::testutil::mock_desired_config() }
}

fn mutating_calls(cloud: &MockCloud) -> Vec<String> {
    cloud.calls().into_iter().filter(|c| c.is_mutating()).map(|c| c.operation.to_owned()).collect()
}

/// A cloud holding the load balancer of `live`, as an earlier ensure left it.
async fn ensured(live: &Service) -> MockCloud {
    let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
    let spec = desired::build(live, crate::testutil::one_target(), &cfg(&cloud)).unwrap();
    cloud.ensure(&spec).await.unwrap();
    cloud
}

#[tokio::test]
async fn a_changed_port_is_planned_field_by_field_and_nothing_changes() {
    let live = svc(json!({}));
    let cloud = ensured(&live).await;
    let before = cloud.load_balancers();
    let writes = mutating_calls(&cloud).len();
    let manifest = svc(json!({"metadata": {"uid": null}, "spec": {"ports": [{"port": 8443, "protocol": "TCP"}]}}));

    let plan = planner(&crate::testutil::one_target(), &cloud, &cfg(&cloud))
        .plan(Some(&manifest), Some(&live), false)
        .await
        .unwrap();

    assert_eq!(plan.intent, Intent::Ensure);
    assert_eq!(plan.uid.as_deref(), Some("u-web"), "the manifest is planned as the live Service, same UID");
    assert_eq!(plan.changes.len(), 1, "{}", plan.text());
    let change = &plan.changes[0];
    assert_eq!((change.action, change.kind.as_str()), (ChangeAction::Update, "load balancer"));
    let field = change.fields.iter().find(|f| f.field == "listeners").unwrap();
    assert_eq!((field.old.as_deref(), field.new.as_deref()), (Some("80/TCP"), Some("8443/TCP")));
    assert!(!plan.replaces);
    assert!(plan.text().contains("listeners: 80/TCP → 8443/TCP"), "{}", plan.text());
    assert_eq!(cloud.load_balancers(), before, "planning changed the cloud");
    assert_eq!(mutating_calls(&cloud).len(), writes, "planning made a write call");

    let same =
        planner(&crate::testutil::one_target(), &cloud, &cfg(&cloud)).plan(None, Some(&live), false).await.unwrap();
    assert!(!same.has_changes(), "an unchanged Service plans nothing: {}", same.text());
    assert_eq!(same.summary, "no changes");
}

#[tokio::test]
async fn a_new_service_plans_a_load_balancer_to_create() {
    let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
    let manifest = svc(json!({"metadata": {"uid": null}}));
    let plan =
        planner(&crate::testutil::one_target(), &cloud, &cfg(&cloud)).plan(Some(&manifest), None, false).await.unwrap();
    assert_eq!(plan.intent, Intent::Ensure);
    assert_eq!(plan.uid, None);
    assert_eq!(plan.changes.len(), 1);
    let create = &plan.changes[0];
    assert_eq!(create.action, ChangeAction::Create);
    let listeners = create.fields.iter().find(|f| f.field == "listeners").unwrap();
    assert_eq!(listeners.new.as_deref(), Some("80/TCP"));
    let targets = create.fields.iter().find(|f| f.field == "targets").unwrap();
    assert_eq!(targets.new.as_deref(), Some("1 nodes (+node-a)"));
    assert!(plan.notes.iter().any(|n| n.contains("placeholder UID")), "{:?}", plan.notes);
    assert!(plan.notes.iter().any(|n| n.contains("allocates the node port of 1 port")), "{:?}", plan.notes);
    assert!(cloud.load_balancers().is_empty());
}

#[tokio::test]
async fn leaving_the_class_or_deleting_plans_the_deletion() {
    let live = svc(json!({"metadata": {"finalizers": ["hawser.dev/cleanup"]}}));
    let cloud = ensured(&live).await;
    let id = cloud.load_balancers()[0].id.clone();
    let targets = crate::testutil::one_target();

    let cluster_ip = svc(json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}}));
    let plan = planner(&targets, &cloud, &cfg(&cloud)).plan(Some(&cluster_ip), Some(&live), false).await.unwrap();
    assert_eq!(plan.intent, Intent::Delete);
    assert_eq!(plan.changes.len(), 1);
    assert_eq!((plan.changes[0].action, plan.changes[0].name.as_str()), (ChangeAction::Delete, id.as_str()));
    assert!(plan.notes[0].contains("stops being a LoadBalancer"), "{:?}", plan.notes);

    let deleted = planner(&targets, &cloud, &cfg(&cloud)).plan(None, Some(&live), true).await.unwrap();
    assert_eq!(deleted.intent, Intent::Delete);
    assert_eq!(deleted.changes[0].action, ChangeAction::Delete);
    assert_eq!(cloud.load_balancers().len(), 1, "nothing was deleted");

    let other = svc(json!({"spec": {"loadBalancerClass": "other.io/lb"}, "metadata": {"uid": "u-other", "name": "x"}}));
    let plan = planner(&targets, &cloud, &cfg(&cloud)).plan(None, Some(&other), false).await.unwrap();
    assert_eq!(plan.intent, Intent::Ignore);
    assert!(!plan.has_changes());
}

#[tokio::test]
async fn invalid_annotations_give_the_messages_of_the_warning_event() {
    let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
    let bad = svc(json!({"metadata": {"annotations": {"hawser.dev/scheme": "public"}}}));
    let targets = crate::testutil::one_target();
    let plan = planner(&targets, &cloud, &cfg(&cloud)).plan(None, Some(&bad), false).await.unwrap();
    assert_eq!(plan.intent, Intent::Invalid);
    assert!(plan.is_blocked());
    let expected = desired::build(&bad, targets, &cfg(&cloud)).unwrap_err();
    assert_eq!(plan.problems, expected, "the same fields and messages as the reconciler reports");
    assert!(plan.text().contains("invalid: hawser.dev/scheme:"), "{}", plan.text());
    assert!(cloud.calls().is_empty(), "an invalid Service costs no cloud call");
}

#[tokio::test]
async fn a_foreign_load_balancer_with_our_name_blocks_the_plan() {
    let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
    let live = svc(json!({}));
    let spec = desired::build(&live, crate::testutil::one_target(), &cfg(&cloud)).unwrap();
    let name = MockCloud::name_for(&spec.identity);
    cloud.insert_foreign(&name, "198.51.100.7".parse().unwrap(), BTreeMap::new());
    let plan =
        planner(&crate::testutil::one_target(), &cloud, &cfg(&cloud)).plan(None, Some(&live), false).await.unwrap();
    assert_eq!(plan.conflicts.len(), 1, "{}", plan.text());
    assert_eq!(plan.conflicts[0].name, name);
    assert!(plan.is_blocked());
    assert!(plan.text().contains("x blocked  load balancer"), "{}", plan.text());
}

#[test]
fn manifests_yield_their_services_and_name_what_they_skip() {
    let text = r"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {type: LoadBalancer, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: api, namespace: shop}
  spec: {type: LoadBalancer, ports: [{port: 443}]}
";
    let (services, skipped) = services_in(text).unwrap();
    let names: Vec<String> = services.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["web", "api"]);
    assert_eq!(skipped, ["ConfigMap settings"]);
    let err = services_in("kind: Service\nmetadata: {name: x}\nspec: {ports: 80}\n").unwrap_err();
    assert!(format!("{err:#}").contains("Service x"), "{err:#}");
    assert!(services_in("kind: [unclosed").is_err());
}

#[test]
fn a_plan_book_reports_only_changed_plans() {
    let book = PlanBook::default();
    let plan = ServicePlan::new("shop/web".into(), None, Intent::Ensure, ChangePlan::default(), Vec::new());
    assert!(book.record("shop/web".into(), 1, plan.clone()));
    assert!(!book.record("shop/web".into(), 2, plan.clone()), "the same plan again is not news");
    assert_eq!(book.digest("shop/web"), Some(2));
    assert_eq!(book.totals(), (0, 0));
    book.forget("shop/web");
    assert!(book.snapshot().is_empty());
}

#[tokio::test]
async fn node_ports_a_cloud_needs_get_placeholders_that_avoid_the_kept_ones() {
    let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
    let mut cfg = cfg(&cloud);
    cfg.capabilities.needs_node_ports = true;
    let live = svc(json!({"spec": {"ports": [{"port": 80, "protocol": "TCP", "nodePort": 30000}]}}));
    // The manifest leaves the protocol out, as most do; the API server defaulted it to TCP.
    let manifest = svc(json!({"spec": {"ports": [{"port": 80, "protocol": null}, {"port": 443, "protocol": null}]}}));
    let plan =
        planner(&crate::testutil::one_target(), &cloud, &cfg).plan(Some(&manifest), Some(&live), false).await.unwrap();
    assert_eq!(plan.intent, Intent::Ensure, "{}", plan.text());
    let listeners = plan.changes[0].fields.iter().find(|f| f.field == "listeners").unwrap();
    assert_eq!(listeners.new.as_deref(), Some("80/TCP (node port 30000), 443/TCP (node port 30001)"));
    assert!(plan.notes.iter().any(|n| n.contains("placeholders from 30000")), "{:?}", plan.notes);
}

#[tokio::test]
async fn a_member_that_would_be_refused_from_its_group_is_planned_as_refused() {
    let cloud = MockCloud::new(MockConfig::new("demo")).unwrap();
    let group = json!({"metadata": {"annotations": {"hawser.dev/load-balancer-group": "edge"}}});
    let mut first = svc(group.clone());
    first.metadata.name = Some("first".into());
    first.metadata.uid = Some("u-first".into());
    first.metadata.creation_timestamp = serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
    let second = svc(group);
    let targets = crate::testutil::one_target();
    let cfg = cfg(&cloud);
    let others = [first];
    let with_first = Planner { targets: &targets, provider: &cloud, cfg: &cfg, class: CLASS, others: &others };
    let plan = with_first.plan(None, Some(&second), false).await.unwrap();
    assert_eq!(plan.intent, Intent::Invalid, "{}", plan.text());
    assert!(
        plan.summary.contains("refused from load-balancer group edge (clashes with shop/first)"),
        "{}",
        plan.summary
    );
    assert!(
        plan.text().contains("invalid: spec.ports: port 80/TCP is already served by shop/first"),
        "{}",
        plan.text()
    );
    assert!(cloud.calls().is_empty(), "refused before any cloud call");

    let alone = planner(&targets, &cloud, &cfg).plan(None, Some(&second), false).await.unwrap();
    assert_eq!(alone.intent, Intent::Ensure, "alone in its group, it would be admitted");
}
