//! Element-wise difference between the applied and the desired ruleset, as one nft script
//! (pure). The script is applied as a single transaction, so it either fully happens or not.
//!
//! Chains and sets that are no longer wanted are emptied (flushed, their map elements
//! removed) in the sync that drops them and deleted in a later sync: nft refuses to delete a
//! chain or map that is still referenced (EBUSY), and the rules of a rewritten `svc-…` chain
//! may still reference it until that transaction commits.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::model::Family;
use crate::netlink::Batch;
use crate::nft::NftError;
use crate::render::{
    Chain, Ruleset, TABLE, Table, family_name, to_script, write_chain_decl, write_elements, write_rules,
};

/// Object that exists in the kernel but is no longer wanted, awaiting deletion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stale {
    /// A chain.
    Chain(Family, String),
    /// A set.
    Collection(Family, String),
    /// A map.
    Map(Family, String),
}

/// A transaction to run and what it leaves behind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The nft script (empty when nothing changes).
    pub script: String,
    /// Objects emptied by this plan, to delete in a later one.
    pub stale_after: BTreeSet<Stale>,
    /// Chains created or rewritten.
    pub chains_written: usize,
    /// Elements added or removed.
    pub elements_changed: usize,
}

impl Plan {
    /// Whether the plan does nothing.
    pub fn is_empty(&self) -> bool {
        self.script.is_empty()
    }
}

/// Full resync: replace both tables atomically, whatever the kernel holds now.
///
/// `add table` first makes `delete table` valid when the table does not exist. Dynamic
/// ClientIP affinity entries are lost on a full resync (at start and after a failure).
pub fn full_plan(desired: &Ruleset) -> Plan {
    let mut script = String::new();
    for family in desired.tables.keys() {
        let fam = family_name(*family);
        let _ = writeln!(script, "add table {fam} {TABLE}");
        let _ = writeln!(script, "delete table {fam} {TABLE}");
    }
    script.push_str(&to_script(desired));
    Plan {
        script,
        stale_after: BTreeSet::new(),
        chains_written: desired.tables.values().map(|t| t.chains.len()).sum(),
        elements_changed: desired.element_count(),
    }
}

/// A full resync to write: one nft script replacing both tables atomically ([`FullSync::script`]),
/// or, when the kernel has no table of ours to replace, the same ruleset written in steps
/// ([`FullSync::write_split`]).
#[derive(Debug, Clone, Copy)]
pub struct FullSync<'a> {
    desired: &'a Ruleset,
    batch_bytes: usize,
}

impl<'a> FullSync<'a> {
    /// The full resync to `desired`.
    pub fn new(desired: &'a Ruleset) -> Self {
        Self { desired, batch_bytes: SPLIT_BATCH_BYTES }
    }

    /// The same, with netlink batches of about `bytes` when split.
    pub fn with_batch_bytes(self, bytes: usize) -> Self {
        Self { batch_bytes: bytes, ..self }
    }

