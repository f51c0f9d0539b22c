//! Adopting the tables the kernel holds: a full resync over existing tables (an agent
//! restarted over the tables it left, the periodic resync, the repair after a failure) lists
//! them over netlink and writes only what differs from what it wants, in one netlink
//! transaction. Replacing them atomically through nft takes 1.5 s at 10k Services and resets
//! every ClientIP affinity entry; tables that already say what the agent wants get nothing
//! written, and their recorded clients stay.
//!
//! The tables are compared in two parts:
//! - **What the encoder writes** (`svc-…` chains, the elements of the dispatch, endpoint,
//!   hairpin and affinity-endpoint collections): each wanted rule and element is encoded as
//!   the kernel lists it ([`expected_rule`], [`known_element`]) and compared with the listing.
//!   A chain that differs is rewritten, elements that differ are deleted or added, chains and
//!   sets nobody wants any more are deleted, all in the one transaction.
//! - **The frame** (base chains and their hooks, the dispatch, filter, reject and affinity
//!   chains, every set's declaration): nft writes it into a check table of its own
//!   ([`CHECK_TABLE`], base chains without hooks, so it sees no packet), which is listed and
//!   compared with ours, anonymous sets by their content. A set our table lacks (a Service's
//!   first endpoint map) is declared in the transaction, as nft declared the check table's.
//!   Any other difference there (an upgrade that changed a rule's shape, another masquerade
//!   bit, a hand edit, a chain missing) or anything the encoder does not know makes the sync
//!   fall back to the atomic replacement.
//!
//! The endpoint-map slots the `svc-…` rules use are adopted too ([`Live::slots`]), so that a
//! Service keeps its keys and an unchanged table compares equal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use crate::diff::FragmentSink;
use crate::model::Family;
use crate::netlink::{
    Attrs, Batch, Hook, KernelRule, KnownElement, ListedSet, Netlink, endpoint_slot, expected_rule, known_element,
    listed_chain, listed_rule, listed_set,
};
use crate::nft::NftError;
use crate::render::{
    Chain, Collection, ENDPOINT_MAP_PREFIX, MIN_SLOT_CAPACITY, RenderConfig, Ruleset, SHARED_COLLECTIONS, Slot, Table,
    TableId, base_table,
};

/// The wanted ruleset of a full resync that adopts: the chains and declarations of every
/// table, and the elements of every collection the encoder knows, encoded as the kernel
/// lists them (less than half the memory of their text at 10k Services), sorted by key.
#[derive(Debug, Default)]
pub struct Desired {
    /// Chains, declarations, and the elements the encoder does not know.
    pub ruleset: Ruleset,
    /// The other elements, by table and collection, sorted.
    pub encoded: BTreeMap<(TableId, String), Vec<KnownElement>>,
}

impl Desired {
    /// Rules, and elements.
    pub fn counts(&self) -> (usize, usize) {
        let encoded: usize = self.encoded.values().map(Vec::len).sum();
        (self.ruleset.rule_count(), self.ruleset.element_count() + encoded)
    }
}

/// The wanted ruleset gathered from the fragments a full resync renders, rather than rendered
/// a second time: each base table, the fragments' chains and endpoint maps, and the
/// shared collections' elements as their owners decide ([`Gathered::finish`]). Elements are
/// encoded as they come, their text dropped.
#[derive(Debug, Default)]
pub struct Gathered {
    desired: Desired,
}

impl Gathered {
    /// Adds `elements` of `table`'s collection `name`: encoded, or as text when the encoder
    /// does not know them.
    fn elements(&mut self, table: TableId, name: &str, elements: impl Iterator<Item = (String, String)>) {
        let mut unknown = Vec::new();
        let encoded = self.desired.encoded.entry((table, name.to_string())).or_default();
        for (key, value) in elements {
            match known_element(table.family, name, &key, &value) {
                Some(element) => encoded.push(element),
                None => unknown.push((key, value)),
            }
        }
        if !unknown.is_empty() {
            let table = self.desired.ruleset.tables.entry(table).or_default();
            table.collections.entry(name.to_string()).or_default().elements.extend(unknown);
        }
    }

