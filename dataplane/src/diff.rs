//! Element-wise difference between the applied and the desired ruleset, as one nft script
//! (pure). The script is applied as a single transaction, so it either fully happens or not.
//! Also the full resync: one atomic script, or, into a kernel without our tables, the ruleset
//! written in steps while it is rendered ([`Stepwise`]).
//!
//! Chains and sets that are no longer wanted are emptied (flushed, their map elements
//! removed) in the sync that drops them and deleted in a later sync: nft refuses to delete a
//! chain or map that is still referenced (EBUSY), and the rules of a rewritten `svc-…` chain
//! may still reference it until that transaction commits.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::mpsc::SyncSender;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crate::model::{Family, Protocol};
use crate::netlink::{Attrs, Batch};
use crate::nft::NftError;
use crate::render::{
    Chain, ENDPOINT_MAP_PREFIX, RenderConfig, Ruleset, Table, TableId, base_table, declared_endpoint_map,
    endpoint_map_bucket, endpoint_map_protocol, to_script, write_chain_decl, write_elements, write_rules,
};

/// Object that exists in the kernel but is no longer wanted, awaiting deletion.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stale {
    /// A chain.
    Chain(TableId, String),
    /// A set.
    Collection(TableId, String),
    /// A map.
    Map(TableId, String),
}

impl Stale {
    /// The table it is in.
    pub fn table(&self) -> TableId {
        match self {
            Self::Chain(id, _) | Self::Collection(id, _) | Self::Map(id, _) => *id,
        }
    }
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

/// Full resync: replace all our tables atomically, whatever the kernel holds now.
///
/// `add table` first makes `delete table` valid when the table does not exist. Dynamic
/// ClientIP affinity entries are lost on a full resync (at start and after a failure).
pub fn full_plan(desired: &Ruleset) -> Plan {
    let mut script = String::new();
    for id in desired.tables.keys() {
        let _ = writeln!(script, "add table {id}");
        let _ = writeln!(script, "delete table {id}");
    }
    script.push_str(&to_script(desired));
    Plan {
        script,
        stale_after: BTreeSet::new(),
        chains_written: desired.tables.values().map(|t| t.chains.len()).sum(),
        elements_changed: desired.element_count(),
    }
}

/// A full resync to write: one nft script replacing both tables atomically ([`FullSync::script`]).
/// Into a kernel with no table of ours, the agent's syncer writes it in steps instead, while it
/// renders it ([`Stepwise`]).
#[derive(Debug, Clone, Copy)]
pub struct FullSync<'a> {
    desired: &'a Ruleset,
}

impl<'a> FullSync<'a> {
    /// The full resync to `desired`.
    pub fn new(desired: &'a Ruleset) -> Self {
        Self { desired }
    }

    /// The atomic replacement, as [`full_plan`] writes it.
    pub fn script(&self) -> String {
        full_plan(self.desired).script
    }
}

