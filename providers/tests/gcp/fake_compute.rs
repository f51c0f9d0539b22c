//! A stateful fake of the Compute Engine REST API for the resources the GCP provider uses.
//!
//! No Compute emulator exists, so this follows the documented API: camelCase JSON, full
//! `selfLink`s and normalised reference URLs, long-running operations that finish after a few
//! polls, 404 for absent resources, 409 `alreadyExists`, 400 `resourceInUseByAnotherResource`
//! while another resource refers to the one being deleted, and quota errors reported in the
//! finished operation, as GCE does. IPv6 follows GCE too: addresses come from the subnetwork's
//! IPv6 range (which the subnetwork must have, of the right access type), and an external IPv6
//! forwarding rule takes and answers its address as a `/96` range.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How GCE spells resource URLs.
pub const API: &str = "https://www.googleapis.com/compute/v1/";
/// Polls an operation answers RUNNING before DONE.
const POLLS_BEFORE_DONE: u32 = 2;

#[derive(Default)]
struct Store {
    /// `projects/p/<scope>/<collection>` → name → resource.
    resources: BTreeMap<String, BTreeMap<String, Value>>,
    /// Instance group self-link → member instance URLs.
    members: BTreeMap<String, BTreeSet<String>>,
    /// Operation name → (operation, polls left).
    operations: BTreeMap<String, (Value, u32)>,
    /// Collection name (e.g. `forwardingRules`) → most resources allowed.
    quotas: BTreeMap<String, usize>,
    next_id: u64,
    next_ip: u8,
    next_ip6: u16,
    /// Most items a list answers at once (GCE's default is 500); the rest follow by page token.
    page_size: Option<usize>,
    mutations: Vec<String>,
}

/// The fake server's state, shared with the test.
#[derive(Clone, Default)]
pub struct FakeCompute(Arc<Mutex<Store>>);

fn error(status: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "message": message,
        "errors": [{"domain": "global", "reason": reason, "message": message}]}});
    (status, axum::Json(body)).into_response()
}

/// The collection a resource URL path belongs to, and its name.
fn split(path: &str) -> Option<(String, String)> {
    let (collection, name) = path.rsplit_once('/')?;
    Some((collection.to_owned(), name.to_owned()))
}

fn full(url: &str) -> String {
    match url.find("projects/") {
        Some(i) => format!("{API}{}", &url[i..]),
        None => url.to_owned(),
    }
}

impl FakeCompute {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the server on a free local port; returns its base URL.
    pub async fn start(&self) -> String {
        let app = Router::new().fallback(handle).with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// Every resource of a collection, e.g. `projects/p/regions/r/forwardingRules`.
    pub fn list(&self, collection: &str) -> BTreeMap<String, Value> {
        self.lock().resources.get(collection).cloned().unwrap_or_default()
    }

    /// One resource.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock().resources.get(collection)?.get(name).cloned()
    }

    /// Puts a resource in place as someone else would have created it.
    pub fn seed(&self, collection: &str, name: &str, mut resource: Value) {
        let mut s = self.lock();
        resource["name"] = json!(name);
        resource["selfLink"] = json!(format!("{API}{collection}/{name}"));
        s.resources.entry(collection.to_owned()).or_default().insert(name.to_owned(), resource);
    }

    /// Member instance URLs of an instance group (by collection and name).
    pub fn members(&self, collection: &str, name: &str) -> BTreeSet<String> {
        self.lock().members.get(&format!("{API}{collection}/{name}")).cloned().unwrap_or_default()
    }

    /// Limits how many resources of `collection` (e.g. `forwardingRules`) may exist.
    pub fn set_quota(&self, collection: &str, limit: usize) {
        self.lock().quotas.insert(collection.to_owned(), limit);
    }

    /// Answers lists `n` items a page, so that callers must follow page tokens.
    pub fn set_page_size(&self, n: usize) {
        self.lock().page_size = Some(n.max(1));
    }

    /// Mutating requests received so far (`METHOD path`).
    pub fn mutations(&self) -> Vec<String> {
        self.lock().mutations.clone()
    }

    /// Forgets the mutating requests received so far.
    pub fn clear_mutations(&self) {
        self.lock().mutations.clear();
    }