    /// The wanted ruleset, with the shared collections' elements (table, collection, key,
    /// value).
    pub fn finish<'a>(
        mut self,
        config: &RenderConfig,
        shared: impl Iterator<Item = (TableId, &'a str, &'a str, String)>,
    ) -> Desired {
        for (id, name, key, value) in shared {
            self.elements(id, name, std::iter::once((key.to_string(), value)));
        }
        let mut desired = self.desired;
        for id in TableId::all() {
            let mut table = base_table(id, config);
            let fragments = desired.ruleset.tables.remove(&id).unwrap_or_default();
            table.chains.extend(fragments.chains);
            for (name, c) in fragments.collections {
                let collection = table.collections.entry(name).or_insert_with(|| c.clone_empty());
                collection.elements.extend(c.elements);
            }
            desired.ruleset.tables.insert(id, table);
        }
        desired.encoded.retain(|_, elements| !elements.is_empty());
        desired.encoded.values_mut().for_each(|elements| elements.sort_unstable());
        desired
    }
}

impl FragmentSink for Gathered {
    fn add(&mut self, id: TableId, fragment: &Table) {
        self.add_owned(id, fragment.clone());
    }

    fn add_owned(&mut self, id: TableId, fragment: Table) {
        let table = self.desired.ruleset.tables.entry(id).or_default();
        for (name, chain) in fragment.chains {
            table.chains.entry(name).or_insert(chain);
        }
        for (name, c) in fragment.collections {
            if SHARED_COLLECTIONS.contains(&name.as_str()) {
                continue;
            }
            let Collection { decl, is_map, elements } = c;
            let table = self.desired.ruleset.tables.entry(id).or_default();
            table.collections.entry(name.clone()).or_insert(Collection { decl, is_map, elements: BTreeMap::new() });
            self.elements(id, &name, elements.into_iter());
        }
    }
}

/// One of our tables, or a check table, as the kernel lists it.
#[derive(Debug, Clone, Default)]
struct LiveTable {
    chains: BTreeMap<String, LiveChain>,
    /// Named sets and maps.
    sets: BTreeMap<String, ListedSet>,
}

#[derive(Debug, Clone, Default)]
struct LiveChain {
    hook: Option<Hook>,
    rules: Vec<KernelRule>,
}

impl LiveTable {
    /// Our table `id`, or its check table when `check`; `None` when it does not exist.
    /// Anonymous sets are named by their content in the rules that use them, so that two
    /// tables with the same rules compare equal whatever the kernel numbered their anonymous
    /// sets.
    fn list(netlink: &Netlink, id: TableId, check: bool) -> Result<Option<Self>, NftError> {
        // Base chains are asked for by name, for their hooks; the others are known by their
        // rules (an empty chain nothing refers to is left as it is). The check table's have
        // no hooks.
        let (family, table) = (id.family, if check { id.check_name() } else { id.name() });
        let skeleton = base_table(id, &RenderConfig::default());
        let base: Vec<&str> = if check {
            Vec::new()
        } else {
            skeleton.chains.iter().filter(|(_, c)| c.base.is_some()).map(|(n, _)| n.as_str()).collect()
        };
        let Some(listed) = netlink.list_table(family, table, &base)? else { return Ok(None) };
        let mut live = LiveTable::default();
        let mut anonymous: HashMap<String, Vec<u8>> = HashMap::new();
        for set in listed.sets.iter().filter_map(listed_set) {
            if set.anonymous {
                let mut content = b"anonymous ".to_vec();
                for (kind, value) in &set.decl {
                    content.extend_from_slice(&kind.to_be_bytes());
                    content.extend_from_slice(value);
                }
                let mut elements = netlink.list_elements(family, table, &set.name)?;
                elements.sort();
                for element in elements {
                    for (kind, value) in element {
                        content.extend_from_slice(&kind.to_be_bytes());
                        content.extend_from_slice(&value);
                    }
                }
                anonymous.insert(set.name.clone(), content);
            } else {
                live.sets.insert(set.name.clone(), set);
            }
        }
        for (name, hook) in listed.chains.iter().filter_map(listed_chain) {
            live.chains.insert(name, LiveChain { hook, rules: Vec::new() });
        }
        for (chain, rule) in listed.rules.iter().filter_map(|r| listed_rule(r, &anonymous)) {
            live.chains.entry(chain).or_default().rules.push(rule);
        }
        Ok(Some(live))
    }
}

