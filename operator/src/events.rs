//! Events on Services (`events.k8s.io/v1`), with repeats folded into a series.
//!
//! kube-runtime's `Recorder` keeps every Event it published for six minutes and scans all of
//! them on every publish: at 10k Services that is 20k cached Events and a quadratic scan while
//! they are provisioned. This publisher remembers only what a repeat needs (the Event's name and
//! its count), and forgets old entries in amortised constant time.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// A repeat within this long counts up the earlier Event's series instead of making a new one.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// Entries kept before old ones are dropped.
const REMEMBERED: usize = 4096;
/// The apiserver refuses an Event whose note is longer than this many bytes.
const NOTE_LIMIT: usize = 1024;

/// `note`, cut at a character boundary so that the apiserver accepts it.
fn within_limit(note: &str) -> String {
    if note.len() <= NOTE_LIMIT {
        return note.to_owned();
    }
    let mut end = NOTE_LIMIT - "…".len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// Something the user may like to know.
    Normal,
    /// Something the user should act on.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// One Event to publish.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Note<'a> {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason, e.g. `EnsuredLoadBalancer`.
    pub reason: &'a str,
    /// What hawser was doing, e.g. `Ensure`.
    pub action: &'a str,
    /// The message.
    pub note: &'a str,
}

#[derive(Debug)]
struct Published {
    namespace: String,
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes Events as `controller` (and `instance`, the pod).
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<HashMap<u64, Published>>,
}

impl EventPublisher {
    /// A publisher for `controller`, running as `instance` (defaults to the controller).
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            recent: Mutex::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Published>> {
        // Only a dedup cache: a poisoned one is still usable.
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes `note` about `regarding`; a repeat within the series window counts up the
    /// earlier Event.
    pub async fn publish(&self, note: &Note<'_>, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let key = {
            let mut h = std::hash::DefaultHasher::new();
            (note, &regarding.uid, &regarding.namespace, &regarding.name).hash(&mut h);
            h.finish()
        };
        let now = Timestamp::now();
        let repeat = self.recent().get(&key).and_then(|p| {
            let fresh = now.duration_since(p.last).unsigned_abs() < SERIES_WINDOW;
            fresh.then(|| (p.namespace.clone(), p.name.clone(), p.count + 1))
        });
        if let Some((namespace, name, count)) = repeat {
            let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
            let series = serde_json::json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&series)).await {
                Ok(_) => {
                    self.remember(key, Published { namespace, name, count, last: now });
                    return Ok(());
                }
                // Expired or deleted meanwhile: start a new Event.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let name = format!("{}.{:x}", regarding.name.as_deref().unwrap_or(&self.controller), now.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(note.action.to_owned()),
            reason: Some(note.reason.to_owned()),
            note: Some(within_limit(note.note)),
            type_: Some(note.type_.as_str().to_owned()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace).create(&PostParams::default(), &event).await?;
        self.remember(key, Published { namespace, name, count: 1, last: now });
        Ok(())
    }

    fn remember(&self, key: u64, published: Published) {
        let mut recent = self.recent();
        if recent.len() >= REMEMBERED && !recent.contains_key(&key) {
            let now = published.last;
            recent.retain(|_, p| now.duration_since(p.last).unsigned_abs() < SERIES_WINDOW);
            // Still full of fresh entries (a burst): forget them all rather than scan again at
            // the next publish; the worst case is one Event too many instead of a series.
            if recent.len() >= REMEMBERED / 2 {
                recent.clear();
            }
        }
        recent.insert(key, published);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_note_is_cut_to_what_the_apiserver_accepts() {
        assert_eq!(within_limit("short"), "short");
        let long = "é".repeat(2000);
        let cut = within_limit(&long);
        assert!(cut.len() <= NOTE_LIMIT && cut.ends_with('…'), "{}", cut.len());
    }

    #[tokio::test]
    async fn what_is_remembered_stays_bounded_at_any_number_of_services() {
        let (api, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let events = EventPublisher::new(Client::new(api, "default"), "hawser-operator", None);
        let now = Timestamp::now();
        for key in 0..20_000u64 {
            let published =
                Published { namespace: "default".into(), name: format!("svc-{key}.1"), count: 1, last: now };
            events.remember(key, published);
            assert!(events.recent().len() <= REMEMBERED, "{} remembered after {key}", events.recent().len());
        }
        let stale = now.checked_sub(jiff::SignedDuration::from_secs(3600)).unwrap_or(now);
        events.recent().values_mut().for_each(|p| p.last = stale);
        events.remember(u64::MAX, Published { namespace: "d".into(), name: "n".into(), count: 1, last: now });
        assert!(events.recent().len() < REMEMBERED, "stale entries are dropped first");
    }
}