    /// Every resource whose name starts with `prefix`, as `collection/name`.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let s = self.lock();
        s.resources
            .iter()
            .flat_map(|(c, items)| items.keys().filter(|n| n.starts_with(prefix)).map(move |n| format!("{c}/{n}")))
            .collect()
    }
}

/// One page of `items` after the `pageToken` of `uri`, as a list answer of `kind`.
fn page(s: &Store, uri: &Uri, kind: &str, items: Vec<Value>) -> Response {
    let start: usize = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("pageToken="))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let size = s.page_size.unwrap_or(500);
    let end = (start + size).min(items.len());
    let mut body = json!({"kind": kind, "items": items.get(start..end).unwrap_or_default()});
    if end < items.len() {
        body["nextPageToken"] = json!(end.to_string());
    }
    axum::Json(body).into_response()
}

fn operation(s: &mut Store, scope: &str, kind: &str, target: &str, error: Option<Value>, http: u16) -> Value {
    s.next_id += 1;
    let name = format!("operation-{}", s.next_id);
    let mut op = json!({
        "kind": "compute#operation", "id": s.next_id.to_string(), "name": name, "operationType": kind,
        "targetLink": target, "status": "RUNNING", "progress": 0,
        "selfLink": format!("{API}{scope}/operations/{name}"),
    });
    if scope.contains("/regions/") {
        op["region"] = json!(format!("{API}{}", scope));
    } else if scope.contains("/zones/") {
        op["zone"] = json!(format!("{API}{}", scope));
    }
    if let Some(e) = error {
        op["error"] = e;
        op["httpErrorStatusCode"] = json!(http);
    }
    s.operations.insert(name, (op.clone(), POLLS_BEFORE_DONE));
    op
}

/// The address an `IPAddress` or `address` field names, without a prefix length.
fn bare(ip: &str) -> &str {
    ip.split('/').next().unwrap_or(ip)
}

/// Why an IPv6 address or forwarding rule cannot be made in `subnetwork` (absent, IPv4-only, or
/// of the other IPv6 access type), as GCE answers it.
fn ipv6_subnet_problem(s: &Store, resource: &Value, access: &str) -> Option<String> {
    let Some(url) = resource.get("subnetwork").and_then(Value::as_str) else {
        return Some(
            "Invalid value for field 'resource.subnetwork': ''. An IPv6 resource requires a subnetwork.".into(),
        );
    };
    let rel = &url[url.find("projects/").unwrap_or(0)..];
    let subnet = split(rel).and_then(|(c, n)| s.resources.get(&c)?.get(&n).cloned());
    let Some(subnet) = subnet else {
        return Some(format!("The resource '{rel}' was not found"));
    };
    let stack = subnet.get("stackType").and_then(Value::as_str).unwrap_or("IPV4_ONLY");
    let has = subnet.get("ipv6AccessType").and_then(Value::as_str).unwrap_or("");
    (stack == "IPV4_ONLY" || has != access)
        .then(|| format!("Subnetwork '{rel}' has no {access} IPv6 range (stackType {stack}, ipv6AccessType '{has}')"))
}

/// Reference fields GCE normalises to full URLs.
fn normalise(resource: &mut Value) {
    for key in ["backendService", "network", "subnetwork", "region", "zone"] {
        if let Some(Value::String(u)) = resource.get(key) {
            let u = full(u);
            resource[key] = json!(u);
        }
    }
    if let Some(Value::Array(hcs)) = resource.get_mut("healthChecks") {
        for h in hcs.iter_mut() {
            *h = json!(full(h.as_str().unwrap_or_default()));
        }
    }
    if let Some(Value::Array(backends)) = resource.get_mut("backends") {
        for b in backends.iter_mut() {
            if let Some(Value::String(g)) = b.get("group") {
                let g = full(g);
                b["group"] = json!(g);
            }
        }
    }
}

/// The self-links a resource refers to, and IPs it uses.
fn references(resource: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(Value::String(u)) = resource.get("backendService") {
        out.push(u.clone());
    }
    if let Some(Value::String(ip)) = resource.get("IPAddress") {
        out.push(bare(ip).to_owned());
    }
    for h in resource.get("healthChecks").and_then(Value::as_array).into_iter().flatten() {
        out.extend(h.as_str().map(str::to_owned));
    }
    for b in resource.get("backends").and_then(Value::as_array).into_iter().flatten() {
        out.extend(b.get("group").and_then(Value::as_str).map(str::to_owned));
    }
    out
}