/// All our tables as the kernel holds them: chains, rules, set declarations.
#[derive(Debug, Clone, Default)]
pub struct Live {
    tables: BTreeMap<TableId, LiveTable>,
}

/// The elements of the collections the adoption compares, by table and collection, sorted.
pub type Elements = BTreeMap<(TableId, String), Vec<KnownElement>>;

/// Lists the elements of `sets` ([`Live::element_sets`]).
pub fn list_elements(netlink: &Netlink, sets: &[(TableId, String)]) -> Result<Elements, NftError> {
    let mut all = Elements::new();
    for (id, name) in sets {
        if let Some(mut elements) = netlink.list_known_elements(*id, name)? {
            elements.sort_unstable();
            all.insert((*id, name.clone()), elements);
        }
    }
    Ok(all)
}

impl Live {
    /// Lists all our tables, without the sets' elements; `None` unless all exist.
    pub fn list(netlink: &Netlink) -> Result<Option<Self>, NftError> {
        let mut live = Live::default();
        for id in TableId::all() {
            let Some(table) = LiveTable::list(netlink, id, false)? else { return Ok(None) };
            live.tables.insert(id, table);
        }
        Ok(Some(live))
    }

    /// The sets and maps whose elements are compared: those the packet path does not fill.
    pub fn element_sets(&self) -> Vec<(TableId, String)> {
        let sets =
            self.tables.iter().flat_map(|(f, t)| t.sets.values().filter(|s| !s.dynamic).map(|s| (*f, s.name.clone())));
        sets.collect()
    }

    /// The endpoint-map slots the `svc-…` chains use: family, Service port
    /// (`NS/NAME/PROTO/PORT`) and slot, its capacity the least a slot for its endpoints has.
    pub fn slots(&self) -> Vec<(Family, String, Slot)> {
        let mut slots = Vec::new();
        for (id, table) in &self.tables {
            for (name, chain) in &table.chains {
                let Some(port) = name.strip_prefix("svc-") else { continue };
                let Some((map, modulus, offset)) = chain.rules.iter().find_map(endpoint_slot) else {
                    continue;
                };
                let Some(bucket) = map.rsplit_once('-').and_then(|(_, b)| u32::from_str_radix(b, 16).ok()) else {
                    continue;
                };
                let Some(capacity) = modulus.checked_next_power_of_two() else { continue };
                slots.push((
                    id.family,
                    port.to_string(),
                    Slot { bucket, offset, capacity: capacity.max(MIN_SLOT_CAPACITY) },
                ));
            }
        }
        slots
    }
}

/// The frames of `desired`'s tables as their check tables hold them ([`TableId::check`]):
/// every chain but the encoded ones, every collection's declaration.
fn frames(desired: &Ruleset) -> BTreeMap<TableId, Table> {
    let mut frames: BTreeMap<TableId, Table> = BTreeMap::new();
    for (id, table) in &desired.tables {
        let frame = frames.entry(id.check()).or_default();
        for (name, chain) in table.chains.iter().filter(|(n, c)| !encoded(n, c)) {
            frame.chains.entry(name.clone()).or_insert_with(|| chain.clone());
        }
        for (name, c) in &table.collections {
            frame.collections.entry(name.clone()).or_insert_with(|| c.clone_empty());
        }
    }
    frames
}

/// The check tables, of both families.
fn check_tables() -> impl Iterator<Item = TableId> {
    TableId::all().filter(|id| id.check() == *id)
}

/// The nft script writing the frames of `desired`'s tables (see the module's doc) into their
/// check tables ([`TableId::check`]), which must not exist. (A `delete table` in the script
/// would have nft list every table first, ours with their 10k chains included.)
pub fn check_script(desired: &Ruleset) -> String {
    let mut out = String::new();
    for (id, table) in &frames(desired) {
        let check = format!("{} {}", id.fam(), id.check_name());
        let _ = writeln!(out, "add table {check}");
        for (name, c) in checked_collections(table) {
            let kind = if c.is_map { "map" } else { "set" };
            let _ = writeln!(out, "add {kind} {check} {name} {{ {} }}", c.decl);
        }
        for name in table.chains.keys() {
            let _ = writeln!(out, "add chain {check} {name}");
        }
        for (name, chain) in &table.chains {
            for rule in &chain.rules {
                let _ = writeln!(out, "add rule {check} {name} {rule}");
            }
        }
    }
    out
}

