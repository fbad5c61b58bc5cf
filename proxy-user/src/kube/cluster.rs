//! The cluster as the watchers have seen it: one kube-rs reflector store per resource, and
//! whether each store is complete.
//!
//! A store is complete once its first initial list ended (`InitDone`). kube-rs buffers a relist
//! and swaps it in at `InitDone`, so a store that was complete never shows a partial list again;
//! before the first `InitDone` it is empty, and translating it then would delete live Services
//! from adopted maps. [`ClusterState::synced`] is what guards that.

use std::hash::Hash;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::watcher;

use crate::diag::Origin;
use crate::objects::{ServiceObject, SliceObject};
use crate::translate::{Inventory, ObjectKey, Seniority, Sourced};

/// One watched resource.
pub struct Tracked<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    writer: Writer<K>,
    store: Store<K>,
    /// The first initial list has been received in full.
    synced: bool,
}

impl<K> Tracked<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    fn new() -> Self {
        let writer = Writer::default();
        let store = writer.as_reader();
        Tracked {
            writer,
            store,
            synced: false,
        }
    }

    /// Applies a watcher event; true when what the store shows changed.
    fn apply(&mut self, event: &watcher::Event<K>) -> bool {
        self.writer.apply_watcher_event(event);
        match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => false,
            watcher::Event::InitDone => {
                self.synced = true;
                true
            }
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => true,
        }
    }

    fn keyed(&self) -> impl Iterator<Item = (ObjectKey, Arc<K>)> {
        self.store.state().into_iter().map(|obj| {
            let meta = obj.meta();
            let key = ObjectKey::new(
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            (key, obj)
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.store.len()
    }
}

/// A Service from the API server as the translator takes it, with its age: of two Services
/// wanting one frontend, neither serving it yet, the one created first keeps it.
pub fn sourced_service(service: &Service) -> Sourced<ServiceObject> {
    let meta = &service.metadata;
    Sourced::new(ServiceObject::from(service), Origin::Cluster).with_seniority(Seniority {
        since: meta
            .creation_timestamp
            .as_ref()
            .map(|t| std::time::SystemTime::from(t.0)),
        uid: meta.uid.as_deref().map(Arc::from),
    })
}

/// The stores of the three watched resources.
pub struct ClusterState {
    node_name: String,
    pub services: Tracked<Service>,
    pub slices: Tracked<EndpointSlice>,
    /// Normally only this node (the watch has a field selector).
    pub nodes: Tracked<Node>,
}

impl ClusterState {
    pub fn new(node_name: impl Into<String>) -> Self {
        ClusterState {
            node_name: node_name.into(),
            services: Tracked::new(),
            slices: Tracked::new(),
            nodes: Tracked::new(),
        }
    }

    /// Applies one Service event; true when the stores' visible content changed.
    pub fn apply_service(&mut self, event: &watcher::Event<Service>) -> bool {
        self.services.apply(event)
    }

    pub fn apply_slice(&mut self, event: &watcher::Event<EndpointSlice>) -> bool {
        self.slices.apply(event)
    }

    pub fn apply_node(&mut self, event: &watcher::Event<Node>) -> bool {
        self.nodes.apply(event)
    }

    /// Every store has received its initial list in full.
    pub fn synced(&self) -> bool {
        self.waiting_for().is_empty()
    }

    /// The resources whose initial list is not complete yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        [
            ("services", self.services.synced),
            ("endpointslices", self.slices.synced),
            ("nodes", self.nodes.synced),
        ]
        .into_iter()
        .filter(|(_, synced)| !synced)
        .map(|(name, _)| name)
        .collect()
    }

    /// Services and EndpointSlices as translate() takes them. Endpoints objects are not read:
    /// the control plane mirrors them into EndpointSlices, which is what kube-proxy reads too.
    pub fn inventory(&self) -> Inventory {
        Inventory {
            services: self
                .services
                .keyed()
                .map(|(k, s)| (k, sourced_service(&s)))
                .collect(),
            slices: self
                .slices
                .keyed()
                .map(|(k, s)| (k, Sourced::new(SliceObject::from(&*s), Origin::Cluster)))
                .collect(),
        }
    }

    /// This node's Node object, if the API server has one by that name.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.nodes.store.get(&ObjectRef::new(&self.node_name))
    }

    pub fn service(&self, key: &ObjectKey) -> Option<Arc<Service>> {
        self.services
            .store
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    pub fn slice(&self, key: &ObjectKey) -> Option<Arc<EndpointSlice>> {
        self.slices
            .store
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
    }
}
