//! The object store: objects as JSON, one global monotonic resourceVersion, optimistic
//! concurrency, finalizers, and the change history that watches read from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::error::{ApiError, ApiResult};
use crate::meta;
use crate::resources::{NAMESPACES, RESOURCES, ResourceDef};
use crate::selectors::Selector;
use crate::service_alloc::ServiceAllocator;
use crate::strategy;

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// The main resource: everything but `status` (for resources with a status subresource).
    Main,
    /// `/status`: only `status`.
    Status,
}

/// Kind of a change, as watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

/// One committed change, kept for watches.
#[derive(Debug, Clone)]
pub struct Change {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Index into [`RESOURCES`].
    pub resource: usize,
    /// Namespace of the object ("" when cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub kind: ChangeType,
    /// The object after the change (for deletions: as it was, with the deletion's resourceVersion).
    pub object: Value,
    /// The object before the change, for modifications (selector transitions need it).
    pub old: Option<Value>,
}

/// Preconditions of a DELETE (`DeleteOptions.preconditions`).
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// Required uid.
    pub uid: Option<String>,
    /// Required resourceVersion.
    pub resource_version: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// Matching objects on this page.
    pub items: Vec<Value>,
    /// resourceVersion the list was served at.
    pub resource_version: u64,
    /// Token for the next page, if any.
    pub continue_token: Option<String>,
    /// How many matching objects follow this page.
    pub remaining: Option<u64>,
}

/// The resourceVersion a watch asked for is older than the kept history.
#[derive(Debug, Clone, Copy)]
pub struct Expired;

type Key = (usize, String, String);

struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
    /// Every change with a resourceVersion above this one is in `history`.
    floor: u64,
    history_limit: usize,
    alloc: ServiceAllocator,
}

/// Thread-safe store shared by all requests.
pub struct Store {
    state: Mutex<State>,
    head: watch::Sender<u64>,
}

fn def(resource: usize) -> &'static ResourceDef {
    &RESOURCES[resource]
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    meta::metadata_mut(obj).insert(field.to_string(), value);
}