    /// The ruleset it writes.
    pub fn desired(&self) -> &'a Ruleset {
        self.desired
    }

    /// The atomic replacement, as [`full_plan`] writes it.
    pub fn script(&self) -> String {
        full_plan(self.desired).script
    }

    /// The skeleton as an nft script: tables, base chains, every chain but the `svc-…` ones
    /// with its rules, and every set and map declared, without elements.
    pub fn skeleton(&self) -> String {
        let mut skeleton = Ruleset::default();
        for (family, table) in &self.desired.tables {
            let mut t = Table::default();
            for (name, chain) in table.chains.iter().filter(|(name, chain)| !is_service_chain(name, chain)) {
                t.chains.insert(name.clone(), chain.clone());
            }
            for (name, c) in &table.collections {
                t.collections.insert(name.clone(), c.clone_empty());
            }
            skeleton.tables.insert(*family, t);
        }
        full_plan(&skeleton).script
    }

    /// Writes the ruleset into a kernel that has neither of our tables, in several
    /// transactions: the [skeleton](Self::skeleton) through `nft`; the `svc-…` chains and the
    /// endpoint maps' elements in netlink batches of about [`SPLIT_BATCH_BYTES`], which
    /// `commit` writes on a second thread while the next is encoded; `svc-…` chains the
    /// encoder does not know through `nft`; last, the dispatch maps' and the hairpin set's
    /// elements in one batch, which is what starts sending traffic anywhere.
    ///
    /// Until that last batch the tables match nothing, so traffic is treated as with no tables
    /// at all, and a failure part-way leaves nothing that acts (the next full resync then
    /// replaces the tables atomically). `Ok(false)`, having written part of the tables, when an
    /// element is one the encoder does not know: the caller then replaces them with
    /// [`FullSync::script`].
    pub fn write_split(
        &self,
        nft: &dyn Fn(&str) -> Result<(), NftError>,
        commit: &(dyn Fn(&Batch) -> Result<(), NftError> + Sync),
    ) -> Result<bool, NftError> {
        nft(&self.skeleton())?;
        let mut unknown = String::new();
        let mut encodable = true;
        let (to_committer, batches) = std::sync::mpsc::sync_channel::<Batch>(2);
        let committed = std::thread::scope(|scope| {
            let committer = scope.spawn(move || batches.iter().try_for_each(|b| commit(&b)));
            let mut batch = Batch::new();
            let send = |batch: &mut Batch, force: bool| {
                if (force || batch.len() >= self.batch_bytes) && !batch.is_empty() {
                    // A closed channel means the committer stopped on an error, returned below.
                    let _ = to_committer.send(std::mem::take(batch));
                }
            };
            for (family, table) in &self.desired.tables {
                let fam = family_name(*family);
                for (name, chain) in table.chains.iter().filter(|(name, chain)| is_service_chain(name, chain)) {
                    if !batch.add_chain(*family, name, &chain.rules) {
                        write_chain_decl(&mut unknown, fam, name, chain);
                        write_rules(&mut unknown, fam, name, chain);
                    }
                    send(&mut batch, false);
                }
                for (name, c) in table.collections.iter().filter(|(name, _)| !activates(name)) {
                    for chunk in c.elements.iter().collect::<Vec<_>>().chunks(ELEMENTS_PER_STEP) {
                        encodable &=
                            batch.elements(*family, name, true, chunk.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                        send(&mut batch, false);
                    }
                }
            }
            send(&mut batch, true);
            drop(to_committer);
            committer.join().unwrap_or_else(|_| Err(panicked()))
        });
        committed?;
        if !unknown.is_empty() {
            nft(&unknown)?;
        }
        let mut last = Batch::new();
        for (family, table) in &self.desired.tables {
            for (name, c) in table.collections.iter().filter(|(name, c)| activates(name) && !c.elements.is_empty()) {
                encodable &=
                    last.elements(*family, name, true, c.elements.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            }
        }
        if !encodable {
            return Ok(false);
        }
        commit(&last)?;
        Ok(true)
    }
}

/// Bytes of one netlink batch of a split full sync: large enough that the kernel's fixed cost
/// per transaction does not matter, small enough to encode the next while it is written.
pub const SPLIT_BATCH_BYTES: usize = 1 << 20;

/// Elements encoded between two checks of the batch's size.
const ELEMENTS_PER_STEP: usize = 4096;

/// A `svc-…` chain (regular, a Service port's DNAT), which the netlink encoder may write.
fn is_service_chain(name: &str, chain: &Chain) -> bool {
    chain.base.is_none() && name.starts_with("svc-")
}

/// Whether elements of the collection `name` send traffic somewhere (the dispatch maps) or
/// change how it leaves (the hairpin set), rather than only being read by chains that nothing
/// reaches yet.
fn activates(name: &str) -> bool {
    !name.starts_with("endpoints-")
}

fn panicked() -> NftError {
    NftError::Spawn { program: "nfnetlink".into(), source: std::io::Error::other("the netlink writer panicked") }
}

/// Script deleting our tables (`--cleanup`).
pub fn cleanup_script() -> String {
    let mut script = String::new();
    for family in [Family::V4, Family::V6] {
        let fam = family_name(family);
        let _ = writeln!(script, "add table {fam} {TABLE}");
        let _ = writeln!(script, "delete table {fam} {TABLE}");
    }
    script
}

/// Partial sync from `applied` to `desired`; `stale` are objects emptied by earlier plans.
pub fn partial_plan(applied: &Ruleset, stale: &BTreeSet<Stale>, desired: &Ruleset) -> Plan {
    let mut plan = Plan::default();
    let empty = Table::default();
    for (family, want) in &desired.tables {
        let have = applied.tables.get(family).unwrap_or(&empty);
        diff_table(&mut plan, *family, have, want, stale);
    }
    plan
}

fn diff_table(plan: &mut Plan, family: Family, have: &Table, want: &Table, stale: &BTreeSet<Stale>) {
    let fam = family_name(family);
    let out = &mut plan.script;

    // 1. New sets/maps (a changed declaration gets a new name by construction: the affinity
    //    timeout is part of the set name).
    for (name, c) in &want.collections {
        if !have.collections.contains_key(name) {
            let kind = if c.is_map { "map" } else { "set" };
            let _ = writeln!(out, "add {kind} {fam} {TABLE} {name} {{ {} }}", c.decl);
        }
    }
    // 2. New chains are declared before any rule refers to them.
    for (name, chain) in &want.chains {
        if !have.chains.contains_key(name) {
            write_chain_decl(out, fam, name, chain);
        }
    }
    // 3. Rewrite chains whose rules changed; fill new ones.
    for (name, chain) in &want.chains {
        match have.chains.get(name) {
            Some(old) if old == chain => {}
            Some(_) => {
                let _ = writeln!(out, "flush chain {fam} {TABLE} {name}");
                write_rules(out, fam, name, chain);
                plan.chains_written += 1;
            }
            None => {
                write_rules(out, fam, name, chain);
                plan.chains_written += 1;
            }
        }
    }
    // 4. Map and set elements, element-wise. A changed value is delete + add.
    for (name, c) in &want.collections {
        let old = have.collections.get(name);
        let removed: Vec<(&String, &String)> =
            old.into_iter().flat_map(|o| o.elements.iter()).filter(|(k, v)| c.elements.get(*k) != Some(*v)).collect();
        let added: Vec<(&String, &String)> =
            c.elements.iter().filter(|(k, v)| old.and_then(|o| o.elements.get(*k)) != Some(*v)).collect();
        plan.elements_changed += removed.len() + added.len();
        write_elements(out, "delete", fam, name, removed.into_iter());
        write_elements(out, "add", fam, name, added.into_iter());
    }
    // 5. Empty what is no longer wanted; it is deleted by the next plan.
    for (name, c) in &have.collections {
        if !want.collections.contains_key(name) {
            if c.is_map && !c.elements.is_empty() {
                let _ = writeln!(out, "flush map {fam} {TABLE} {name}");
            }
            plan.stale_after.insert(if c.is_map {
                Stale::Map(family, name.clone())
            } else {
                Stale::Collection(family, name.clone())
            });
        }
    }
    for name in have.chains.keys() {
        if !want.chains.contains_key(name) {
            let _ = writeln!(out, "flush chain {fam} {TABLE} {name}");
            plan.stale_after.insert(Stale::Chain(family, name.clone()));
        }
    }
    // 6. Delete what earlier plans emptied, unless it is wanted again (then it was re-added,
    //    empty, in steps 1-3, and `add` of an existing object is a no-op). Chains first: an
    //    affinity set is referenced by its endpoint chain's rules until those are gone.
    for s in stale {
        if let Stale::Chain(f, name) = s
            && *f == family
            && !want.chains.contains_key(name)
        {
            let _ = writeln!(out, "delete chain {fam} {TABLE} {name}");
        }
    }
    for s in stale {
        let (f, name, kind) = match s {
            Stale::Chain(..) => continue,
            Stale::Collection(f, name) => (f, name, "set"),
            Stale::Map(f, name) => (f, name, "map"),
        };
        if *f == family && !want.collections.contains_key(name) {
            let _ = writeln!(out, "delete {kind} {fam} {TABLE} {name}");
        }
    }
}
