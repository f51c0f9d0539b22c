//! How stored objects are shown to one request: in the API version the client asked for, and as
//! a `meta.k8s.io` Table when it asked for one.

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::events;
use crate::resources::RESOURCES;
use crate::table::{self, TableRequest};

/// The presentation one request asked for.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// Index into [`RESOURCES`] of the resource the request named.
    pub resource: usize,
    /// Table output, when negotiated.
    pub table: Option<TableRequest>,
}

impl View {
    /// A stored object in the request's API version.
    pub fn object(&self, stored: &Value) -> Value {
        events::present(self.resource, stored)
    }

    fn table_of(&self, req: TableRequest, stored: &[Value], metadata: Value, headers: bool) -> Value {
        let def = &RESOURCES[events::storage_of(self.resource)];
        let rows: Vec<(&Value, Value)> = stored.iter().map(|s| (s, self.object(s))).collect();
        table::table(req, def, &rows, metadata, headers, Timestamp::now())
    }

    /// The answer to a get.
    pub fn single(&self, stored: &Value) -> Value {
        match self.table {
            None => self.object(stored),
            Some(req) => {
                let metadata = json!({"resourceVersion": crate::meta::resource_version(stored)});
                self.table_of(req, std::slice::from_ref(stored), metadata, true)
            }
        }
    }

    /// The answer to a list, with its list metadata.
    pub fn list(&self, stored: &[Value], metadata: Value) -> Value {
        match self.table {
            None => {
                let def = &RESOURCES[self.resource];
                json!({
                    "kind": def.list_kind(),
                    "apiVersion": def.api_version(),
                    "metadata": metadata,
                    "items": stored.iter().map(|s| self.object(s)).collect::<Vec<_>>(),
                })
            }
            Some(req) => self.table_of(req, stored, metadata, true),
        }
    }

    /// The object of a watch event. Tables carry their column definitions in the first event
    /// only, as kube-apiserver sends them.
    pub fn watched(&self, stored: &Value, first: bool) -> Value {
        match self.table {
            None => self.object(stored),
            Some(req) => {
                let metadata = json!({"resourceVersion": crate::meta::resource_version(stored)});
                self.table_of(req, std::slice::from_ref(stored), metadata, first)
            }
        }
    }
}