impl State {
    fn lookup(&self, resource: usize, ns: &str, name: &str) -> ApiResult<&Value> {
        let d = def(resource);
        self.objects
            .get(&(resource, ns.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(d.group, d.plural, name))
    }

    fn record(&mut self, resource: usize, kind: ChangeType, object: Value, old: Option<Value>) {
        let namespace = meta::namespace(&object).to_string();
        self.history.push_back(Arc::new(Change { rv: self.rv, resource, namespace, kind, object, old }));
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.floor = c.rv;
            }
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn check_namespace_accepts(&self, ns: &str) -> ApiResult<()> {
        match self.objects.get(&(NAMESPACES, String::new(), ns.to_string())) {
            None => Err(ApiError::not_found("", "namespaces", ns)),
            Some(n) if meta::is_deleting(n) => Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ))),
            Some(_) => Ok(()),
        }
    }

    fn create(&mut self, resource: usize, ns: &str, obj: Value) -> ApiResult<Value> {
        let d = def(resource);
        let mut obj = strategy::normalize(d, obj)?;
        if d.namespaced {
            match meta::namespace(&obj) {
                "" => set_meta(&mut obj, "namespace", json!(ns)),
                given if given != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            self.check_namespace_accepts(ns)?;
        } else {
            meta::metadata_mut(&mut obj).remove("namespace");
        }
        if !meta::resource_version(&obj).is_empty() {
            return Err(ApiError::bad_request("resourceVersion should not be set on objects to be created"));
        }
        if meta::name(&obj).is_empty()
            && let Some(prefix) = meta::meta_str(&obj, "generateName").map(str::to_string)
        {
            set_meta(&mut obj, "name", json!(format!("{prefix}{}", meta::name_suffix())));
        }
        let name = meta::name(&obj).to_string();
        if let Some(e) = meta::validate_name(&name, strategy::name_rule(d)) {
            return Err(ApiError::invalid(d.group, d.kind, &name, vec![e]));
        }
        let key = (resource, if d.namespaced { ns.to_string() } else { String::new() }, name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(d.group, d.plural, &name));
        }
        {
            let m = meta::metadata_mut(&mut obj);
            for f in ["deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "managedFields"] {
                m.remove(f);
            }
            m.insert("uid".into(), json!(meta::new_uid()));
            m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
            if strategy::tracks_generation(d) {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        strategy::prepare_create(d, &mut obj, &mut self.alloc)?;
        let rv = self.next_rv();
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        self.objects.insert(key, obj.clone());
        self.record(resource, ChangeType::Added, obj.clone(), None);
        Ok(obj)
    }

    fn update(&mut self, resource: usize, ns: &str, name: &str, new: Value, sub: Subresource) -> ApiResult<Value> {
        let d = def(resource);
        let old = self.lookup(resource, ns, name)?.clone();
        let new = strategy::normalize(d, new)?;
        if meta::name(&new) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta::name(&new)
            )));
        }
        if d.namespaced && !meta::namespace(&new).is_empty() && meta::namespace(&new) != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let given_rv = meta::resource_version(&new);
        if !given_rv.is_empty() && given_rv != meta::resource_version(&old) {
            return Err(ApiError::conflict(
                d.group,
                d.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut merged = match sub {
            Subresource::Main => {
                let mut m = new;
                if d.has_status
                    && let Some(map) = m.as_object_mut()
                {
                    match old.get("status") {
                        Some(s) => map.insert("status".into(), s.clone()),
                        None => map.remove("status"),
                    };
                }
                let old_meta = old.get("metadata").cloned().unwrap_or_default();
                let mm = meta::metadata_mut(&mut m);
                for f in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                    "resourceVersion",
                ] {
                    match old_meta.get(f) {
                        Some(v) => mm.insert(f.to_string(), v.clone()),
                        None => mm.remove(f),
                    };
                }
                m
            }
            Subresource::Status => {
                let mut m = old.clone();
                if let Some(map) = m.as_object_mut() {
                    match new.get("status") {
                        Some(s) => map.insert("status".into(), s.clone()),
                        None => map.remove("status"),
                    };
                }
                m
            }
        };
        if meta::is_deleting(&old) {
            let before = meta::finalizers(&old);
            if meta::finalizers(&merged).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    d.group,
                    d.kind,
                    name,
                    vec![crate::error::FieldError::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        strategy::prepare_update(d, &old, &mut merged, &mut self.alloc)?;
        if merged == old {
            return Ok(old);
        }
        if strategy::tracks_generation(d) && merged.get("spec") != old.get("spec") {
            let generation = old.get("metadata").and_then(|m| m.get("generation")).and_then(Value::as_i64).unwrap_or(0);
            set_meta(&mut merged, "generation", json!(generation + 1));
        }
        let rv = self.next_rv();
        set_meta(&mut merged, "resourceVersion", json!(rv.to_string()));
        let key = (resource, ns.to_string(), name.to_string());
        if meta::is_deleting(&merged) && meta::finalizers(&merged).is_empty() {
            self.objects.remove(&key);
            strategy::on_removed(d, &merged, &mut self.alloc);
            self.record(resource, ChangeType::Deleted, merged.clone(), Some(old));
            self.finish_namespace_if_empty(ns);
        } else {
            self.objects.insert(key, merged.clone());
            self.record(resource, ChangeType::Modified, merged.clone(), Some(old));
        }
        Ok(merged)
    }

    fn delete(&mut self, resource: usize, ns: &str, name: &str, pre: &Preconditions) -> ApiResult<Value> {
        let d = def(resource);
        let old = self.lookup(resource, ns, name)?.clone();
        if let Some(uid) = &pre.uid
            && meta::meta_str(&old, "uid") != Some(uid.as_str())
        {
            return Err(ApiError::conflict(
                d.group,
                d.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::meta_str(&old, "uid").unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = &pre.resource_version
            && meta::resource_version(&old) != rv
        {
            return Err(ApiError::conflict(
                d.group,
                d.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta::resource_version(&old)
                ),
            ));
        }
        if resource == NAMESPACES {
            return self.delete_namespace(old);
        }
        if !meta::finalizers(&old).is_empty() {
            if meta::is_deleting(&old) {
                return Ok(old);
            }
            let mut obj = old.clone();
            set_meta(&mut obj, "deletionTimestamp", json!(meta::now_rfc3339()));
            set_meta(&mut obj, "deletionGracePeriodSeconds", json!(0));
            let rv = self.next_rv();
            set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
            self.objects.insert((resource, ns.to_string(), name.to_string()), obj.clone());
            self.record(resource, ChangeType::Modified, obj.clone(), Some(old));
            return Ok(obj);
        }
        Ok(self.remove(resource, ns, name, old))
    }

    fn remove(&mut self, resource: usize, ns: &str, name: &str, mut obj: Value) -> Value {
        let d = def(resource);
        self.objects.remove(&(resource, ns.to_string(), name.to_string()));
        strategy::on_removed(d, &obj, &mut self.alloc);
        let rv = self.next_rv();
        set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
        self.record(resource, ChangeType::Deleted, obj.clone(), None);
        if d.namespaced {
            self.finish_namespace_if_empty(ns);
        }
        obj
    }

    /// A namespace goes Terminating, its contents are deleted (finalizers respected), and it is
    /// removed once empty.
    fn delete_namespace(&mut self, old: Value) -> ApiResult<Value> {
        let name = meta::name(&old).to_string();
        if meta::is_deleting(&old) {
            return Ok(old);
        }
        let mut ns = old.clone();
        set_meta(&mut ns, "deletionTimestamp", json!(meta::now_rfc3339()));
        if let Some(map) = ns.as_object_mut() {
            map.insert("status".into(), json!({"phase": "Terminating"}));
        }
        let rv = self.next_rv();
        set_meta(&mut ns, "resourceVersion", json!(rv.to_string()));
        self.objects.insert((NAMESPACES, String::new(), name.clone()), ns.clone());
        self.record(NAMESPACES, ChangeType::Modified, ns.clone(), Some(old));
        let contents: Vec<Key> =
            self.objects.keys().filter(|(r, n, _)| *r != NAMESPACES && *n == name).cloned().collect();
        for (r, n, o) in contents {
            // Objects with finalizers stay until their controllers remove them.
            let _ = self.delete(r, &n, &o, &Preconditions::default());
        }
        self.finish_namespace_if_empty(&name);
        Ok(self.objects.get(&(NAMESPACES, String::new(), name)).cloned().unwrap_or(ns))
    }

    fn finish_namespace_if_empty(&mut self, ns: &str) {
        let key = (NAMESPACES, String::new(), ns.to_string());
        let Some(nsobj) = self.objects.get(&key).cloned() else { return };
        if !meta::is_deleting(&nsobj) || !meta::finalizers(&nsobj).is_empty() {
            return;
        }
        if self.objects.keys().any(|(r, n, _)| *r != NAMESPACES && n == ns) {
            return;
        }
        self.remove(NAMESPACES, "", ns, nsobj);
    }
}

fn encode_continue(ns: &str, name: &str) -> String {
    URL_SAFE_NO_PAD.encode(json!([ns, name]).to_string())
}

fn decode_continue(token: &str) -> ApiResult<(String, String)> {
    let bad = || ApiError::bad_request("continue key is not valid: the token is malformed");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let (ns, name): (String, String) = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok((ns, name))
}

impl Store {
    /// A store holding the namespaces every cluster has.
    pub fn new(alloc: ServiceAllocator, history_limit: usize) -> Self {
        let mut state = State {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 0,
            history_limit: history_limit.max(1),
            alloc,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            // These are valid by construction; an error here would be a bug in the defaults.
            if let Err(e) = state.create(NAMESPACES, "", json!({"metadata": {"name": ns}})) {
                tracing::error!(error = %e, "creating built-in namespace");
            }
        }
        let (head, _) = watch::channel(state.rv);
        Self { state: Mutex::new(state), head }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn commit<T>(&self, state: MutexGuard<'_, State>, out: T) -> T {
        let rv = state.rv;
        drop(state);
        self.head.send_replace(rv);
        out
    }

    /// Reads one object.
    pub fn get(&self, resource: usize, ns: &str, name: &str) -> ApiResult<Value> {
        self.lock().lookup(resource, ns, name).cloned()
    }

    /// Lists objects in key order (namespace, name), one page at a time.
    pub fn list(
        &self,
        resource: usize,
        ns: Option<&str>,
        selector: &Selector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> ApiResult<ListPage> {
        let after = continue_token.map(decode_continue).transpose()?;
        let state = self.lock();
        let mut matching = state
            .objects
            .iter()
            .filter(|((r, n, _), _)| *r == resource && ns.is_none_or(|ns| ns == n))
            .filter(|((_, n, o), _)| after.as_ref().is_none_or(|(an, ao)| (n, o) > (an, ao)))
            .filter(|(_, v)| selector.matches(v))
            .map(|(_, v)| v);
        let mut items = Vec::new();
        let limit = limit.filter(|l| *l > 0);
        for v in matching.by_ref() {
            items.push(v.clone());
            if limit.is_some_and(|l| items.len() >= l) {
                break;
            }
        }
        let remaining = matching.count() as u64;
        let (continue_token, remaining) = match items.last() {
            Some(last) if remaining > 0 => {
                (Some(encode_continue(meta::namespace(last), meta::name(last))), Some(remaining))
            }
            _ => (None, None),
        };
        Ok(ListPage { items, resource_version: state.rv, continue_token, remaining })
    }

    /// Creates an object in `ns` ("" for cluster-scoped resources).
    pub fn create(&self, resource: usize, ns: &str, obj: Value) -> ApiResult<Value> {
        let mut state = self.lock();
        let out = state.create(resource, ns, obj)?;
        Ok(self.commit(state, out))
    }

    /// Replaces an object (PUT), honouring `metadata.resourceVersion` as a precondition.
    pub fn update(&self, resource: usize, ns: &str, name: &str, obj: Value, sub: Subresource) -> ApiResult<Value> {
        let mut state = self.lock();
        let out = state.update(resource, ns, name, obj, sub)?;
        Ok(self.commit(state, out))
    }

    /// Patches an object: `apply` turns the current object into the patched one, atomically.
    pub fn patch(
        &self,
        resource: usize,
        ns: &str,
        name: &str,
        sub: Subresource,
        apply: impl FnOnce(&Value) -> ApiResult<Value>,
    ) -> ApiResult<Value> {
        let mut state = self.lock();
        let current = state.lookup(resource, ns, name)?.clone();
        let patched = apply(&current)?;
        let out = state.update(resource, ns, name, patched, sub)?;
        Ok(self.commit(state, out))
    }

    /// Deletes an object, or marks it for deletion while it has finalizers.
    pub fn delete(&self, resource: usize, ns: &str, name: &str, pre: &Preconditions) -> ApiResult<Value> {
        let mut state = self.lock();
        let out = state.delete(resource, ns, name, pre)?;
        Ok(self.commit(state, out))
    }

    /// Deletes every matching object; returns what was deleted or marked.
    pub fn delete_collection(&self, resource: usize, ns: Option<&str>, selector: &Selector) -> ApiResult<Vec<Value>> {
        let mut state = self.lock();
        let keys: Vec<Key> = state
            .objects
            .iter()
            .filter(|((r, n, _), v)| *r == resource && ns.is_none_or(|ns| ns == n) && selector.matches(v))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for (r, n, o) in keys {
            if let Ok(v) = state.delete(r, &n, &o, &Preconditions::default()) {
                out.push(v);
            }
        }
        Ok(self.commit(state, out))
    }

    /// Current objects matching, with the resourceVersion they were read at.
    pub fn snapshot(&self, resource: usize, ns: Option<&str>, selector: &Selector) -> (Vec<Value>, u64) {
        let state = self.lock();
        let items = state
            .objects
            .iter()
            .filter(|((r, n, _), v)| *r == resource && ns.is_none_or(|ns| ns == n) && selector.matches(v))
            .map(|(_, v)| v.clone())
            .collect();
        (items, state.rv)
    }

    /// Changes after `rv`, and the resourceVersion they go up to; [`Expired`] when the history
    /// no longer reaches back to `rv`.
    pub fn changes_since(&self, rv: u64) -> Result<(Vec<Arc<Change>>, u64), Expired> {
        let state = self.lock();
        if rv < state.floor {
            return Err(Expired);
        }
        let start = state.history.partition_point(|c| c.rv <= rv);
        Ok((state.history.range(start..).cloned().collect(), state.rv))
    }

    /// A receiver that sees the head resourceVersion move.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// The current resourceVersion.
    pub fn current_resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// The oldest resourceVersion a watch can still resume from.
    pub fn oldest_watchable(&self) -> u64 {
        self.lock().floor
    }

    /// Drops the whole change history, as etcd compaction does: watches resuming from any
    /// earlier resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.history.clear();
        state.floor = state.rv;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(ServiceAllocator::new("10.96.0.0/16".parse().unwrap(), None, 30000..=32767), 100)
    }

    const CM: usize = 3;

    #[test]
    fn resource_versions_are_global_and_monotonic() {
        let s = store();
        let a = s.create(CM, "default", json!({"metadata": {"name": "a"}})).unwrap();
        let b = s.create(CM, "default", json!({"metadata": {"name": "b"}})).unwrap();
        let ra: u64 = meta::resource_version(&a).parse().unwrap();
        let rb: u64 = meta::resource_version(&b).parse().unwrap();
        assert!(rb > ra);
        assert_eq!(s.current_resource_version(), rb);
    }

    #[test]
    fn history_limit_moves_the_floor() {
        let s = Store::new(ServiceAllocator::new("10.96.0.0/16".parse().unwrap(), None, 30000..=32767), 2);
        let first = s.current_resource_version();
        for i in 0..3 {
            s.create(CM, "default", json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        }
        assert!(s.changes_since(first).is_err());
        assert_eq!(s.changes_since(s.current_resource_version() - 2).unwrap().0.len(), 2);
    }

    #[test]
    fn the_last_finalizer_removed_by_a_json_patch_leaves_no_empty_list_behind() {
        let s = store();
        s.create(CM, "default", json!({"metadata": {"name": "a", "finalizers": ["x.io/f"]}})).unwrap();
        let remove = br#"[{"op":"test","path":"/metadata/finalizers/0","value":"x.io/f"},{"op":"remove","path":"/metadata/finalizers/0"}]"#;
        let out = s
            .patch(CM, "default", "a", Subresource::Main, |orig| {
                crate::patch::apply(crate::patch::PatchKind::Json, "ConfigMap", "a", orig, remove)
            })
            .unwrap();
        assert!(out["metadata"].get("finalizers").is_none(), "as the apiserver's omitempty does: {out}");
        // So adding one again the way kube-rs does (test against null first) works.
        let add = br#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["x.io/f"]}]"#;
        let out = s
            .patch(CM, "default", "a", Subresource::Main, |orig| {
                crate::patch::apply(crate::patch::PatchKind::Json, "ConfigMap", "a", orig, add)
            })
            .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["x.io/f"]));
    }

    #[test]
    fn continue_tokens_page_through_in_order() {
        let s = store();
        for n in ["c", "a", "b"] {
            s.create(CM, "default", json!({"metadata": {"name": n}})).unwrap();
        }
        let p1 = s.list(CM, Some("default"), &Selector::default(), Some(2), None).unwrap();
        assert_eq!(p1.items.iter().map(meta::name).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(p1.remaining, Some(1));
        let p2 = s.list(CM, Some("default"), &Selector::default(), Some(2), p1.continue_token.as_deref()).unwrap();
        assert_eq!(p2.items.iter().map(meta::name).collect::<Vec<_>>(), ["c"]);
        assert!(p2.continue_token.is_none());
    }
}