/// The ports a forwarding rule serves, from its list or range (none: every port).
fn rule_ports(rule: &Value) -> Option<Vec<u32>> {
    if let Some(list) = rule.get("ports").and_then(Value::as_array).filter(|l| !l.is_empty()) {
        return Some(list.iter().filter_map(|p| p.as_str()?.parse().ok()).collect());
    }
    let range = rule.get("portRange").and_then(Value::as_str)?;
    let (first, last) = range.split_once('-').unwrap_or((range, range));
    Some((first.parse().ok()?..=last.parse().ok()?).collect())
}

/// Another forwarding rule on the same address and protocol whose ports meet `rule`'s.
fn overlapping_rule(s: &Store, collection: &str, rule: &Value) -> Option<String> {
    let ip = bare(rule.get("IPAddress")?.as_str()?).to_owned();
    let protocol = rule.get("IPProtocol").and_then(Value::as_str);
    let mine = rule_ports(rule);
    s.resources.get(collection)?.iter().find_map(|(name, other)| {
        let same_ip = other.get("IPAddress").and_then(Value::as_str).is_some_and(|o| bare(o) == ip);
        let same_protocol = other.get("IPProtocol").and_then(Value::as_str) == protocol;
        let meet = match (&mine, rule_ports(other)) {
            (Some(a), Some(b)) => a.iter().any(|p| b.contains(p)),
            _ => true,
        };
        (same_ip && same_protocol && meet).then(|| name.clone())
    })
}

fn exists(s: &Store, url: &str) -> bool {
    let rel = &url[url.find("projects/").unwrap_or(0)..];
    split(rel).is_some_and(|(c, n)| s.resources.get(&c).is_some_and(|m| m.contains_key(&n)))
}