/// A full resync into a kernel without our tables, written in steps while it is rendered, so
/// that the kernel takes in one part while the next is rendered and encoded:
/// 1. the [`Frame`] through `nft`, before the write starts (the agent writes it while the
///    initial lists load): tables, base chains and their rules, the shared sets and maps, and
///    one endpoint map per family and protocol, without elements;
/// 2. the `svc-…` chains ([`Stepwise::add`], as they are rendered) in netlink batches of
///    about `batch_bytes`, the first ones smaller so that the kernel does not wait for a whole
///    batch to be rendered while it has nothing to do; an endpoint map a chain uses that the
///    frame lacks is declared just before it, as the frame's map of its family and protocol
///    lists (the same declaration nft writes). Chains the encoder does not know, and the
///    other chains, are kept for step 4;
/// 3. the endpoint maps' elements, map by map, each after every rule that refers to its map:
///    a rule referring to a map checks each element the map holds, which costs far more than
///    an element added to a map checking each rule (measured: 0.3–0.4 s more at 10k
///    Services). A caller that adds the Services in order of their first endpoint map has
///    each map's elements written as soon as it moves past the map
///    ([`Stepwise::fill_maps_below`]), so the kernel takes them in while the rest renders;
///    otherwise they follow the last chain;
/// 4. the kept chains through `nft`;
/// 5. last, in one batch: the frame's endpoint maps that no Service port used, deleted, and
///    the dispatch maps' and the hairpin set's elements, which is what starts sending
///    traffic anywhere.
///
/// Until that last batch the tables match nothing, so traffic is treated as with no tables
/// at all, and a failure part-way leaves nothing that acts (the next full resync then
/// replaces the tables atomically). Steps are written in order on a thread of `scope`.
pub struct Stepwise<'scope> {
    to_writer: Option<SyncSender<Step>>,
    writer: Option<ScopedJoinHandle<'scope, Result<Duration, NftError>>>,
    batch: Batch,
    batch_bytes: usize,
    /// Size at which the batch being built is handed over: [`FIRST_BATCH_BYTES`], doubled at
    /// each batch up to `batch_bytes`.
    flush_at: usize,
    /// Endpoint maps declared (by the frame or a batch), with whether an element was added to
    /// them.
    declared: BTreeMap<(TableId, String), bool>,
    /// Declarations of endpoint maps, by family and protocol (see [`Frame::templates`]).
    templates: HashMap<(Family, String), Attrs>,
    /// Endpoint-map elements, written after every rule that refers to their map.
    elements: BTreeMap<(TableId, String), Vec<(String, String)>>,
    /// Whether every element written so far is one the encoder knows.
    encodable: bool,
    /// Script of the chains for step 4, and the chains it or the frame holds.
    kept: String,
    chains: HashSet<(TableId, String)>,
    written: Written,
}

/// What a [`Stepwise`] write wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Chains.
    pub chains: usize,
    /// Rules.
    pub rules: usize,
    /// Set and map elements.
    pub elements: usize,
    /// Time the writes took (the kernel's and nft's).
    pub write_time: Duration,
}

enum Step {
    Script(String),
    Batch(Batch),
}

/// Where the steps of a [`Stepwise`] write go.
pub trait StepWriter: Send + Sync {
    /// Runs an nft script, one transaction.
    fn script(&self, script: &str) -> Result<(), NftError>;
    /// Commits a netlink batch, one transaction.
    fn batch(&self, batch: &Batch) -> Result<(), NftError>;
    /// The declaration of set or map `name` of our table `table` as the kernel lists it
    /// ([`crate::netlink::listed_set`]); `None` when there is no such set, or the writer cannot
    /// list (the endpoint maps the frame lacks then go through nft).
    fn declaration(&self, table: TableId, name: &str) -> Result<Option<Attrs>, NftError> {
        let _ = (table, name);
        Ok(None)
    }
}

/// Our tables as a full sync written in steps ([`Stepwise`]) starts from, once written: the
/// skeleton ([`Frame::skeleton`], or one given), and the declarations of its endpoint maps as
/// the kernel lists them.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    chains: HashSet<(TableId, String)>,
    rules: usize,
    declared: Vec<(TableId, String)>,
    templates: HashMap<(Family, String), Attrs>,
}

impl Frame {
    /// Declarations of endpoint maps as the kernel lists them, by family and protocol.
    pub fn templates(&self) -> &HashMap<(Family, String), Attrs> {
        &self.templates
    }

    /// The tables before any Service: every base table, the first NAT table of each family
    /// with an empty endpoint map (of bucket 0) per protocol, the declaration the others are
    /// copied from.
    pub fn skeleton(config: &RenderConfig) -> Ruleset {
        let mut skeleton = Ruleset::default();
        for id in TableId::all() {
            let mut table = base_table(id, config);
            if id.index == 1 {
                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    let (name, map) = declared_endpoint_map(id.family, proto.nft_name(), 0);
                    table.collections.insert(name, map);
                }
            }
            skeleton.tables.insert(id, table);
        }
        skeleton
    }

    /// Writes `skeleton` (only adding: there is no table of ours to replace, and a `delete
    /// table` would have nft list every table first, and another proxy's may be large) through
    /// `writer`, one transaction, and lists the declarations of its endpoint maps.
    pub fn write(writer: &dyn StepWriter, skeleton: &Ruleset) -> Result<Self, NftError> {
        writer.script(&to_script(skeleton))?;
        let mut frame = Self::default();
        for (id, table) in &skeleton.tables {
            for name in table.collections.keys().filter(|name| !activates(name)) {
                frame.declared.push((*id, name.clone()));
                let Some(proto) = endpoint_map_protocol(name) else { continue };
                let key = (id.family, proto.to_string());
                if !frame.templates.contains_key(&key)
                    && let Some(decl) = writer.declaration(*id, name)?
                {
                    frame.templates.insert(key, decl);
                }
            }
            for (name, chain) in &table.chains {
                frame.chains.insert((*id, name.clone()));
                frame.rules += chain.rules.len();
            }
        }
        Ok(frame)
    }
}

