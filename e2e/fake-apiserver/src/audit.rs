//! The audit log: one JSON line per request, saying who asked for which verb on which resource,
//! in the terms of Kubernetes RBAC (the apiserver's request info), so tests can check what a
//! client needs from a Role. Extra bearer tokens name the users the log tells apart.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use http::Method;
use serde::{Deserialize, Serialize};

/// What one request asked for, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestInfo {
    /// get, list, watch, create, update, patch, delete, deletecollection; lower-case HTTP
    /// method for a non-resource request.
    pub verb: String,
    /// API group; empty for the core group. `None` for a non-resource request.
    pub api_group: Option<String>,
    /// Plural resource; `None` for a non-resource request (discovery, /version).
    pub resource: Option<String>,
    /// Subresource such as `status`.
    pub subresource: Option<String>,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
    /// Object name, when the request names one.
    pub name: Option<String>,
    /// The path of a non-resource request.
    pub path: Option<String>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The request.
    #[serde(flatten)]
    pub request: RequestInfo,
    /// User named by the bearer token (`admin` for the main token); `None` when unauthenticated.
    pub user: Option<String>,
    /// The User-Agent header.
    pub user_agent: Option<String>,
    /// HTTP status of the answer.
    pub code: u16,
}

/// Parses a request the way the apiserver's RequestInfoFactory does for the paths served here.
pub fn request_info(method: &Method, path: &str, query: Option<&str>) -> RequestInfo {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let non_resource = || RequestInfo {
        verb: method.as_str().to_ascii_lowercase(),
        api_group: None,
        resource: None,
        subresource: None,
        namespace: None,
        name: None,
        path: Some(path.to_owned()),
    };
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return non_resource(),
    };
    let mut parts: &[&str] = rest;
    let mut namespace = None;
    if parts[0] == "namespaces" && parts.len() > 1 {
        namespace = Some(parts[1].to_owned());
        // `namespaces/{name}/status` is the Namespace's own subresource.
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts = &parts[2..];
        } else {
            namespace = None;
        }
    }
    let resource = parts[0].to_owned();
    let name = parts.get(1).map(|s| (*s).to_owned());
    let subresource = parts.get(2).map(|s| (*s).to_owned());
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match (method, name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return non_resource(),
    };
    RequestInfo {
        verb: verb.to_owned(),
        api_group: Some(group.to_owned()),
        resource: Some(resource),
        subresource,
        namespace,
        name,
        path: None,
    }
}

/// Appends entries to a file; shared by every connection.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating, appending) the log at `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file: Mutex::new(file) })
    }

    /// Writes one line; a failed write is logged, not fatal to the request.
    pub fn record(&self, entry: &Entry) {
        let Ok(mut line) = serde_json::to_vec(entry) else { return };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = file.write_all(&line) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}

/// Bearer tokens and the user each one names.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_token: HashMap<String, String>,
}

impl Users {
    /// The main token is `admin`; `extra` are (token, user) pairs.
    pub fn new(main_token: &str, extra: &[(String, String)]) -> Self {
        let mut by_token: HashMap<String, String> = extra.iter().cloned().collect();
        by_token.insert(main_token.to_owned(), "admin".to_owned());
        Self { by_token }
    }

    /// The user a token names, if it is one of ours.
    pub fn authenticate(&self, token: &str) -> Option<&str> {
        self.by_token.get(token).map(String::as_str)
    }
}

/// Parses `TOKEN=USER` (the `--user` flag).
pub fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((token, user)) if !token.is_empty() && !user.is_empty() => Ok((token.to_owned(), user.to_owned())),
        _ => Err(format!("{s:?} is not TOKEN=USER")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(method: Method, path: &str, query: Option<&str>) -> (String, Option<String>, Option<String>) {
        let i = request_info(&method, path, query);
        let sub = i.subresource.map(|s| format!("/{s}")).unwrap_or_default();
        (
            i.verb,
            i.resource.map(|r| format!("{}:{r}{sub}", i.api_group.unwrap_or_default())),
            match (i.namespace, i.name) {
                (Some(ns), name) => Some(format!("{ns}/{}", name.unwrap_or_default())),
                (None, name) => name,
            },
        )
    }

    #[test]
    fn requests_map_to_rbac_terms() {
        let s = |v: &str| v.to_owned();
        let cases = [
            (
                Method::GET,
                "/api/v1/services",
                Some("watch=true&resourceVersion=1"),
                (s("watch"), Some(s(":services")), None),
            ),
            (Method::GET, "/api/v1/services", Some("limit=500"), (s("list"), Some(s(":services")), None)),
            (
                Method::PATCH,
                "/api/v1/namespaces/a/services/b/status",
                None,
                (s("patch"), Some(s(":services/status")), Some(s("a/b"))),
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/a/events",
                None,
                (s("create"), Some(s("events.k8s.io:events")), Some(s("a/"))),
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/a/leases/l",
                None,
                (s("update"), Some(s("coordination.k8s.io:leases")), Some(s("a/l"))),
            ),
            (Method::GET, "/api/v1/nodes/n1", None, (s("get"), Some(s(":nodes")), Some(s("n1")))),
            (
                Method::DELETE,
                "/api/v1/namespaces/a/services",
                None,
                (s("deletecollection"), Some(s(":services")), Some(s("a/"))),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/kube-system",
                None,
                (s("get"), Some(s(":namespaces")), Some(s("kube-system"))),
            ),
            (
                Method::PUT,
                "/api/v1/namespaces/x/status",
                None,
                (s("update"), Some(s(":namespaces/status")), Some(s("x"))),
            ),
            (Method::GET, "/apis/discovery.k8s.io/v1", None, (s("get"), None, None)),
            (Method::GET, "/version", None, (s("get"), None, None)),
        ];
        for (method, path, query, want) in cases {
            assert_eq!(info(method.clone(), path, query), want, "{method} {path}");
        }
    }

    #[test]
    fn users_by_token() {
        let users = Users::new("main", &[parse_user("t1=operator").unwrap_or_default()]);
        assert_eq!(users.authenticate("main"), Some("admin"));
        assert_eq!(users.authenticate("t1"), Some("operator"));
        assert_eq!(users.authenticate("t2"), None);
        assert!(parse_user("nouser").is_err());
        assert!(parse_user("=x").is_err());
    }
}