/// The collections the check table declares: every one but the endpoint maps, of which one
/// per declaration stands for all (they differ only by name, and only the `svc-…` rules,
/// which the check table does not hold, refer to them).
fn checked_collections(table: &Table) -> impl Iterator<Item = (&String, &Collection)> {
    let mut seen = BTreeSet::new();
    table.collections.iter().filter(move |(name, c)| !name.starts_with(ENDPOINT_MAP_PREFIX) || seen.insert(&c.decl))
}

/// The collection of the check table (written from `frame`) whose declaration a collection
/// `name` declared `decl` must have.
fn checked_as<'a>(frame: &'a Table, decl: &str, name: &'a String) -> Option<&'a String> {
    if !name.starts_with(ENDPOINT_MAP_PREFIX) {
        return frame.collections.contains_key(name).then_some(name);
    }
    checked_collections(frame).find(|(n, c)| n.starts_with(ENDPOINT_MAP_PREFIX) && c.decl == decl).map(|(n, _)| n)
}

/// Deletes the check tables, where there are some (a failed adoption or a crash may have
/// left them).
pub fn delete_check_table(netlink: &Netlink) {
    let mut batch = Batch::new();
    for id in check_tables() {
        if netlink.has_table(id.family, id.check_name()).unwrap_or(true) {
            batch.delete_table(id.family, id.check_name());
        }
    }
    if !batch.is_empty() {
        let _ = netlink.commit(&batch);
    }
}

/// Lists the check tables nft wrote ([`check_script`]), by [`TableId::check`]; `None` unless
/// every one is there.
pub fn list_check(netlink: &Netlink) -> Result<Option<BTreeMap<TableId, LiveFrame>>, NftError> {
    let mut frames = BTreeMap::new();
    for id in check_tables() {
        let Some(table) = LiveTable::list(netlink, id, true)? else { return Ok(None) };
        frames.insert(id, LiveFrame(table));
    }
    Ok(Some(frames))
}

/// The frame as nft writes it, listed from the check table.
#[derive(Debug, Clone)]
pub struct LiveFrame(LiveTable);

/// Whether the chain is one the adoption compares rule by rule, as the encoder writes it: a
/// `svc-…` chain (one holding a rule the encoder does not know makes the adoption fall back).
fn encoded(name: &str, chain: &Chain) -> bool {
    chain.base.is_none() && name.starts_with("svc-")
}

/// The transaction bringing the kernel's tables to `desired`, and what it writes.
#[derive(Debug)]
pub struct Adoption {
    /// Everything that differs, in one transaction (empty when nothing does).
    pub batch: Batch,
    /// Chains created or rewritten.
    pub chains_written: usize,
    /// Elements added or deleted.
    pub elements_changed: usize,
}

/// What differs in the elements of the collections the adoption compares: by family and
/// collection, the keys to delete (a changed value is deleted, then added) and the elements to
/// add.
#[derive(Debug, Default)]
pub struct ElementDiff {
    collections: Vec<CollectionDiff>,
}

/// Table, collection, keys to delete, elements to add.
type CollectionDiff = (TableId, String, Vec<Vec<u8>>, Vec<KnownElement>);

