//! The random changes of the kill campaigns, and what they check on a Service.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};

/// The annotation that puts a Service in a load-balancer group.
pub const GROUP_ANNOTATION: &str = "hawser.dev/load-balancer-group";

/// A LoadBalancer Service of our class serving `ports`.
pub fn service(name: &str, ports: &[i32]) -> Service {
    let ports: Vec<Value> =
        ports.iter().map(|p| json!({"name": format!("p{p}"), "port": p, "targetPort": 8080})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb", "selector": {"app": name}, "ports": ports}
    }))
    .unwrap()
}

/// Whether hawser serves the Service.
pub fn is_ours(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| {
        s.type_.as_deref() == Some("LoadBalancer") && s.load_balancer_class.as_deref() == Some("hawser.dev/lb")
    })
}

/// One random change to Service `name`; ignores the API's refusals (a name being deleted, …).
pub async fn change(services: &Api<Service>, name: &str, rng: &mut SmallRng) {
    let existing = services.get_opt(name).await.unwrap();
    let Some(svc) = existing else {
        let _ = services.create(&PostParams::default(), &service(name, &[80])).await;
        return;
    };
    let merge = |v: Value| Patch::Merge(v);
    let _ = match rng.random_range(0..6) {
        0 => services.delete(name, &DeleteParams::default()).await.map(|_| ()),
        1 if is_ours(&svc) => services
            .patch(
                name,
                &PatchParams::default(),
                &merge(json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}})),
            )
            .await
            .map(|_| ()),
        1 => services
            .patch(
                name,
                &PatchParams::default(),
                &merge(json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "hawser.dev/lb"}})),
            )
            .await
            .map(|_| ()),
        2 => {
            let port = rng.random_range(81..90);
            let ports = json!([{"name": "p80", "port": 80, "targetPort": 8080}, {"name": format!("p{port}"), "port": port, "targetPort": 8080}]);
            services.patch(name, &PatchParams::default(), &merge(json!({"spec": {"ports": ports}}))).await.map(|_| ())
        }
        // A deletion "looks stuck": strip every finalizer, then delete.
        3 => {
            let _ =
                services.patch(name, &PatchParams::default(), &merge(json!({"metadata": {"finalizers": null}}))).await;
            services.delete(name, &DeleteParams::default()).await.map(|_| ())
        }
        // Join the group, or leave it.
        4 => {
            let group = if svc.annotations().contains_key(GROUP_ANNOTATION) { Value::Null } else { json!("edge") };
            let patch = json!({"metadata": {"annotations": {GROUP_ANNOTATION: group}}});
            services.patch(name, &PatchParams::default(), &merge(patch)).await.map(|_| ())
        }
        _ => services.delete(name, &DeleteParams::default()).await.map(|_| ()),
    };
}

/// The ports a Service serves.
pub fn ports(svc: &Service) -> BTreeSet<i64> {
    svc.spec.as_ref().and_then(|s| s.ports.as_ref()).into_iter().flatten().map(|p| i64::from(p.port)).collect()
}

/// hawser's condition on the Service: status, reason, message.
pub fn condition(svc: &Service) -> Option<(String, String, String)> {
    let conditions = svc.status.as_ref()?.conditions.as_ref()?;
    let c = conditions.iter().find(|c| c.type_ == "hawser.dev/LoadBalancerReady")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}
