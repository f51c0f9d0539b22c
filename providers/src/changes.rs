//! A plan: the cloud changes an ensure or a delete would make, found without making them.
//!
//! Every provider answers [`crate::Provider::plan`] and [`crate::Provider::plan_delete`] with
//! reads only. `hawser-operator plan`, the controller's `--dry-run` and `audit` print it.

use std::fmt;

use serde::Serialize;

/// What a change does to one cloud resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The resource does not exist and would be created.
    Create,
    /// The resource would be changed in place; traffic keeps flowing.
    Update,
    /// The resource cannot be changed in place: it would be deleted and created again, and
    /// traffic through it stops meanwhile.
    Replace,
    /// The resource would be deleted.
    Delete,
}

impl Action {
    /// The word a person reads: `create`, `update`, `replace`, `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Replace => "replace",
            Self::Delete => "delete",
        }
    }

    /// The one-character mark of the text output (`+`, `~`, `!`, `-`).
    pub fn mark(self) -> char {
        match self {
            Self::Create => '+',
            Self::Update => '~',
            Self::Replace => '!',
            Self::Delete => '-',
        }
    }
}

/// One field of a resource that would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// The field, as the cloud names it (e.g. `scheme`, `healthCheck.path`, `targets`).
    pub field: String,
    /// What the cloud holds now (`None`: not set).
    pub old: Option<String>,
    /// What it would hold (`None`: removed).
    pub new: Option<String>,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".to_owned());
        write!(f, "{}: {} → {}", self.field, show(&self.old), show(&self.new))
    }
}

/// One cloud resource that would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// What would happen to it.
    pub action: Action,
    /// Its kind, in the cloud's words (`load balancer`, `target group`, `forwarding rule`, …).
    pub kind: String,
    /// Its name or ID (for one not yet created: the name it would get).
    pub name: String,
    /// The fields that would change (for an update or a replacement).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// Why, when the fields alone do not say (e.g. why a resource must be replaced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Change {
    /// A change of `action` to the `kind` named `name`.
    pub fn new(action: Action, kind: impl Into<String>, name: impl Into<String>) -> Self {
        Self { action, kind: kind.into(), name: name.into(), fields: Vec::new(), reason: None }
    }

    /// Adds a field that changes from `old` to `new`.
    #[must_use]
    pub fn field(mut self, field: impl Into<String>, old: Option<String>, new: Option<String>) -> Self {
        self.fields.push(FieldChange { field: field.into(), old, new });
        self
    }

    /// Adds why.
    #[must_use]
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// A resource that has the name hawser would give its own but is not hawser's: the change
/// stops there, and hawser never touches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// Its kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What is in the way and what to do.
    pub message: String,
}

/// The changes one ensure or delete would make, in the order it would make them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChangePlan {
    /// The changes.
    pub changes: Vec<Change>,
    /// Resources with hawser's name that hawser does not own; the real ensure would fail on
    /// the first of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
}

impl ChangePlan {
    /// Nothing would change and nothing is in the way.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.conflicts.is_empty()
    }

    /// Whether a change replaces a resource, so traffic stops while it is recreated.
    pub fn replaces(&self) -> bool {
        self.changes.iter().any(|c| c.action == Action::Replace)
    }

    /// Adds a change.
    pub fn push(&mut self, change: Change) {
        self.changes.push(change);
    }

    /// Adds a change when it changes any field.
    pub fn push_if_changed(&mut self, change: Change) {
        if !change.fields.is_empty() {
            self.changes.push(change);
        }
    }

    /// Records a same-named resource that is not ours.
    pub fn conflict(&mut self, kind: impl Into<String>, name: impl Into<String>, message: impl Into<String>) {
        self.conflicts.push(Conflict { kind: kind.into(), name: name.into(), message: message.into() });
    }

    /// How many changes of `action`.
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }

    /// One line: `2 to create, 1 to update, 1 to replace (downtime), 0 to delete`.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no changes".to_owned();
        }
        let mut parts = vec![
            format!("{} to create", self.count(Action::Create)),
            format!("{} to update", self.count(Action::Update)),
        ];
        if self.replaces() {
            parts.push(format!("{} to replace (traffic stops while it is recreated)", self.count(Action::Replace)));
        }
        parts.push(format!("{} to delete", self.count(Action::Delete)));
        if !self.conflicts.is_empty() {
            parts.push(format!("{} blocked by a resource hawser does not own", self.conflicts.len()));
        }
        parts.join(", ")
    }

    /// The fields that would change, as `kind name: field, field`; for the audit's `drifted`.
    pub fn changed_fields(&self) -> Vec<String> {
        self.changes
            .iter()
            .map(|c| {
                let what = format!("{} {}", c.kind, c.name);
                match c.action {
                    Action::Update | Action::Replace if !c.fields.is_empty() => {
                        format!("{what}: {}", c.fields.iter().map(|f| f.field.as_str()).collect::<Vec<_>>().join(", "))
                    }
                    Action::Create => format!("{what}: missing"),
                    Action::Delete => format!("{what}: not wanted"),
                    _ => what,
                }
            })
            .collect()
    }
}

