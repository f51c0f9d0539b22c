//! Watch streams: newline-delimited `WatchEvent`s from a resourceVersion, with bookmarks,
//! timeouts, selector transitions, and 410 Gone for history that was compacted away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::{ApiError, ApiResult};
use crate::resources::RESOURCES;
use crate::selectors::Selector;
use crate::store::{ChangeType, Store};
use crate::view::View;

/// What a watch request asked for.
#[derive(Debug, Clone)]
pub struct WatchParams {
    /// Index into [`RESOURCES`] of the stored resource watched.
    pub resource: usize,
    /// How the objects are shown (API version the client used, Table or not).
    pub view: View,
    /// Namespace to watch; `None` for all.
    pub namespace: Option<String>,
    /// Label and field selector.
    pub selector: Selector,
    /// `resourceVersion` to start after; unset or "0" starts with the current state.
    pub resource_version: Option<String>,
    /// `allowWatchBookmarks`.
    pub allow_bookmarks: bool,
    /// `sendInitialEvents`.
    pub send_initial_events: bool,
    /// `timeoutSeconds`.
    pub timeout: Option<Duration>,
    /// How often to send a bookmark when allowed.
    pub bookmark_interval: Duration,
}

fn line(event_type: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": event_type, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(resource: usize, rv: u64, initial_events_end: bool) -> Bytes {
    let def = &RESOURCES[resource];
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line("BOOKMARK", &json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata}))
}

fn expired(rv: u64, oldest: u64) -> Bytes {
    let err = ApiError::gone(format!("too old resource version: {rv} ({oldest})"));
    line("ERROR", &err.status_json())
}

/// Starts a watch; the body streams until the timeout, the client leaves, or the server stops.
pub fn start(store: Arc<Store>, params: WatchParams, mut shutdown: watch::Receiver<bool>) -> ApiResult<Body> {
    let from: Option<u64> = match params.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(s) => Some(s.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version \"{s}\"")))?),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut head = store.subscribe();
    tokio::spawn(async move {
        let p = params;
        let ns = p.namespace.as_deref();
        let matches = |object: &Value, namespace: &str| ns.is_none_or(|n| n == namespace) && p.selector.matches(object);
        let mut first = true;
        let mut show = |object: &Value| {
            let shown = p.view.watched(object, first);
            first = false;
            shown
        };
        let mut last = match from {
            Some(rv) if !p.send_initial_events => rv,
            _ => {
                let (items, rv) = store.snapshot(p.resource, ns, &p.selector);
                for item in &items {
                    if tx.send(line("ADDED", &show(item))).await.is_err() {
                        return;
                    }
                }
                if p.send_initial_events
                    && p.allow_bookmarks
                    && tx.send(bookmark(p.view.resource, rv, true)).await.is_err()
                {
                    return;
                }
                rv
            }
        };
        let deadline = p.timeout.map(|t| Instant::now() + t);
        let mut next_bookmark = Instant::now() + p.bookmark_interval;
        loop {
            let (changes, rv) = match store.changes_since(last) {
                Ok(c) => c,
                Err(_) => {
                    let _ = tx.send(expired(last, store.oldest_watchable())).await;
                    return;
                }
            };
            for c in changes.iter().filter(|c| c.resource == p.resource) {
                let now = matches(&c.object, &c.namespace);
                let before = c.old.as_ref().is_some_and(|o| matches(o, &c.namespace));
                let event_type = match c.kind {
                    ChangeType::Added if now => "ADDED",
                    ChangeType::Deleted if now || before => "DELETED",
                    // A modification that moves an object into or out of the selection is an
                    // addition or deletion for this watcher.
                    ChangeType::Modified if now && before => "MODIFIED",
                    ChangeType::Modified if now => "ADDED",
                    ChangeType::Modified if before => "DELETED",
                    _ => continue,
                };
                if tx.send(line(event_type, &show(&c.object))).await.is_err() {
                    return;
                }
            }
            last = rv;
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                () = timeout => return,
                () = tokio::time::sleep_until(next_bookmark), if p.allow_bookmarks => {
                    next_bookmark = Instant::now() + p.bookmark_interval;
                    if tx.send(bookmark(p.view.resource, last, false)).await.is_err() {
                        return;
                    }
                }
                _ = shutdown.changed() => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    Ok(Body::from_stream(stream))
}