async fn handle(State(fake): State<FakeCompute>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().trim_start_matches("/compute/v1/").to_owned();
    let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    let mut s = fake.lock();
    let verb = path.rsplit('/').next().unwrap_or_default().to_owned();
    let is_custom = ["addInstances", "removeInstances", "listInstances"].contains(&verb.as_str());
    if method != Method::GET && verb != "listInstances" {
        s.mutations.push(format!("{method} {path}"));
    }
    // Operations.
    if let Some((_, name)) = path.split_once("/operations/") {
        let Some((op, left)) = s.operations.get_mut(name) else {
            return error(
                StatusCode::NOT_FOUND,
                "notFound",
                &format!("The resource 'operations/{name}' was not found"),
            );
        };
        if *left == 0 {
            op["status"] = json!("DONE");
            op["progress"] = json!(100);
        } else {
            *left -= 1;
        }
        return axum::Json(op.clone()).into_response();
    }
    if is_custom {
        let group_path = path.trim_end_matches(&format!("/{verb}")).to_owned();
        let Some((collection, name)) = split(&group_path) else {
            return error(StatusCode::BAD_REQUEST, "invalid", "bad path");
        };
        if !s.resources.get(&collection).is_some_and(|m| m.contains_key(&name)) {
            return error(StatusCode::NOT_FOUND, "notFound", &format!("The resource '{group_path}' was not found"));
        }
        let link = format!("{API}{group_path}");
        let scope = collection.trim_end_matches("/instanceGroups").to_owned();
        let urls: Vec<String> = body
            .get("instances")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("instance").and_then(Value::as_str).map(full))
            .collect();
        let members = s.members.entry(link.clone()).or_default();
        match verb.as_str() {
            "listInstances" => {
                let items: Vec<Value> = members.iter().map(|m| json!({"instance": m, "status": "RUNNING"})).collect();
                return page(&s, &uri, "compute#instanceGroupsListInstances", items);
            }
            "addInstances" => members.extend(urls),
            _ => {
                for u in &urls {
                    members.remove(u);
                }
            }
        }
        let size = members.len();
        if let Some(g) = s.resources.get_mut(&collection).and_then(|m| m.get_mut(&name)) {
            g["size"] = json!(size);
        }
        let op = operation(&mut s, &scope, &verb, &link, None, 200);
        return axum::Json(op).into_response();
    }

    let is_collection = |p: &str| {
        let last = p.rsplit('/').next().unwrap_or_default();
        [
            "addresses",
            "forwardingRules",
            "backendServices",
            "healthChecks",
            "firewalls",
            "instanceGroups",
            "subnetworks",
        ]
        .contains(&last)
    };
    match method {
        Method::GET if is_collection(&path) => {
            let items: Vec<Value> = s.resources.get(&path).map(|m| m.values().cloned().collect()).unwrap_or_default();
            page(&s, &uri, "compute#list", items)
        }
        Method::GET => match split(&path).and_then(|(c, n)| s.resources.get(&c)?.get(&n).cloned()) {
            Some(r) => axum::Json(r).into_response(),
            None => error(StatusCode::NOT_FOUND, "notFound", &format!("The resource '{path}' was not found")),
        },
        Method::POST if is_collection(&path) => {
            let collection = path.clone();
            let kind = collection.rsplit('/').next().unwrap_or_default().to_owned();
            let scope = collection.rsplit_once('/').map(|(s, _)| s.to_owned()).unwrap_or_default();
            let Some(name) = body.get("name").and_then(Value::as_str).map(str::to_owned) else {
                return error(StatusCode::BAD_REQUEST, "required", "Required field 'resource.name' not specified");
            };
            let link = format!("{API}{collection}/{name}");
            if s.resources.get(&collection).is_some_and(|m| m.contains_key(&name)) {
                return error(
                    StatusCode::CONFLICT,
                    "alreadyExists",
                    &format!("The resource '{collection}/{name}' already exists"),
                );
            }
            let count = s.resources.get(&collection).map_or(0, BTreeMap::len);
            if s.quotas.get(&kind).is_some_and(|limit| count >= *limit) {
                let quota = match kind.as_str() {
                    "forwardingRules" => "FORWARDING_RULES",
                    "addresses" => "STATIC_ADDRESSES",
                    "backendServices" => "REGION_BACKEND_SERVICES",
                    _ => "RESOURCES",
                };
                let msg = format!("Quota '{quota}' exceeded.  Limit: {count}.0 in region europe-west1.");
                let e = json!({"errors": [{"code": "QUOTA_EXCEEDED", "message": msg}]});
                let op = operation(&mut s, &scope, "insert", &link, Some(e), 403);
                return axum::Json(op).into_response();
            }
            let mut resource = body.clone();
            normalise(&mut resource);
            // Referential integrity on create, as GCE checks it.
            for r in references(&resource) {
                if r.contains("projects/") && !r.contains("/instances/") && !exists(&s, &r) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &format!("The resource '{r}' is not ready or does not exist"),
                    );
                }
            }
            s.next_id += 1;
            resource["id"] = json!(s.next_id.to_string());
            resource["selfLink"] = json!(link.clone());
            resource["creationTimestamp"] = json!("2024-01-01T00:00:00.000-00:00");
            resource["kind"] = json!(format!("compute#{}", kind.trim_end_matches('s')));
            let internal = resource.get("addressType").and_then(Value::as_str) == Some("INTERNAL")
                || resource.get("loadBalancingScheme").and_then(Value::as_str) == Some("INTERNAL");
            let ipv6 = resource.get("ipVersion").and_then(Value::as_str) == Some("IPV6");
            if ipv6 && ["addresses", "forwardingRules"].contains(&kind.as_str()) {
                let access = if internal { "INTERNAL" } else { "EXTERNAL" };
                if let Some(problem) = ipv6_subnet_problem(&s, &resource, access) {
                    return error(StatusCode::BAD_REQUEST, "invalid", &problem);
                }
            }
            if kind == "forwardingRules" && ipv6 && !internal {
                let ip = resource.get("IPAddress").and_then(Value::as_str).unwrap_or_default();
                if !ip.is_empty() && !ip.ends_with("/96") {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        "Invalid value for field 'resource.IPAddress': an external IPv6 forwarding rule takes a /96 range",
                    );
                }
            }
            if kind == "forwardingRules"
                && let Some(other) = overlapping_rule(&s, &collection, &resource)
            {
                // Rules may share an address only on distinct protocols or ports.
                let ip = resource.get("IPAddress").and_then(Value::as_str).unwrap_or_default();
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!(
                        "Invalid value for field 'resource.IPAddress': '{ip}'. Specified IP address is in-use and \
                         would result in a conflict with forwarding rule '{other}' on the same protocol and ports."
                    ),
                );
            }
            if kind == "forwardingRules" && ipv6 {
                // GCE answers IPv6 rules' addresses as the /96 they serve.
                let ip = resource.get("IPAddress").and_then(Value::as_str).map(|ip| format!("{}/96", bare(ip)));
                resource["IPAddress"] = json!(ip);
            }
            if kind == "addresses" {
                if resource.get("address").is_none() {
                    let ip = if ipv6 {
                        s.next_ip6 += 1;
                        let prefix = if internal { "fd20:0:0:1" } else { "2600:1900:4000:1" };
                        format!("{prefix}:{:x}::", s.next_ip6)
                    } else {
                        s.next_ip += 1;
                        if internal { format!("10.0.0.{}", s.next_ip) } else { format!("203.0.113.{}", s.next_ip) }
                    };
                    resource["address"] = json!(ip);
                }
                resource["status"] = json!("RESERVED");
                if resource.get("networkTier").is_none() {
                    resource["networkTier"] = json!("PREMIUM");
                }
            }
            if kind == "forwardingRules" && resource.get("networkTier").is_none() {
                resource["networkTier"] = json!("PREMIUM");
            }
            if kind == "instanceGroups" {
                resource["size"] = json!(0);
            }
            if kind == "backendServices" && resource.get("sessionAffinity").is_none() {
                resource["sessionAffinity"] = json!("NONE");
            }
            s.resources.entry(collection).or_default().insert(name, resource);
            let op = operation(&mut s, &scope, "insert", &link, None, 200);
            axum::Json(op).into_response()
        }
        Method::PATCH | Method::PUT => {
            let Some((collection, name)) = split(&path) else {
                return error(StatusCode::BAD_REQUEST, "invalid", "bad path");
            };
            let scope = collection.rsplit_once('/').map(|(s, _)| s.to_owned()).unwrap_or_default();
            let Some(existing) = s.resources.get(&collection).and_then(|m| m.get(&name)).cloned() else {
                return error(StatusCode::NOT_FOUND, "notFound", &format!("The resource '{path}' was not found"));
            };
            let mut updated = if method == Method::PUT { body.clone() } else { existing.clone() };
            if method == Method::PATCH
                && let (Value::Object(target), Value::Object(patch)) = (&mut updated, &body)
            {
                for (k, v) in patch {
                    target.insert(k.clone(), v.clone());
                }
            }
            normalise(&mut updated);
            for key in ["id", "selfLink", "creationTimestamp", "kind", "name"] {
                updated[key] = existing[key].clone();
            }
            let link = format!("{API}{path}");
            s.resources.entry(collection).or_default().insert(name, updated);
            let op = operation(&mut s, &scope, "update", &link, None, 200);
            axum::Json(op).into_response()
        }
        Method::DELETE => {
            let Some((collection, name)) = split(&path) else {
                return error(StatusCode::BAD_REQUEST, "invalid", "bad path");
            };
            let scope = collection.rsplit_once('/').map(|(s, _)| s.to_owned()).unwrap_or_default();
            let Some(existing) = s.resources.get(&collection).and_then(|m| m.get(&name)).cloned() else {
                return error(StatusCode::NOT_FOUND, "notFound", &format!("The resource '{path}' was not found"));
            };
            let link = format!("{API}{path}");
            let ip = existing.get("address").and_then(Value::as_str).map(|ip| bare(ip).to_owned());
            let user = s.resources.values().flat_map(BTreeMap::values).find(|r| {
                let refs = references(r);
                refs.contains(&link) || ip.as_ref().is_some_and(|ip| refs.contains(ip))
            });
            if let Some(user) = user {
                let by = user.get("selfLink").and_then(Value::as_str).unwrap_or_default();
                return error(
                    StatusCode::BAD_REQUEST,
                    "resourceInUseByAnotherResource",
                    &format!("The resource '{link}' is already being used by '{by}'"),
                );
            }
            s.resources.entry(collection).or_default().remove(&name);
            s.members.remove(&link);
            let op = operation(&mut s, &scope, "delete", &link, None, 200);
            axum::Json(op).into_response()
        }
        _ => error(StatusCode::NOT_FOUND, "notFound", &format!("no route for {method} {path}")),
    }
}