/// Compares the elements the kernel holds (`elements`, of `live`'s collections) with those
/// `desired` wants; `Err` with the reason when one is not an element the encoder knows.
pub fn diff_elements(live: &Live, elements: &Elements, desired: &Desired) -> Result<ElementDiff, String> {
    let mut diff = ElementDiff::default();
    for (id, want) in &desired.ruleset.tables {
        let fam = id.to_string();
        let have = live.tables.get(id).ok_or_else(|| format!("no table {fam}"))?;
        for (name, collection) in &want.collections {
            if let Some(key) = collection.elements.keys().next() {
                return Err(format!("{fam}: set {name}: element {key} the encoder does not know"));
            }
            let wanted = desired.encoded.get(&(*id, name.clone())).map_or(&[][..], Vec::as_slice);
            if wanted.is_empty() && have.sets.get(name).is_none_or(|s| s.dynamic) {
                continue;
            }
            let listed = match (have.sets.get(name), elements.get(&(*id, name.clone()))) {
                (Some(set), _) if set.dynamic => continue,
                (Some(_), Some(listed)) => listed.as_slice(),
                // A set the adoption declares (see `plan`): it starts empty.
                (None, _) => &[],
                (Some(_), None) => return Err(format!("{fam}: set {name}: elements the encoder does not know")),
            };
            let (stale, missing) = walk(listed, wanted);
            if !stale.is_empty() || !missing.is_empty() {
                diff.collections.push((*id, name.clone(), stale, missing));
            }
        }
    }
    Ok(diff)
}

/// Walks the elements the kernel holds and those wanted, both sorted, side by side by key:
/// the keys to delete, and the elements to add.
fn walk(listed: &[KnownElement], wanted: &[KnownElement]) -> (Vec<Vec<u8>>, Vec<KnownElement>) {
    let (mut stale, mut missing) = (Vec::new(), Vec::new());
    let (mut have, mut want) = (listed.iter().peekable(), wanted.iter().peekable());
    loop {
        match (have.peek(), want.peek()) {
            (None, None) => break,
            (Some(h), Some(w)) if h.key() == w.key() => {
                if h != w {
                    stale.push(h.key().to_vec());
                    missing.push((*w).clone());
                }
                have.next();
                want.next();
            }
            (Some(h), Some(w)) if h.key() < w.key() => {
                stale.push(h.key().to_vec());
                have.next();
            }
            (Some(h), None) => {
                stale.push(h.key().to_vec());
                have.next();
            }
            (_, Some(w)) => {
                missing.push((*w).clone());
                want.next();
            }
        }
    }
    (stale, missing)
}

/// What the kernel (`live`) needs to hold `desired`, given what differs in the elements
/// ([`diff_elements`]) and the frame as nft writes it (`check`); `Err` with the reason when
/// only a replacement will do.
pub fn plan(
    live: &Live,
    elements: &ElementDiff,
    check: &BTreeMap<TableId, LiveFrame>,
    desired: &Ruleset,
) -> Result<Adoption, String> {
    let mut adoption = Adoption { batch: Batch::new(), chains_written: 0, elements_changed: 0 };
    let written = frames(desired);
    for (id, want) in &desired.tables {
        let have = live.tables.get(id).ok_or_else(|| format!("no table {id}"))?;
        let frame = &check.get(&id.check()).ok_or_else(|| format!("no check table for {id}"))?.0;
        let reference = written.get(&id.check()).ok_or_else(|| format!("no frame for {id}"))?;
        let missing = check_frame(have, frame, want, reference).map_err(|why| format!("{id}: {why}"))?;
        // Sets first: a Service whose endpoint map did not exist yet refers to it.
        for (name, decl) in missing {
            adoption.batch.new_set(*id, name, decl);
        }
        plan_table(&mut adoption, *id, elements, have, want).map_err(|why| format!("{id}: {why}"))?;
    }
    Ok(adoption)
}

