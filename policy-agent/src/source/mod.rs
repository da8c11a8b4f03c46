//! Where cluster state comes from. Every source (the Kubernetes API, a
//! directory of YAML) sends the same [`SourceUpdate`]s to the reconciler,
//! which owns the one [`ClusterState`](crate::model::ClusterState), compiles
//! it and programs the maps. Sources carry wire objects (k8s-openapi types);
//! conversion happens in the state, so a malformed object is reported by one
//! code path whatever its source.

pub mod files;
pub mod kube;

use std::net::IpAddr;

use k8s_openapi::api::{core::v1 as core, networking::v1 as net};

use crate::model::ObjectRef;

/// One change seen by a source.
#[derive(Clone, Debug)]
pub enum SourceUpdate {
    /// Every object of one kind, replacing all the reconciler knew of that
    /// kind: an initial list, a re-list after a watch restart, a file reload.
    /// The reconciler compiles nothing until it has had one `Replace` of each
    /// kind (and, when the source provides it, the node's addresses).
    Replace(Objects),
    /// An object was created or changed.
    Apply(Object),
    /// An object is gone.
    Delete(Kind, ObjectRef),
    /// This node's addresses: peers with them are the node (HOST identity).
    NodeAddresses(Vec<IpAddr>),
}

/// The kinds a source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
}

/// One object of a watched kind, as the API (or a file) gave it.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Box<core::Namespace>),
    Pod(Box<core::Pod>),
    NetworkPolicy(Box<net::NetworkPolicy>),
}

/// All objects of one kind.
#[derive(Clone, Debug)]
pub enum Objects {
    Namespaces(Vec<core::Namespace>),
    Pods(Vec<core::Pod>),
    NetworkPolicies(Vec<net::NetworkPolicy>),
}

impl Objects {
    pub fn kind(&self) -> Kind {
        match self {
            Objects::Namespaces(_) => Kind::Namespace,
            Objects::Pods(_) => Kind::Pod,
            Objects::NetworkPolicies(_) => Kind::NetworkPolicy,
        }
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }
}