/// Takes the fragments a sync renders, one Service and table at a time (see
/// [`crate::render::render_fragment`]).
pub trait FragmentSink {
    /// One Service's fragment of table `table`.
    fn add(&mut self, table: TableId, fragment: &Table);

    /// The same, given the fragment to keep.
    fn add_owned(&mut self, table: TableId, fragment: Table) {
        self.add(table, &fragment);
    }
}

impl FragmentSink for Stepwise<'_> {
    fn add(&mut self, table: TableId, fragment: &Table) {
        Stepwise::add(self, table, fragment);
    }
}

impl<'scope> Stepwise<'scope> {
    /// Starts the write on a thread of `scope`, over `frame`, which is in the kernel.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        writer: &'env dyn StepWriter,
        frame: Frame,
        batch_bytes: usize,
    ) -> Self {
        let (to_writer, steps) = std::sync::mpsc::sync_channel::<Step>(2);
        let handle = scope.spawn(move || {
            let mut took = Duration::ZERO;
            for step in steps.iter() {
                let t = Instant::now();
                match &step {
                    Step::Script(script) => writer.script(script)?,
                    Step::Batch(batch) => writer.batch(batch)?,
                }
                took += t.elapsed();
            }
            Ok(took)
        });
        let Frame { chains, rules, declared, templates } = frame;
        let written = Written { chains: chains.len(), rules, ..Written::default() };
        Self {
            to_writer: Some(to_writer),
            writer: Some(handle),
            batch: Batch::new(),
            batch_bytes,
            flush_at: FIRST_BATCH_BYTES.min(batch_bytes),
            declared: declared.into_iter().map(|key| (key, false)).collect(),
            templates,
            elements: BTreeMap::new(),
            encodable: true,
            kept: String::new(),
            chains,
            written,
        }
    }

    /// Adds the chains and endpoint-map elements of `table` (one Service's, or a whole
    /// ruleset's), leaving out what the frame or an earlier call had. Elements of the
    /// dispatch maps and the hairpin set are left to [`Stepwise::finish`].
    pub fn add(&mut self, id: TableId, table: &Table) {
        // An endpoint map the frame lacks is declared as the frame's of its protocol was. A
        // Service whose map cannot be (no declaration to copy) is written through nft in step
        // 4, map declaration, chains and elements together.
        let mut undeclared = false;
        for name in table.collections.keys().filter(|name| !activates(name)) {
            let key = (id, name.clone());
            if self.declared.contains_key(&key) {
                continue;
            }
            match endpoint_map_protocol(name).and_then(|proto| self.templates.get(&(id.family, proto.to_string()))) {
                Some(decl) => {
                    self.batch.new_set(id, name, decl);
                    self.declared.insert(key, false);
                }
                None => undeclared = true,
            }
        }
        if undeclared {
            for (name, c) in table.collections.iter().filter(|(name, _)| !activates(name)) {
                let kind = if c.is_map { "map" } else { "set" };
                let _ = writeln!(self.kept, "add {kind} {id} {name} {{ {} }}", c.decl);
            }
        }
        for (name, chain) in &table.chains {
            if !self.chains.insert((id, name.clone())) {
                continue;
            }
            self.written.chains += 1;
            self.written.rules += chain.rules.len();
            if undeclared || !is_service_chain(name, chain) || !self.batch.add_chain(id, name, &chain.rules) {
                write_chain_decl(&mut self.kept, id, name, chain);
                write_rules(&mut self.kept, id, name, chain);
            }
            self.flush(false);
        }
        for (name, c) in table.collections.iter().filter(|(name, c)| !activates(name) && !c.elements.is_empty()) {
            self.written.elements += c.elements.len();
            let key = (id, name.clone());
            if let Some(used) = self.declared.get_mut(&key) {
                *used = true;
            }
            if undeclared {
                write_elements(&mut self.kept, "add", id, name, c.elements.iter());
            } else {
                self.elements.entry(key).or_default().extend(c.elements.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
    }

    /// Writes the elements of the endpoint maps of buckets below `bucket` now, rather than
    /// after every rule: the caller adds no rule that refers to them from here on (it adds
    /// the Services in order of the first bucket their ports use), and the kernel takes them
    /// in while the rest is rendered.
    pub fn fill_maps_below(&mut self, bucket: u32) {
        let filled: Vec<(TableId, String)> = self
            .elements
            .keys()
            .filter(|(_, name)| endpoint_map_bucket(name).is_some_and(|b| b < bucket))
            .cloned()
            .collect();
        for key in filled {
            if let Some(elements) = self.elements.remove(&key) {
                self.write_elements(key, &elements);
            }
        }
    }

    fn write_elements(&mut self, (id, name): (TableId, String), elements: &[(String, String)]) {
        for chunk in elements.chunks(ELEMENTS_PER_STEP) {
            self.encodable &= self.batch.elements(id, &name, true, chunk.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            self.flush(false);
        }
    }

    /// Writes steps 3 to 5, `activating` being the dispatch maps' and the hairpin set's
    /// elements (table, collection, key, value), and waits for the writes. `Ok(None)` when an
    /// element is one the encoder does not know: the tables are then part-written, and match
    /// nothing.
    pub fn finish<'a>(
        mut self,
        activating: impl Iterator<Item = (TableId, &'a str, &'a str, &'a str)>,
    ) -> Result<Option<Written>, NftError> {
        for (key, elements) in std::mem::take(&mut self.elements) {
            self.write_elements(key, &elements);
        }
        let mut encodable = self.encodable;
        self.flush(true);
        if !self.kept.is_empty() {
            let kept = std::mem::take(&mut self.kept);
            self.send(Step::Script(kept));
        }
        let mut last = Batch::new();
        // The frame's endpoint maps no port used (none of those declared since).
        for (id, name) in self.declared.iter().filter(|(_, used)| !**used).map(|(k, _)| k) {
            last.delete_set(*id, name);
        }
        let mut grouped: BTreeMap<(TableId, &str), Vec<(&str, &str)>> = BTreeMap::new();
        for (id, name, key, value) in activating {
            grouped.entry((id, name)).or_default().push((key, value));
        }
        for ((id, name), elements) in grouped {
            self.written.elements += elements.len();
            encodable &= last.elements(id, name, true, elements.into_iter());
        }
        if encodable {
            self.send(Step::Batch(last));
        }
        drop(self.to_writer.take());
        let took = self.writer.take().map_or(Ok(Duration::ZERO), |w| w.join().unwrap_or_else(|_| Err(panicked())))?;
        Ok(encodable.then_some(Written { write_time: took, ..self.written }))
    }

    /// Hands the batch to the writer once it is about `flush_at` (or when `force`d).
    fn flush(&mut self, force: bool) {
        if (force || self.batch.len() >= self.flush_at) && !self.batch.is_empty() {
            self.flush_at = (self.flush_at * 2).min(self.batch_bytes);
            let batch = std::mem::take(&mut self.batch);
            self.send(Step::Batch(batch));
        }
    }

    fn send(&self, step: Step) {
        if let Some(to_writer) = &self.to_writer {
            // A closed channel means the writer stopped on an error, which `finish` returns.
            let _ = to_writer.send(step);
        }
    }
}

/// Bytes of one netlink batch of a full sync written in steps: large enough that the kernel's fixed cost
/// per transaction does not matter, small enough to encode the next while it is written.
pub const SPLIT_BATCH_BYTES: usize = 1 << 20;

/// Bytes of the first batch of a [`Stepwise`] write: the kernel starts on the chains about
/// 5 ms after the rendering does, rather than 35 ms (a 1 MiB batch at 10k Services).
const FIRST_BATCH_BYTES: usize = 128 << 10;

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
    !name.starts_with(ENDPOINT_MAP_PREFIX)
}

fn panicked() -> NftError {
    NftError::Spawn { program: "nfnetlink".into(), source: std::io::Error::other("the netlink writer panicked") }
}

/// Script deleting our tables (`--cleanup`).
pub fn cleanup_script() -> String {
    let mut script = String::new();
    for id in TableId::all() {
        let _ = writeln!(script, "add table {id}");
        let _ = writeln!(script, "delete table {id}");
    }
    script
}

/// Partial sync from `applied` to `desired`; `stale` are objects emptied by earlier plans.
pub fn partial_plan(applied: &Ruleset, stale: &BTreeSet<Stale>, desired: &Ruleset) -> Plan {
    let mut plan = Plan::default();
    let empty = Table::default();
    for (id, want) in &desired.tables {
        let have = applied.tables.get(id).unwrap_or(&empty);
        diff_table(&mut plan, *id, have, want, stale);
    }
    plan
}

fn diff_table(plan: &mut Plan, id: TableId, have: &Table, want: &Table, stale: &BTreeSet<Stale>) {
    let out = &mut plan.script;

    // 1. New sets/maps (a changed declaration gets a new name by construction: the affinity
    //    timeout is part of the set name).
    for (name, c) in &want.collections {
        if !have.collections.contains_key(name) {
            let kind = if c.is_map { "map" } else { "set" };
            let _ = writeln!(out, "add {kind} {id} {name} {{ {} }}", c.decl);
        }
    }
    // 2. New chains are declared before any rule refers to them.
    for (name, chain) in &want.chains {
        if !have.chains.contains_key(name) {
            write_chain_decl(out, id, name, chain);
        }
    }
    // 3. Rewrite chains whose rules changed; fill new ones.
    for (name, chain) in &want.chains {
        match have.chains.get(name) {
            Some(old) if old == chain => {}
            Some(_) => {
                let _ = writeln!(out, "flush chain {id} {name}");
                write_rules(out, id, name, chain);
                plan.chains_written += 1;
            }
            None => {
                write_rules(out, id, name, chain);
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
        write_elements(out, "delete", id, name, removed.into_iter());
        write_elements(out, "add", id, name, added.into_iter());
    }
    // 5. Empty what is no longer wanted; it is deleted by the next plan.
    for (name, c) in &have.collections {
        if !want.collections.contains_key(name) {
            if c.is_map && !c.elements.is_empty() {
                let _ = writeln!(out, "flush map {id} {name}");
            }
            plan.stale_after.insert(if c.is_map {
                Stale::Map(id, name.clone())
            } else {
                Stale::Collection(id, name.clone())
            });
        }
    }
    for name in have.chains.keys() {
        if !want.chains.contains_key(name) {
            let _ = writeln!(out, "flush chain {id} {name}");
            plan.stale_after.insert(Stale::Chain(id, name.clone()));
        }
    }
    // 6. Delete what earlier plans emptied, unless it is wanted again (then it was re-added,
    //    empty, in steps 1-3, and `add` of an existing object is a no-op). Chains first: an
    //    affinity set is referenced by its endpoint chain's rules until those are gone.
    for s in stale {
        if let Stale::Chain(f, name) = s
            && *f == id
            && !want.chains.contains_key(name)
        {
            let _ = writeln!(out, "delete chain {id} {name}");
        }
    }
    for s in stale {
        let (f, name, kind) = match s {
            Stale::Chain(..) => continue,
            Stale::Collection(f, name) => (f, name, "set"),
            Stale::Map(f, name) => (f, name, "map"),
        };
        if *f == id && !want.collections.contains_key(name) {
            let _ = writeln!(out, "delete {kind} {id} {name}");
        }
    }
}