/// The frame of our table is as nft writes it: every frame chain with its hook and rules,
/// every set's declaration. `written_from` is what the check table was written from.
fn check_frame<'a>(
    have: &LiveTable,
    frame: &'a LiveTable,
    want: &'a Table,
    written_from: &'a Table,
) -> Result<Missing<'a>, String> {
    let empty = LiveChain::default();
    for (name, chain) in want.chains.iter().filter(|(n, c)| !encoded(n, c)) {
        // Chains are known by their rules (base chains by name too): an empty one that is not
        // listed may be there or not, and nothing that is there can refer to one that is not.
        let live = match have.chains.get(name) {
            Some(live) => live,
            None if chain.rules.is_empty() && chain.base.is_none() => &empty,
            None => return Err(format!("chain {name} is missing, or has no rules")),
        };
        let hook = chain.base.as_deref().map(|b| parse_hook(b).ok_or_else(|| format!("base chain {name}: {b}")));
        if live.hook != hook.transpose()? {
            return Err(format!("chain {name} has another hook"));
        }
        let written = frame.chains.get(name).unwrap_or(&empty);
        if live.rules != written.rules {
            return Err(format!("chain {name} has other rules"));
        }
    }
    let mut reference: HashMap<&String, &String> = HashMap::new();
    let mut missing = Vec::new();
    for name in want.collections.keys() {
        let decl = &want.collections[name].decl;
        let checked = match reference.get(decl) {
            Some(checked) => *checked,
            None => {
                let checked =
                    checked_as(written_from, decl, name).ok_or_else(|| format!("set {name} is not checked"))?;
                reference.insert(decl, checked);
                checked
            }
        };
        let written = frame.sets.get(checked).ok_or_else(|| format!("set {checked} is not in the check table"))?;
        match have.sets.get(name) {
            Some(live) if live.decl != written.decl => return Err(format!("set {name} is declared otherwise")),
            Some(_) => {}
            // Declared as nft declared the check table's.
            None => missing.push((name, &written.decl)),
        }
    }
    Ok(missing)
}

/// Sets the kernel's table lacks, each with the declaration nft gave the check table's.
type Missing<'a> = Vec<(&'a String, &'a Attrs)>;

/// `type KIND hook HOOK priority PRIO; policy POLICY;`, as the renderer writes base chains.
fn parse_hook(base: &str) -> Option<Hook> {
    let words: Vec<&str> = base.split(|c: char| c.is_whitespace() || c == ';').filter(|w| !w.is_empty()).collect();
    let value = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
    let hook = match value("hook")? {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    };
    let policy = match value("policy").unwrap_or("accept") {
        "accept" => 1,
        "drop" => 0,
        _ => return None,
    };
    Some(Hook { kind: value("type")?.to_string(), hook, priority: value("priority")?.parse().ok()?, policy })
}

