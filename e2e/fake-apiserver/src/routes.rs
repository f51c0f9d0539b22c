//! HTTP routing: Kubernetes REST paths and verbs onto the store, discovery and watches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::audit::{self, AuditLog, Users};
use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::patch::{self, PatchKind};
use crate::resources::{RESOURCES, lookup};
use crate::selectors::{FieldSelector, LabelSelector, Selector};
use crate::store::{Preconditions, Store, Subresource};
use crate::table::{self, IncludeObject, TableRequest};
use crate::view::View;
use crate::watch::{self as watches, WatchParams};

/// Largest request body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The objects.
    pub store: Arc<Store>,
    /// The bearer token clients must present.
    pub token: String,
    /// `host:port` advertised in `/api`.
    pub server_address: String,
    /// How often watches with bookmarks allowed get one.
    pub bookmark_interval: Duration,
    /// Flips to true when the server stops, ending watches.
    pub shutdown: watch::Receiver<bool>,
    /// Tokens accepted besides `token`, and the users they name in the audit log.
    pub users: Arc<Users>,
    /// Where every request is recorded, when set.
    pub audit: Option<Arc<AuditLog>>,
}

/// The router that serves everything.
pub fn router(state: AppState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

async fn handle(State(app): State<AppState>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let audit = app.audit.clone().map(|log| {
        let user = bearer(&req).and_then(|t| app.users.authenticate(t)).map(str::to_owned);
        let user_agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (log, audit::request_info(&method, &path, req.uri().query()), user, user_agent)
    });
    let response = match dispatch(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Some((log, request, user, user_agent)) = audit {
        log.record(&audit::Entry { request, user, user_agent, code: response.status().as_u16() });
    }
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    response
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    let mut r = (code, body.to_string()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn only_get(method: &Method, path: &str) -> ApiResult<()> {
    if method == Method::GET { Ok(()) } else { Err(ApiError::method_not_allowed(method.as_str(), path)) }
}

/// A parsed resource path.
struct Target {
    resource: usize,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[&str], path: &str) -> ApiResult<Target> {
    let not_found = || ApiError::path_not_found(path);
    // `/namespaces/{ns}/{plural}/...` when {plural} is a namespaced resource; otherwise
    // `/namespaces/{name}` is the Namespace object itself.
    if rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && let Some(resource) = lookup(group, version, rest[2]).filter(|r| RESOURCES[*r].namespaced)
    {
        if rest.len() > 5 {
            return Err(not_found());
        }
        return Ok(Target {
            resource,
            namespace: Some(rest[1].to_string()),
            name: rest.get(3).map(|s| s.to_string()),
            subresource: rest.get(4).map(|s| s.to_string()),
        });
    }
    let plural = rest.first().ok_or_else(not_found)?;
    let resource = lookup(group, version, plural).ok_or_else(not_found)?;
    if rest.len() > 3 || (RESOURCES[resource].namespaced && rest.len() > 1) {
        return Err(not_found());
    }
    Ok(Target {
        resource,
        namespace: None,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

async fn dispatch(app: AppState, req: Request) -> ApiResult<Response> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let trimmed = path.trim_end_matches('/');
    if ["/healthz", "/readyz", "/livez"].iter().any(|p| trimmed == *p || trimmed.starts_with(&format!("{p}/"))) {
        // Health probes are public, as the apiserver's `system:public-info-viewer` makes them.
        only_get(&method, &path)?;
        return Ok((StatusCode::OK, "ok").into_response());
    }
    let authorized = bearer(&req).is_some_and(|t| t == app.token || app.users.authenticate(t).is_some());
    if !authorized {
        return Err(ApiError::unauthorized());
    }
    let segs: Vec<&str> = trimmed.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["version"] => {
            only_get(&method, &path)?;
            Ok(json_response(StatusCode::OK, &discovery::version()))
        }
        ["api"] => {
            only_get(&method, &path)?;
            Ok(json_response(StatusCode::OK, &discovery::core_versions(&app.server_address)))
        }
        ["apis"] => {
            only_get(&method, &path)?;
            Ok(json_response(StatusCode::OK, &discovery::group_list()))
        }
        ["api", version] => {
            let doc = discovery::resource_list("", version).ok_or_else(|| ApiError::path_not_found(&path))?;
            only_get(&method, &path)?;
            Ok(json_response(StatusCode::OK, &doc))
        }
        ["apis", group] => {
            let doc = discovery::group(group).ok_or_else(|| ApiError::path_not_found(&path))?;
            only_get(&method, &path)?;
            Ok(json_response(StatusCode::OK, &doc))
        }
        ["apis", group, version] => {
            let doc = discovery::resource_list(group, version).ok_or_else(|| ApiError::path_not_found(&path))?;
            only_get(&method, &path)?;
            Ok(json_response(StatusCode::OK, &doc))
        }
        ["api", version, rest @ ..] => {
            let target = parse_target("", version, rest, &path)?;
            resource_request(app, req, target).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = parse_target(group, version, rest, &path)?;
            resource_request(app, req, target).await
        }
        // Includes /openapi/v2 and /openapi/v3: no schema is published, so clients fall back.
        _ => Err(ApiError::path_not_found(&path)),
    }
}

fn query(req: &Request) -> ApiResult<HashMap<String, String>> {
    Query::<HashMap<String, String>>::try_from_uri(req.uri())
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

fn selector(q: &HashMap<String, String>, resource: usize) -> ApiResult<Selector> {
    Ok(Selector {
        labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str), &RESOURCES[resource])?,
    })
}

/// What a read asked to see: its API's version, as a Table when `Accept` negotiates one.
fn view_for(req: &Request, q: &HashMap<String, String>, resource: usize) -> ApiResult<View> {
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let table = match table::negotiate(accept) {
        Some(version) => {
            Some(TableRequest { version, include: IncludeObject::parse(q.get("includeObject").map(String::as_str))? })
        }
        None => None,
    };
    Ok(View { resource, table })
}

fn flag(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

async fn body_json(req: Request, require_json: bool) -> ApiResult<(Option<String>, Value)> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    if require_json {
        let essence =
            content_type.as_deref().unwrap_or("application/json").split(';').next().unwrap_or("").trim().to_string();
        if essence != "application/json" && essence != "*/*" {
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json (got \"{essence}\")"
            )));
        }
    }
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?;
    if bytes.is_empty() {
        return Ok((content_type, Value::Null));
    }
    if !require_json {
        return Ok((content_type, Value::String(String::from_utf8_lossy(&bytes).into_owned())));
    }
    let v = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    Ok((content_type, v))
}

async fn resource_request(app: AppState, req: Request, t: Target) -> ApiResult<Response> {
    let def = &RESOURCES[t.resource];
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q = query(&req)?;
    if q.contains_key("dryRun") {
        return Err(ApiError::bad_request("dryRun is not supported by this fake apiserver"));
    }
    let ns = t.namespace.clone().unwrap_or_default();
    let sub = match t.subresource.as_deref() {
        None => Subresource::Main,
        Some("status") if def.has_status => Subresource::Status,
        Some(_) => return Err(ApiError::path_not_found(&path)),
    };
    let store = app.store.clone();
    // Events of both APIs live in one store; `view` shows them in the version asked for.
    let stored = events::storage_of(t.resource);
    let view = view_for(&req, &q, t.resource)?;
    match (&t.name, &method) {
        (None, &Method::GET) => {
            let sel = selector(&q, t.resource)?;
            if flag(&q, "watch") {
                let params = WatchParams {
                    resource: stored,
                    view,
                    namespace: t.namespace.clone(),
                    selector: sel,
                    resource_version: q.get("resourceVersion").cloned(),
                    allow_bookmarks: flag(&q, "allowWatchBookmarks"),
                    send_initial_events: flag(&q, "sendInitialEvents"),
                    timeout: q.get("timeoutSeconds").and_then(|s| s.parse().ok()).map(Duration::from_secs),
                    bookmark_interval: app.bookmark_interval,
                };
                let body = watches::start(store, params, app.shutdown.clone())?;
                let mut r = Response::new(body);
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return Ok(r);
            }
            let limit = q
                .get("limit")
                .map(|l| l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit \"{l}\""))))
                .transpose()?;
            let page =
                store.list(stored, t.namespace.as_deref(), &sel, limit, q.get("continue").map(String::as_str))?;
            let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
            if let Some(c) = page.continue_token {
                metadata["continue"] = json!(c);
            }
            if let Some(n) = page.remaining {
                metadata["remainingItemCount"] = json!(n);
            }
            Ok(json_response(StatusCode::OK, &view.list(&page.items, metadata)))
        }
        (None, &Method::POST) => {
            if def.namespaced && t.namespace.is_none() {
                return Err(ApiError::method_not_allowed(method.as_str(), &path));
            }
            let (_, obj) = body_json(req, true).await?;
            let created = store.create(stored, &ns, events::to_storage(t.resource, obj, true)?)?;
            Ok(json_response(StatusCode::CREATED, &view.object(&created)))
        }
        (None, &Method::DELETE) => {
            let sel = selector(&q, t.resource)?;
            let deleted = store.delete_collection(stored, t.namespace.as_deref(), &sel)?;
            let metadata = json!({"resourceVersion": store.current_resource_version().to_string()});
            Ok(json_response(StatusCode::OK, &View { table: None, ..view }.list(&deleted, metadata)))
        }
        (Some(name), &Method::GET) => Ok(json_response(StatusCode::OK, &view.single(&store.get(stored, &ns, name)?))),
        (Some(name), &Method::PUT) => {
            let (_, obj) = body_json(req, true).await?;
            let updated = store.update(stored, &ns, name, events::to_storage(t.resource, obj, false)?, sub)?;
            Ok(json_response(StatusCode::OK, &view.object(&updated)))
        }
        (Some(name), &Method::PATCH) => {
            let content_type =
                req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let kind = PatchKind::from_content_type(&content_type)?;
            let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
                .await
                .map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?;
            // The patch applies to the object as the client's API shows it.
            let patched = store.patch(stored, &ns, name, sub, |current| {
                let shown = view.object(current);
                events::to_storage(t.resource, patch::apply(kind, def.kind, name, &shown, &body)?, false)
            })?;
            Ok(json_response(StatusCode::OK, &view.object(&patched)))
        }
        (Some(name), &Method::DELETE) if sub == Subresource::Main => {
            let (_, opts) = body_json(req, false).await?;
            let opts: Value = match opts {
                Value::String(s) => serde_json::from_str(&s)
                    .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?,
                other => other,
            };
            let pre = Preconditions {
                uid: opts.pointer("/preconditions/uid").and_then(Value::as_str).map(str::to_string),
                resource_version: opts
                    .pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            };
            Ok(json_response(StatusCode::OK, &view.object(&store.delete(stored, &ns, name, &pre)?)))
        }
        _ => Err(ApiError::method_not_allowed(method.as_str(), &path)),
    }
}
