//! What the agent keeps of the cluster: each Service of our class and each EndpointSlice,
//! projected to the fields the model reads, and which Services changed since the last sync.
//!
//! Watch events land here one by one; an event that changes nothing the model reads (a
//! status or annotation update, a resourceVersion bump) marks nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{ModelConfig, ModelWarning, ServiceInput, ServiceKey, ServiceModel, SliceInput, build_service};

/// The projected cluster and the Services changed since [`ClusterInputs::take_changes`].
#[derive(Debug, Default)]
pub struct ClusterInputs {
    services: HashMap<ServiceKey, ServiceInput>,
    slices: HashMap<ServiceKey, BTreeMap<String, SliceInput>>,
    /// Slice (namespace, name) → the Service it is filed under (its label may change).
    slice_service: HashMap<(String, String), ServiceKey>,
    dirty: BTreeSet<ServiceKey>,
    /// Services and slices seen by a relist under way.
    relisted_services: Option<HashSet<ServiceKey>>,
    relisted_slices: Option<HashSet<(String, String)>>,
}

/// Changed Services from which [`ClusterInputs::take_changes`] builds the models on two threads.
const PARALLEL_BUILD: usize = 1024;

/// A Service's new model, or `None` when it is gone (or no longer ours).
pub type Change = (ServiceKey, Option<ServiceModel>);

fn service_key(svc: &Service) -> Option<ServiceKey> {
    Some(ServiceKey::new(svc.metadata.namespace.as_deref()?, svc.metadata.name.as_deref()?))
}

fn slice_id(slice: &EndpointSlice) -> Option<(String, String)> {
    Some((slice.metadata.namespace.clone()?, slice.metadata.name.clone()?))
}

impl ClusterInputs {
    /// A relist of Services starts: Services it does not list are forgotten at its end.
    pub fn begin_service_relist(&mut self) {
        self.relisted_services = Some(HashSet::new());
    }

    /// The relist of Services is complete.
    pub fn end_service_relist(&mut self) {
        if let Some(listed) = self.relisted_services.take() {
            self.retain_services(&listed);
        }
    }

    /// A relist of EndpointSlices starts.
    pub fn begin_slice_relist(&mut self) {
        self.relisted_slices = Some(HashSet::new());
    }

    /// The relist of EndpointSlices is complete.
    pub fn end_slice_relist(&mut self) {
        if let Some(listed) = self.relisted_slices.take() {
            self.retain_slices(&listed);
        }
    }

    /// An added or updated Service.
    pub fn apply_service(&mut self, svc: &Service, class: &str) {
        if let (Some(listed), Some(key)) = (self.relisted_services.as_mut(), service_key(svc)) {
            listed.insert(key);
        }
        match ServiceInput::project(svc, class) {
            Some((key, input)) => {
                if self.services.get(&key) != Some(&input) {
                    self.services.insert(key.clone(), input);
                    self.dirty.insert(key);
                }
            }
            None => {
                if let Some(key) = service_key(svc) {
                    self.remove_service(key);
                }
            }
        }
    }

    /// A deleted Service.
    pub fn delete_service(&mut self, svc: &Service) {
        if let Some(key) = service_key(svc) {
            self.remove_service(key);
        }
    }

    fn remove_service(&mut self, key: ServiceKey) {
        if self.services.remove(&key).is_some() {
            self.dirty.insert(key);
        }
    }

    fn retain_services(&mut self, listed: &HashSet<ServiceKey>) {
        let gone: Vec<ServiceKey> = self.services.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for key in gone {
            self.remove_service(key);
        }
    }

    /// An added or updated EndpointSlice.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) {
        let Some(id) = slice_id(slice) else { return };
        if let Some(listed) = self.relisted_slices.as_mut() {
            listed.insert(id.clone());
        }
        let projected = SliceInput::project(slice);
        if self.slice_service.get(&id).is_some_and(|prev| Some(prev) != projected.as_ref().map(|p| &p.0)) {
            self.remove_slice(&id);
        }
        let Some((key, name, input)) = projected else { return };
        let slices = self.slices.entry(key.clone()).or_default();
        if slices.get(&name) != Some(&input) {
            slices.insert(name, input);
            self.mark(&key);
        }
        self.slice_service.insert(id, key);
    }

    /// A deleted EndpointSlice.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        if let Some(id) = slice_id(slice) {
            self.remove_slice(&id);
        }
    }

    fn retain_slices(&mut self, listed: &HashSet<(String, String)>) {
        let gone: Vec<(String, String)> = self.slice_service.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for id in gone {
            self.remove_slice(&id);
        }
    }

    fn remove_slice(&mut self, id: &(String, String)) {
        let Some(key) = self.slice_service.remove(id) else { return };
        if let Some(slices) = self.slices.get_mut(&key) {
            slices.remove(&id.1);
            if slices.is_empty() {
                self.slices.remove(&key);
            }
        }
        self.mark(&key);
    }

    /// Slices of Services that are not ours change nothing.
    fn mark(&mut self, key: &ServiceKey) {
        if self.services.contains_key(key) {
            self.dirty.insert(key.clone());
        }
    }

    /// Replaces everything with these lists (as a relist of both watches would).
    pub fn replace<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        class: &str,
    ) {
        self.begin_service_relist();
        for svc in services {
            self.apply_service(svc, class);
        }
        self.end_service_relist();
        self.begin_slice_relist();
        for slice in slices {
            self.apply_slice(slice);
        }
        self.end_slice_relist();
    }

    /// Number of Services changed since the last [`ClusterInputs::take_changes`].
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// Number of Services of our class.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// The models of the Services changed since the last call (`None`: gone), in key order.
    /// Many of them (the first sync's) are built on two threads.
    pub fn take_changes(&mut self, config: &ModelConfig, warnings: &mut Vec<ModelWarning>) -> Vec<Change> {
        let dirty: Vec<ServiceKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        if dirty.len() < PARALLEL_BUILD {
            return self.build(dirty, config, warnings);
        }
        let mut first = dirty;
        let second = first.split_off(first.len() / 2);
        let this = &*self;
        std::thread::scope(|scope| {
            let other = scope.spawn(move || {
                let mut warnings = Vec::new();
                (this.build(second, config, &mut warnings), warnings)
            });
            let mut changes = this.build(first, config, warnings);
            match other.join() {
                Ok((rest, more)) => {
                    changes.extend(rest);
                    warnings.extend(more);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
            changes
        })
    }

    fn build(&self, keys: Vec<ServiceKey>, config: &ModelConfig, warnings: &mut Vec<ModelWarning>) -> Vec<Change> {
        keys.into_iter()
            .map(|key| {
                let model = self.services.get(&key).map(|input| {
                    let slices: Vec<&SliceInput> = self.slices.get(&key).into_iter().flat_map(|s| s.values()).collect();
                    build_service(key.clone(), input, &slices, config, warnings)
                });
                (key, model)
            })
            .collect()
    }
}