impl fmt::Display for ChangePlan {
    /// The text form: one line per change, `+ create`, `~ update`, `! replace`, `- delete`,
    /// each changed field indented beneath.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.conflicts {
            writeln!(f, "  x blocked  {} {}: {}", c.kind, c.name, c.message)?;
        }
        for c in &self.changes {
            write!(f, "  {} {:<8} {} {}", c.action.mark(), c.action.as_str(), c.kind, c.name)?;
            if let Some(reason) = &c.reason {
                write!(f, " ({reason})")?;
            }
            writeln!(f)?;
            for field in &c.fields {
                writeln!(f, "        {field}")?;
            }
        }
        Ok(())
    }
}

/// `Some(value)` as a string; for [`Change::field`].
pub fn shown(value: impl fmt::Display) -> Option<String> {
    Some(value.to_string())
}

/// A list for a field: `a, b, c`, or `(none)` when empty.
pub fn listed<I, T>(items: I) -> Option<String>
where
    I: IntoIterator<Item = T>,
    T: fmt::Display,
{
    let all: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if all.is_empty() { None } else { Some(all.join(", ")) }
}

/// How many names a membership change shows before it says "and N more".
const SHOWN_MEMBERS: usize = 5;

/// A change of membership (targets, instances) as `(old, new)` for [`Change::field`]:
/// `3 nodes` → `4 nodes (+node-d)`. `None` when nothing changes.
pub fn membership<'a>(
    what: &str,
    old: impl IntoIterator<Item = &'a str>,
    new: impl IntoIterator<Item = &'a str>,
) -> Option<(Option<String>, Option<String>)> {
    let old: std::collections::BTreeSet<&str> = old.into_iter().collect();
    let new: std::collections::BTreeSet<&str> = new.into_iter().collect();
    if old == new {
        return None;
    }
    let mut moves: Vec<String> = new.difference(&old).map(|n| format!("+{n}")).collect();
    moves.extend(old.difference(&new).map(|n| format!("-{n}")));
    let more = moves.len().saturating_sub(SHOWN_MEMBERS);
    moves.truncate(SHOWN_MEMBERS);
    let mut detail = moves.join(", ");
    if more > 0 {
        detail.push_str(&format!(" and {more} more"));
    }
    Some((Some(format!("{} {what}", old.len())), Some(format!("{} {what} ({detail})", new.len()))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn text_marks_each_action_and_shows_old_and_new() {
        let mut plan = ChangePlan::default();
        plan.push(Change::new(Action::Create, "listener", "443/TCP"));
        plan.push(
            Change::new(Action::Replace, "load balancer", "hawser-abc")
                .field("scheme", shown("internet-facing"), shown("internal"))
                .because("the scheme cannot change in place"),
        );
        plan.push(Change::new(Action::Update, "health check", "hc").field("path", None, shown("/healthz")));
        plan.push(Change::new(Action::Delete, "target group", "tg-80"));
        let text = plan.to_string();
        assert!(text.contains("+ create   listener 443/TCP"), "{text}");
        assert!(text.contains("! replace  load balancer hawser-abc (the scheme cannot change in place)"), "{text}");
        assert!(text.contains("scheme: internet-facing → internal"), "{text}");
        assert!(text.contains("path: (none) → /healthz"), "{text}");
        assert!(text.contains("- delete   target group tg-80"), "{text}");
        assert!(plan.replaces());
        assert_eq!(
            plan.summary(),
            "1 to create, 1 to update, 1 to replace (traffic stops while it is recreated), 1 to delete"
        );
    }

    #[test]
    fn membership_shows_who_joins_and_leaves_and_caps_the_list() {
        assert_eq!(membership("nodes", ["a", "b"], ["b", "a"]), None);
        let (old, new) = membership("nodes", ["a", "b", "c"], ["a", "b", "d"]).unwrap();
        assert_eq!(old.as_deref(), Some("3 nodes"));
        assert_eq!(new.as_deref(), Some("3 nodes (+d, -c)"));
        let many: Vec<String> = (0..9).map(|i| format!("n{i}")).collect();
        let (_, new) = membership("nodes", [], many.iter().map(String::as_str)).unwrap();
        assert_eq!(new.as_deref(), Some("9 nodes (+n0, +n1, +n2, +n3, +n4 and 4 more)"));
    }

    #[test]
    fn an_empty_plan_says_so_and_a_conflict_is_not_empty() {
        let mut plan = ChangePlan::default();
        assert!(plan.is_empty());
        assert_eq!(plan.summary(), "no changes");
        plan.conflict("load balancer", "hawser-abc", "exists and is not ours");
        assert!(!plan.is_empty());
        assert!(plan.to_string().contains("x blocked  load balancer hawser-abc: exists and is not ours"));
    }

    #[test]
    fn changed_fields_name_what_drifted() {
        let mut plan = ChangePlan::default();
        plan.push(
            Change::new(Action::Update, "load balancer", "lb")
                .field("listeners", shown("80/TCP"), shown("8443/TCP"))
                .field("sourceRanges", None, shown("10.0.0.0/8")),
        );
        plan.push(Change::new(Action::Create, "listener", "8443/TCP"));
        assert_eq!(
            plan.changed_fields(),
            vec!["load balancer lb: listeners, sourceRanges".to_owned(), "listener 8443/TCP: missing".to_owned()]
        );
    }
}