fn plan_table(
    adoption: &mut Adoption,
    id: TableId,
    elements: &ElementDiff,
    have: &LiveTable,
    want: &Table,
) -> Result<(), String> {
    // Chains the encoder writes: created, or rewritten when a rule differs.
    let mut write: Vec<(&String, &Chain)> = Vec::new();
    for (name, chain) in want.chains.iter().filter(|(n, c)| encoded(n, c)) {
        let expected: Vec<KernelRule> = chain
            .rules
            .iter()
            .map(|r| expected_rule(id.family, r))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("chain {name}: a rule the encoder does not know"))?;
        match have.chains.get(name) {
            Some(live) if live.hook.is_none() && live.rules == expected => {}
            Some(live) if live.hook.is_some() => return Err(format!("chain {name} is a base chain")),
            Some(_) => write.push((name, chain)),
            None => {
                adoption.batch.new_chain(id, name);
                write.push((name, chain));
            }
        }
    }
    // Elements that differ go first, then the chains are written, then elements are added.
    let collections = elements.collections.iter().filter(|(t, ..)| *t == id);
    for (_, name, stale, _) in collections.clone().filter(|(.., stale, _)| !stale.is_empty()) {
        adoption.elements_changed += stale.len();
        adoption.batch.delete_raw_elements(id, name, stale.iter().map(Vec::as_slice));
    }
    for (name, chain) in write {
        adoption.batch.flush_chain(id, name);
        for rule in &chain.rules {
            if !adoption.batch.add_rule(id, name, rule) {
                return Err(format!("chain {name}: a rule the encoder does not know"));
            }
        }
        adoption.chains_written += 1;
    }
    for (_, name, _, missing) in collections.filter(|(.., missing)| !missing.is_empty()) {
        adoption.elements_changed += missing.len();
        adoption.batch.known_elements(id, name, missing);
    }
    // What nobody wants any more: chains emptied, then deleted; sets after the rules using them.
    for name in have.chains.keys().filter(|n| !want.chains.contains_key(*n)) {
        adoption.batch.flush_chain(id, name);
        adoption.batch.delete_chain(id, name);
    }
    for name in have.sets.keys().filter(|n| !want.collections.contains_key(*n)) {
        adoption.batch.delete_set(id, name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_chains_are_read_as_the_kernel_lists_their_hooks() {
        assert_eq!(
            parse_hook("type nat hook postrouting priority 90; policy accept;"),
            Some(Hook { kind: "nat".into(), hook: 4, priority: 90, policy: 1 })
        );
        assert_eq!(
            parse_hook("type filter hook output priority -115; policy accept;"),
            Some(Hook { kind: "filter".into(), hook: 3, priority: -115, policy: 1 })
        );
        assert_eq!(parse_hook("type nat hook ingress priority 0;"), None);
    }

    #[test]
    fn elements_that_differ_are_deleted_and_added_and_equal_ones_stay() {
        let family = Family::V4;
        let map = "endpoints-tcp-01";
        let element = |k: &str, v: &str| known_element(family, map, k, v).unwrap_or_else(|| panic!("{k} : {v}"));
        let mut listed =
            vec![element("1", "10.0.0.1 . 80"), element("2", "10.0.0.2 . 80"), element("4", "10.0.0.4 . 80")];
        listed.sort();
        let mut wanted =
            vec![element("3", "10.0.0.3 . 80"), element("1", "10.0.0.1 . 80"), element("2", "10.0.0.9 . 80")];
        wanted.sort();
        let (stale, missing) = walk(&listed, &wanted);
        // Key 2 changed its value, key 4 is no longer wanted; key 3 is new.
        assert_eq!(stale, vec![2u32.to_ne_bytes().to_vec(), 4u32.to_ne_bytes().to_vec()]);
        assert_eq!(missing, vec![element("2", "10.0.0.9 . 80"), element("3", "10.0.0.3 . 80")]);
        assert_eq!(walk(&listed[..1], &wanted[..1]), (Vec::new(), Vec::new()), "equal: nothing to write");
    }

    #[test]
    fn encoded_elements_are_written_back_as_they_were_given() {
        let mut batch = Batch::new();
        let endpoint = known_element(Family::V4, "endpoints-tcp-01", "7", "10.0.0.7 . 8080");
        let dispatch = known_element(Family::V6, "service-addresses", "2001:db8::1 . tcp . 80", "goto svc-ns/a/tcp/80");
        let (endpoint, dispatch) = (endpoint.unwrap_or_else(|| panic!()), dispatch.unwrap_or_else(|| panic!()));
        let (v4, v6) = (TableId { family: Family::V4, index: 1 }, TableId { family: Family::V6, index: 2 });
        let mut text = Batch::new();
        assert!(text.elements(v4, "endpoints-tcp-01", true, [("7", "10.0.0.7 . 8080")].into_iter()));
        batch.known_elements(v4, "endpoints-tcp-01", &[endpoint]);
        assert_eq!(format!("{batch:?}"), format!("{text:?}"), "the same messages");
        let mut text = Batch::new();
        let element = ("2001:db8::1 . tcp . 80", "goto svc-ns/a/tcp/80");
        assert!(text.elements(v6, "service-addresses", true, [element].into_iter()));
        let mut batch = Batch::new();
        batch.known_elements(v6, "service-addresses", &[dispatch]);
        assert_eq!(format!("{batch:?}"), format!("{text:?}"), "the same messages");
    }

    #[test]
    fn the_check_table_declares_one_endpoint_map_per_declaration() {
        let decl = |d: &str| Collection { decl: d.into(), is_map: true, elements: BTreeMap::new() };
        let mut table = Table::default();
        table.collections.insert("endpoints-tcp-01".into(), decl("tcp"));
        table.collections.insert("endpoints-tcp-02".into(), decl("tcp"));
        table.collections.insert("endpoints-udp-01".into(), decl("udp"));
        table.collections.insert("service-addresses".into(), decl("verdict"));
        let checked: Vec<&String> = checked_collections(&table).map(|(n, _)| n).collect();
        assert_eq!(checked, ["endpoints-tcp-01", "endpoints-udp-01", "service-addresses"]);
        let name = "endpoints-tcp-02".to_string();
        assert_eq!(checked_as(&table, "tcp", &name).map(String::as_str), Some("endpoints-tcp-01"));
    }
}
