//! Incremental syncs: the programmed state is kept per Service, and a sync renders and diffs
//! only the Services that changed, against what each of them had programmed.
//!
//! A Service owns its `fw-`/`svc-` chains and its keys of the shared endpoint maps (its slot);
//! it shares the dispatch maps, the hairpin set and the ClientIP affinity sets and maps with the
//! others, so for those every element remembers which Services want it (several may, e.g. the
//! same endpoint behind two Services, or two Services claiming one address and port: the
//! greatest Service key wins, as in a full render), and the affinity recording chains count
//! the ports using them. A sync that takes an endpoint or a frontend away from affinity then
//! deletes the kernel's affinity entries that no longer hold. A full resync renders every kept
//! model; it is the only path whose cost grows with the cluster, and it runs at start, after a
//! failure and periodically.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use crate::adopt::{
    Adoption, Desired, ElementDiff, Gathered, Live, LiveFrame, check_script, delete_check_table, diff_elements,
    list_check, list_elements, plan,
};
use crate::affinity::AffinityEntry;
use crate::conntrack::{StaleFlow, stale_service_flows};
use crate::diff::{FragmentSink, Frame, FullSync, SPLIT_BATCH_BYTES, Stale, StepWriter, Stepwise};
use crate::health::HealthState;
use crate::inputs::Change;
use crate::model::{Family, Protocol, ServiceKey, ServiceModel};
use crate::netlink::{Attrs, Batch, Netlink};
use crate::nft::{NftError, NftRunner, SyncReport, Writer};
use crate::render::{
    AFFINITY_ADDRESSES, AFFINITY_ENDPOINTS, AFFINITY_MAPS, AFFINITY_NODEPORTS, AFFINITY_RECORD_PREFIX, AffinityMap,
    Chain, Collection, ENDPOINT_MAP_BUCKETS, FixedSlots, RenderConfig, Ruleset, SHARED_COLLECTIONS, Slot, SlotSource,
    SlotTable, Table, TableId, endpoint_map_protocol, first_endpoint_bucket, render_fragment, render_with_slots,
    write_chain_decl, write_elements, write_rules,
};

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// An element's value before the sync and after it (`None`: absent).
type ElementChange = (Option<String>, Option<String>);

/// An element of a shared collection: table, collection, key.
type SharedElement = (TableId, &'static str, String);
/// The Services wanting a shared element, with the value each wants.
type Owners = Vec<(Arc<ServiceKey>, String)>;

/// What the changed Services change in one table.
#[derive(Debug, Default)]
struct Delta {
    /// Chains: as programmed, as wanted.
    chains: BTreeMap<String, (Option<Chain>, Option<Chain>)>,
    /// A Service's own sets: declaration as programmed, as wanted.
    owned: BTreeMap<String, (Option<Collection>, Option<Collection>)>,
    /// Elements of shared collections by collection and key.
    elements: BTreeMap<String, BTreeMap<String, ElementChange>>,
    /// Endpoint maps touched: element count before the sync, declaration.
    maps: BTreeMap<String, (usize, String)>,
}

/// The Services' programmed state and the runner that applies changes to it.
pub struct Syncer<R> {
    runner: R,
    config: RenderConfig,
    models: BTreeMap<ServiceKey, ServiceModel>,
    slots: BTreeMap<Family, SlotTable>,
    /// Elements of the dispatch maps and the hairpin set, with the Services wanting them.
    shared: HashMap<SharedElement, Owners>,
    /// Element count of each endpoint map.
    map_sizes: HashMap<(TableId, String), usize>,
    /// How many Service ports use each affinity recording chain (shared, like the elements).
    record_chains: HashMap<(TableId, String), usize>,
    stale: BTreeSet<Stale>,
    full_next: bool,
    /// While adopting: the Service ports that asked for an endpoint-map slot.
    asked: Option<HashSet<(Family, String)>>,
    /// The tables' listing [`Syncer::prefetch`] started.
    prefetched: Option<std::thread::JoinHandle<Result<Option<Live>, NftError>>>,
    /// The frame the last adoption checked: its check table's script and listing.
    frame: Option<(String, BTreeMap<TableId, LiveFrame>)>,
    /// The frame [`Syncer::prepare`] wrote into a kernel without our tables, for the first
    /// full sync to write the Services over.
    prepared: Option<(Frame, Box<dyn StepWriter>)>,
    /// Endpoint-map declarations as the kernel lists them, by family and protocol: a map a
    /// partial sync declares is a copy, written over netlink.
    templates: HashMap<(Family, String), Attrs>,
    /// Slots given up, free once the transaction that stops using them is committed.
    to_release: Vec<(Family, Slot)>,
    flows: BTreeSet<StaleFlow>,
    rules: usize,
    elements: usize,
    endpoints: usize,
}

impl<R: NftRunner> Syncer<R> {
    /// A syncer whose first sync is a full resync.
    pub fn new(runner: R, config: RenderConfig) -> Self {
        Self {
            runner,
            config,
            models: BTreeMap::new(),
            slots: FAMILIES.into_iter().map(|f| (f, SlotTable::default())).collect(),
            shared: HashMap::new(),
            map_sizes: HashMap::new(),
            record_chains: HashMap::new(),
            stale: BTreeSet::new(),
            full_next: true,
            asked: None,
            prefetched: None,
            frame: None,
            prepared: None,
            templates: HashMap::new(),
            to_release: Vec::new(),
            flows: BTreeSet::new(),
            rules: 0,
            elements: 0,
            endpoints: 0,
        }
    }

    /// The runner, e.g. to inspect a recording one.
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Deletes our tables; the next sync is a full resync.
    pub fn cleanup(&mut self) -> Result<(), NftError> {
        self.full_next = true;
        self.runner.run(&crate::diff::cleanup_script())
    }

    /// Makes the next sync a full resync.
    pub fn force_full_resync(&mut self) {
        self.full_next = true;
    }

    /// Whether the next sync is a full resync.
    pub fn full_next(&self) -> bool {
        self.full_next
    }

    /// Whether a sync has something to do even without changes (a full resync, or objects
    /// emptied by the last sync to delete).
    pub fn has_work(&self) -> bool {
        self.full_next || !self.stale.is_empty()
    }

    /// The models as programmed (or to be programmed by the next full resync).
    pub fn models(&self) -> &BTreeMap<ServiceKey, ServiceModel> {
        &self.models
    }

    /// Rules, map/set elements and endpoints (Service port × endpoint) programmed.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.rules, self.elements, self.endpoints)
    }

    /// UDP flows of endpoints that stopped serving, to delete now that the kernel no longer
    /// sends to them.
    pub fn take_stale_flows(&mut self) -> Vec<StaleFlow> {
        std::mem::take(&mut self.flows).into_iter().collect()
    }

    /// Programs `changes` in one transaction (a full resync when one is due) and records the
    /// changed Services' health. After a failure the kernel keeps the previous rules and the
    /// next sync is a full resync.
    pub fn sync(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        health: &HealthState,
    ) -> Result<SyncReport, NftError> {
        let mut changes = Some(changes.into_iter());
        let synced = self.sync_changes(&mut changes, health);
        if synced.is_err() {
            // What a failed sync did not take in is recorded all the same, for the full resync
            // that follows to program.
            self.full_next = true;
            for (key, model) in changes.into_iter().flatten() {
                if self.models.get(&key) != model.as_ref() {
                    self.update(&key, model, None, None);
                }
            }
        }
        synced
    }

    /// [`Syncer::sync`]: `changes` is taken (and with it what holds them dropped, so that a
    /// full resync does not keep it while it renders) once it is consumed.
    fn sync_changes(
        &mut self,
        changes: &mut Option<impl Iterator<Item = Change>>,
        health: &HealthState,
    ) -> Result<SyncReport, NftError> {
        let started = Instant::now();
        let full = self.full_next;
        // Over the frame written ahead there is nothing to list: the kernel holds only it.
        if full && let Some((frame, writer)) = self.prepared.take() {
            return self.sync_stepwise(changes, health, writer.as_ref(), Some(frame), started);
        }
        // A full resync over tables that exist (an agent restarted over the tables it left,
        // the periodic resync, the repair after a failure) adopts them: the slots their rules
        // use are taken over where free, and only what differs is written.
        let prefetched = self
            .prefetched
            .take()
            .map(|listing| listing.join().unwrap_or_else(|_| Err(panicked("listing the tables"))));
        let live = match (full, prefetched) {
            (false, _) => Err(None),
            (true, Some(listed)) => live_or_why(listed),
            (true, None) => self.list_live(),
        }
        .map(Arc::new);
        if live.as_ref().is_err_and(Option::is_none)
            && full
            && let Some(writer) = self.runner.stepwise()?
        {
            return self.sync_stepwise(changes, health, writer.as_ref(), None, started);
        }
        // Neither steps (a table exists) nor adoption (one is missing): replaced.
        let live = match live {
            Err(None) if full && self.runner.netlink().is_some() => Err(Some("one of our tables is missing".into())),
            live => live,
        };
        let mut adopted = Vec::new();
        let mut listing = None;
        if let Ok(live) = &live {
            for (family, port, slot) in live.slots() {
                if self.slots.entry(family).or_default().adopt(&port, slot) {
                    adopted.push((family, port, slot));
                }
            }
            // The elements (most of the listing) are listed while the Services are rendered.
            listing = self.runner.netlink().map(|netlink| {
                delete_check_table(&netlink);
                ElementListing::start(netlink, live.clone())
            });
        }
        // Adopting, the whole ruleset is gathered from the fragments as they are rendered.
        let mut gathered = live.is_ok().then(Gathered::default);
        self.asked = live.is_ok().then(HashSet::new);
        let mut deltas: BTreeMap<TableId, Delta> = BTreeMap::new();
        let mut changed = Vec::new();
        for (key, model) in changes.take().into_iter().flatten() {
            if self.models.get(&key) == model.as_ref() {
                continue;
            }
            let sink = gathered.as_mut().map(|g| g as &mut dyn FragmentSink);
            self.update(&key, model, (!full).then_some(&mut deltas), sink);
            changed.push(key);
        }
        let mut counts = None;
        let mut batch = None;
        // A full resync's ruleset: as text to replace the tables, gathered to adopt them.
        let mut full_ruleset = None;
        let mut desired = None;
        let (script, chains_written, elements_changed, stale_after) = if full {
            let (chains, (rules, elements)) = match gathered.take() {
                Some(mut gathered) => {
                    self.add_kept(&changed, &mut gathered);
                    let wanted = gathered.finish(&self.config, self.shared_elements().into_iter());
                    let chains = wanted.ruleset.tables.values().map(|t| t.chains.len()).sum();
                    let counts = wanted.counts();
                    desired = Some(Arc::new(wanted));
                    (chains, counts)
                }
                None => {
                    let (ruleset, chains, counts) = self.render_whole();
                    full_ruleset = Some(ruleset);
                    (chains, counts)
                }
            };
            self.release_unused(&adopted);
            counts = Some((rules, elements));
            (String::new(), chains, elements, BTreeSet::new())
        } else {
            let mut plan = PartialScript::default();
            let empty = Delta::default();
            for id in TableId::all() {
                // A table with nothing changed and nothing to delete has nothing to write.
                let delta = match deltas.get(&id) {
                    Some(delta) => delta,
                    None if self.stale.iter().any(|s| s.table() == id) => &empty,
                    None => continue,
                };
                self.copy_declarations(id, delta);
                plan.table(id, delta, &self.stale, &self.map_sizes, &self.templates);
            }
            batch = plan.batch;
            (plan.script, plan.chains_written, plan.elements_changed, plan.stale_after)
        };
        let diff_time = started.elapsed();
        let mut report = SyncReport {
            full,
            applied: false,
            chains_written,
            elements_changed,
            diff_time,
            apply_time: Duration::ZERO,
            writer: Writer::None,
            affinity_purged: 0,
            replaced: None,
        };
        let adoption = match (&desired, live, listing) {
            (Some(desired), Ok(live), Some(listing)) => {
                let applying = Instant::now();
                let adoption = self.adopt(&live, listing, desired);
                report.apply_time = applying.elapsed();
                adoption
            }
            (_, Err(why), _) => Err(why),
            _ => Err(None),
        };
        let adopted_ok = adoption.is_ok();
        if let Ok(adoption) = &adoption {
            report.applied = !adoption.batch.is_empty();
            report.writer = if report.applied { Writer::Netlink } else { Writer::None };
            report.chains_written = adoption.chains_written;
            report.elements_changed = adoption.elements_changed;
        } else if full || !script.is_empty() {
            report.replaced = adoption.err().flatten();
            drop(desired);
            let applying = Instant::now();
            let written = if full {
                // Not adopted: the tables are replaced with the ruleset rendered whole.
                let ruleset = full_ruleset.take().unwrap_or_else(|| self.render_whole().0);
                self.runner.run_full(&FullSync::new(&ruleset))
            } else {
                self.runner.run_partial(&script, batch.as_ref())
            };
            // After a failure the kernel keeps the previous rules; the next sync is a full resync.
            report.writer = written.inspect_err(|_| self.full_next = true)?;
            report.apply_time = applying.elapsed();
            report.applied = true;
        }
        let adopted_tables = full && adopted_ok;
        self.committed(stale_after, counts, &changed, &deltas, health);
        for (id, delta) in &deltas {
            if let Some(narrowed) = delta.narrowed_affinity() {
                report.affinity_purged += self.purge_affinity(*id, &narrowed)?;
            }
        }
        if adopted_tables {
            // Clients the previous agent recorded: those the tables no longer allow go. (IPv6
            // entries name their endpoint's rule, which is gone with the endpoint.)
            let every = Narrowed { every: true, ..Narrowed::default() };
            for id in TableId::of_family(Family::V4).filter(|id| !id.is_frame()) {
                report.affinity_purged += self.purge_affinity(id, &every)?;
            }
        }
        Ok(report)
    }

    /// Our tables as the kernel holds them, to adopt; `Err(None)` when there is nothing to
    /// adopt (no netlink socket, or a table missing), `Err(Some(why))` when they cannot be
    /// listed.
    fn list_live(&self) -> Result<Live, Option<String>> {
        let netlink = self.runner.netlink().ok_or(None)?;
        live_or_why(Live::list(&netlink))
    }

    /// When the next sync is a full resync, starts listing the kernel's tables for it on a
    /// thread of its own (see [`Syncer::sync`]), so that the listing overlaps what comes
    /// before the sync, such as building the models.
    pub fn prefetch(&mut self) {
        if !self.full_next || self.prefetched.is_some() || self.prepared.is_some() {
            return;
        }
        if let Some(netlink) = self.runner.netlink() {
            self.prefetched = Some(std::thread::spawn(move || Live::list(&netlink)));
        }
    }

    /// Adopted slots that the render did not use as they were are released (a port gone, or
    /// moved to a slot of its size).
    fn release_unused(&mut self, adopted: &[(Family, String, Slot)]) {
        let asked = self.asked.take().unwrap_or_default();
        for (family, port, slot) in adopted {
            let used = asked.contains(&(*family, port.clone()));
            if let Some(table) = self.slots.get_mut(family) {
                if used && table.get(port) == Some(*slot) {
                    continue;
                }
                if table.get(port) == Some(*slot) {
                    table.unassign(port);
                }
                table.release(*slot);
            }
        }
    }

    /// Writes what differs between the kernel's tables (`live`) and `desired`, in one netlink
    /// transaction, after checking the frame through a check table ([`crate::adopt`]).
    /// `Err(Some(why))` when only a replacement will do; nothing was changed then.
    fn adopt(
        &mut self,
        live: &Live,
        listing: ElementListing,
        desired: &Arc<Desired>,
    ) -> Result<Adoption, Option<String>> {
        let netlink = self.runner.netlink().ok_or(None)?;
        // The frame as nft writes it: listed from a check table nft writes while the listing's
        // thread compares the elements, or, when it is the frame the last adoption checked, as
        // listed then (a resync that finds nothing changed then writes nothing at all). The
        // listing shares the socket: it ends before anything else is sent on it.
        let script = check_script(&desired.ruleset);
        let cached = self.frame.take().filter(|(checked, _)| *checked == script).map(|(_, frames)| frames);
        let write_check = cached.is_none();
        let (checked, elements) = std::thread::scope(|scope| {
            let check = write_check.then(|| scope.spawn(|| self.runner.run(&script)));
            let elements = listing.finish(desired.clone());
            let checked =
                check.map_or(Ok(()), |c| c.join().unwrap_or_else(|_| Err(panicked("writing the check table"))));
            (checked, elements)
        });
        let adopted = checked.map_err(|e| format!("writing the check table: {e}")).and(elements).and_then(|elements| {
            let frames = match cached {
                Some(frames) => frames,
                None => list_check(&netlink)
                    .map_err(|e| format!("listing the check table: {e}"))?
                    .ok_or_else(|| "the check table is missing".to_string())?,
            };
            let mut adoption = plan(live, &elements, &frames, &desired.ruleset)?;
            if write_check {
                for id in frames.keys() {
                    adoption.batch.delete_table(id.family, id.check_name());
                }
            }
            netlink.commit(&adoption.batch).map_err(|e| format!("the adopting transaction: {e}"))?;
            Ok((adoption, frames))
        });
        match adopted {
            Ok((adoption, frames)) => {
                self.frame = Some((script, frames));
                Ok(adoption)
            }
            Err(why) => {
                if write_check {
                    delete_check_table(&netlink);
                }
                Err(Some(why))
            }
        }
    }

    /// Into a kernel without our tables, writes the frame the first full sync writes the
    /// Services over ([`Frame`]), so that it is done before the Services are known (the agent
    /// calls this while the initial lists load). Returns whether it did; with tables in the
    /// kernel, or a runner that cannot write in steps, the first sync does as it would have.
    pub fn prepare(&mut self) -> Result<bool, NftError> {
        if !self.full_next || self.prepared.is_some() {
            return Ok(false);
        }
        let Some(writer) = self.runner.stepwise()? else { return Ok(false) };
        let frame = Frame::write(writer.as_ref(), &Frame::skeleton(&self.config))?;
        self.prepared = Some((frame, writer));
        Ok(true)
    }

    /// A full resync into a kernel without our tables, written in steps ([`Stepwise`]) while
    /// the changed Services are taken in: each Service's chains and endpoint-map elements as
    /// soon as they are rendered, so the kernel takes in the rules while the rest render. Over
    /// `frame` when [`Syncer::prepare`] wrote it, else over one written first.
    fn sync_stepwise(
        &mut self,
        changes: &mut Option<impl Iterator<Item = Change>>,
        health: &HealthState,
        writer: &dyn StepWriter,
        frame: Option<Frame>,
        started: Instant,
    ) -> Result<SyncReport, NftError> {
        let frame = match frame {
            Some(frame) => frame,
            None => Frame::write(writer, &Frame::skeleton(&self.config)).inspect_err(|_| self.full_next = true)?,
        };
        self.templates.extend(frame.templates().iter().map(|(k, v)| (k.clone(), v.clone())));
        // Into a node with no Services yet (nothing kept, rendered after the changes), the
        // Services go map by map, in order of the first endpoint map their ports use: the maps
        // all of whose rules are written get their elements while the rest render, so the
        // kernel does not wait for the renderer.
        let mut changes: Vec<Change> = changes.take().into_iter().flatten().collect();
        let ordered = self.models.is_empty();
        if ordered {
            changes.sort_by_cached_key(|(_, model)| model.as_ref().map_or(ENDPOINT_MAP_BUCKETS, first_endpoint_bucket));
        }
        let mut changed = Vec::new();
        let mut rendered = Duration::ZERO;
        let written = std::thread::scope(|scope| {
            let mut steps = Stepwise::start(scope, writer, frame, SPLIT_BATCH_BYTES);
            for (key, model) in changes {
                if self.models.get(&key) == model.as_ref() {
                    continue;
                }
                if ordered && let Some(model) = &model {
                    steps.fill_maps_below(first_endpoint_bucket(model));
                }
                self.update(&key, model, None, Some(&mut steps));
                changed.push(key);
            }
            self.add_kept(&changed, &mut steps);
            let activating = self.shared_elements();
            rendered = started.elapsed();
            steps.finish(activating.iter().map(|(id, name, key, value)| (*id, *name, *key, value.as_str())))
        });
        let mut report = SyncReport {
            full: true,
            applied: true,
            chains_written: 0,
            elements_changed: 0,
            diff_time: rendered,
            apply_time: Duration::ZERO,
            writer: Writer::NftThenNetlink,
            affinity_purged: 0,
            replaced: None,
        };
        let counts = match written {
            Ok(Some(written)) => {
                report.chains_written = written.chains;
                report.elements_changed = written.elements;
                report.apply_time = written.write_time;
                (written.rules, written.elements)
            }
            // An element the encoder does not know: the part-written tables match nothing yet,
            // and are replaced atomically.
            Ok(None) => {
                let (ruleset, chains, counts) = self.render_whole();
                let applying = Instant::now();
                report.writer =
                    self.runner.run_full(&FullSync::new(&ruleset)).inspect_err(|_| self.full_next = true)?;
                report.apply_time = applying.elapsed();
                report.chains_written = chains;
                report.elements_changed = counts.1;
                counts
            }
            Err(e) => {
                self.full_next = true;
                return Err(e);
            }
        };
        self.committed(BTreeSet::new(), Some(counts), &changed, &BTreeMap::new(), health);
        Ok(report)
    }

    /// Makes sure a declaration to copy is at hand for each protocol of the endpoint maps
    /// `delta` declares: listed from a map of the same family and protocol that the kernel
    /// has. Without one, the map goes through nft.
    fn copy_declarations(&mut self, id: TableId, delta: &Delta) {
        let Some(netlink) = self.runner.netlink() else { return };
        for (name, (before, _)) in &delta.maps {
            let Some(proto) = endpoint_map_protocol(name) else { continue };
            let key = (id.family, proto.to_string());
            if *before > 0 || self.templates.contains_key(&key) {
                continue;
            }
            // A map the kernel has: not new in this sync (another table's is as good).
            let existing = self.map_sizes.keys().find(|(t, other)| {
                t.family == id.family
                    && endpoint_map_protocol(other) == Some(proto)
                    && (*t != id || delta.maps.get(other).is_none_or(|(before, _)| *before > 0))
            });
            if let Some((table, other)) = existing
                && let Ok(Some(listed)) = netlink.get_set(*table, other)
            {
                self.templates.insert(key, listed.decl);
            }
        }
    }

    /// Kept Services that did not change (a resync of kept state), rendered as kept.
    fn add_kept(&self, changed: &[ServiceKey], sink: &mut dyn FragmentSink) {
        let fresh: HashSet<&ServiceKey> = changed.iter().collect();
        for model in self.models.values().filter(|m| !fresh.contains(&m.key)) {
            for family in FAMILIES.into_iter().filter(|f| model.families.contains(f)) {
                let Some(slots) = self.slots.get(&family) else { continue };
                let mut fixed = FixedSlots { table: slots, used: Vec::new() };
                for (id, fragment) in render_fragment(model, family, &mut fixed) {
                    sink.add_owned(id, fragment);
                }
            }
        }
    }

    /// The elements of the dispatch maps and the hairpin set, as their owners decide.
    fn shared_elements(&self) -> Vec<(TableId, &'static str, &str, String)> {
        let shared = self.shared.iter();
        shared.filter_map(|((id, name, key), owners)| Some((*id, *name, key.as_str(), effective(owners)?))).collect()
    }

    /// Every kept model rendered, with its number of chains, and of rules and elements.
    fn render_whole(&self) -> (Ruleset, usize, (usize, usize)) {
        let ruleset = render_with_slots(self.models.values(), &self.config, &self.slots);
        let chains = ruleset.tables.values().map(|t| t.chains.len()).sum();
        let counts = (ruleset.rule_count(), ruleset.element_count());
        (ruleset, chains, counts)
    }

    /// Bookkeeping once a sync's transaction is committed: what it left to delete, the slots
    /// it gave up, the counts, the changed Services' health.
    fn committed(
        &mut self,
        stale_after: BTreeSet<Stale>,
        counts: Option<(usize, usize)>,
        changed: &[ServiceKey],
        deltas: &BTreeMap<TableId, Delta>,
        health: &HealthState,
    ) {
        self.full_next = false;
        self.stale = stale_after;
        for (family, slot) in self.to_release.drain(..) {
            if let Some(table) = self.slots.get_mut(&family) {
                table.release(slot);
            }
        }
        let now = Instant::now();
        if let Some((rules, elements)) = counts {
            self.rules = rules;
            self.elements = elements;
            health.record_services(self.models.values(), now);
        } else {
            self.rules = self.rules.saturating_add_signed(deltas.values().map(Delta::rule_change).sum());
            self.elements = self.elements.saturating_add_signed(deltas.values().map(Delta::element_change).sum());
            health.update_services(changed.iter().map(|k| (k, self.models.get(k))), now);
        }
    }

    /// Deletes the affinity entries of table `table` that the programmed elements no longer allow:
    /// an entry holds while its endpoint is in `affinity-endpoints` and its frontend (address
    /// in the address maps, NodePort in the NodePort maps) records into its map, exactly what
    /// the kernel checks before recording one. A purge that fails makes the next sync a full
    /// resync, which starts the maps afresh.
    fn purge_affinity(&mut self, table: TableId, narrowed: &Narrowed) -> Result<usize, NftError> {
        let shared = &self.shared;
        let has = |collection: &'static str, key: String| shared.contains_key(&(table, collection, key));
        let records_into = |collection: &'static str, key: String, map: &AffinityMap| {
            shared
                .get(&(table, collection, key))
                .and_then(|owners| effective(owners))
                .and_then(|v| v.strip_prefix("jump ").map(str::to_string))
                .is_some_and(|chain| {
                    chain
                        .strip_prefix(AFFINITY_RECORD_PREFIX)
                        .and_then(|c| c.strip_prefix(map.policy))
                        .is_some_and(|c| c.starts_with('-'))
                })
        };
        let stale = |map: &str, e: &AffinityEntry| {
            let Some(map) = AFFINITY_MAPS.iter().find(|m| m.name == map) else { return false };
            if !narrowed.touches(e) {
                return false;
            }
            let frontend = if map.node_port {
                records_into(AFFINITY_NODEPORTS, format!("{} . {}", e.protocol, e.port), map)
            } else {
                records_into(AFFINITY_ADDRESSES, format!("{} . {} . {}", e.frontend, e.protocol, e.port), map)
            };
            let valid =
                frontend && has(AFFINITY_ENDPOINTS, format!("{} . {} . {}", e.endpoint, e.protocol, e.endpoint_port));
            !valid
        };
        self.runner.purge_affinity(table, &stale).inspect_err(|_| self.full_next = true)
    }

    /// Moves the kept state of `key` to `model`, recording what changes in `deltas`.
    fn update(
        &mut self,
        key: &ServiceKey,
        model: Option<ServiceModel>,
        mut deltas: Option<&mut BTreeMap<TableId, Delta>>,
        mut steps: Option<&mut dyn FragmentSink>,
    ) {
        let old = self.models.remove(key);
        let endpoints = |m: Option<&ServiceModel>| m.map_or(0, |m| m.ports.iter().map(|p| p.endpoints.len()).sum());
        self.endpoints = (self.endpoints + endpoints(model.as_ref())).saturating_sub(endpoints(old.as_ref()));
        self.flows.extend(stale_service_flows(old.as_ref(), model.as_ref()));
        let owner = Arc::new(key.clone());
        for family in FAMILIES {
            let Some(slots) = self.slots.get_mut(&family) else { continue };
            let (mut before, had) = match old.as_ref().filter(|m| m.families.contains(&family)) {
                Some(m) => {
                    let mut fixed = FixedSlots { table: &*slots, used: Vec::new() };
                    let t = render_fragment(m, family, &mut fixed);
                    (t.into_iter().collect(), fixed.used)
                }
                None => (BTreeMap::new(), Vec::new()),
            };
            let (after, asked) = match model.as_ref().filter(|m| m.families.contains(&family)) {
                Some(m) => {
                    let mut recording = Recording { table: slots, asked: Vec::new() };
                    let t = render_fragment(m, family, &mut recording);
                    (t.into_iter().collect::<BTreeMap<_, _>>(), recording.asked)
                }
                None => (BTreeMap::new(), Vec::new()),
            };
            if let Some(log) = self.asked.as_mut() {
                log.extend(asked.iter().map(|port| (family, port.clone())));
            }
            for (port, slot) in had {
                if !asked.contains(&port) {
                    slots.unassign(&port);
                    self.to_release.push((family, slot));
                } else if slots.get(&port) != Some(slot) {
                    self.to_release.push((family, slot));
                }
            }
            // The tables the Service was in and is in (its NAT table is the same unless it
            // moves family).
            let empty = Table::default();
            let ids: BTreeSet<TableId> = before.keys().chain(after.keys()).copied().collect();
            for id in ids {
                let delta = deltas.as_deref_mut().map(|d| d.entry(id).or_default());
                let was = before.remove(&id).unwrap_or_default();
                self.merge(id, &owner, was, after.get(&id).unwrap_or(&empty), delta);
            }
            if let Some(steps) = steps.as_deref_mut() {
                for (id, fragment) in after {
                    steps.add_owned(id, fragment);
                }
            }
        }
        if let Some(model) = model {
            self.models.insert(key.clone(), model);
        }
    }

    fn merge(
        &mut self,
        id: TableId,
        owner: &Arc<ServiceKey>,
        before: Table,
        after: &Table,
        mut delta: Option<&mut Delta>,
    ) {
        let mut before_chains = before.chains;
        // Affinity recording chains are shared by every port with their policy, timeout and
        // protocol: they come and go with the first and last of those ports.
        let record: Vec<String> = before_chains
            .keys()
            .chain(after.chains.keys())
            .filter(|n| n.starts_with(AFFINITY_RECORD_PREFIX))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in record {
            let (old, new) = (before_chains.remove(&name), after.chains.get(&name).cloned());
            let chain = new.clone().or_else(|| old.clone()).unwrap_or_default();
            let users = self.record_chains.entry((id, name.clone())).or_insert(0);
            let was = *users > 0;
            *users = (*users + usize::from(new.is_some())).saturating_sub(usize::from(old.is_some()));
            let now = *users > 0;
            if !now {
                self.record_chains.remove(&(id, name.clone()));
            }
            if let Some(d) = delta.as_deref_mut() {
                let entry = d.chains.entry(name).or_insert_with(|| (was.then(|| chain.clone()), None));
                entry.1 = now.then_some(chain);
            }
        }
        if let Some(d) = delta.as_deref_mut() {
            for (name, chain) in before_chains {
                d.chains.entry(name).or_insert((None, None)).0 = Some(chain);
            }
            for (name, chain) in after.chains.iter().filter(|(n, _)| !n.starts_with(AFFINITY_RECORD_PREFIX)) {
                d.chains.entry(name.clone()).or_insert((None, None)).1 = Some(chain.clone());
            }
        }
        let mut names: BTreeSet<&String> = before.collections.keys().collect();
        names.extend(after.collections.keys());
        let empty = Collection::default();
        for name in names {
            let old = before.collections.get(name);
            let new = after.collections.get(name);
            let (o, n) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
            if let Some(shared) = SHARED_COLLECTIONS.into_iter().find(|s| *s == name.as_str()) {
                self.merge_shared(id, shared, owner, o, n, delta.as_deref_mut());
            } else if name.starts_with("endpoints-") {
                let size = self.map_sizes.entry((id, name.clone())).or_insert(0);
                if let Some(d) = delta.as_deref_mut() {
                    let decl = old.or(new).map(|c| c.decl.clone()).unwrap_or_default();
                    d.maps.entry(name.clone()).or_insert((*size, decl));
                    let elements = d.elements.entry(name.clone()).or_default();
                    for (k, v) in &o.elements {
                        elements.entry(k.clone()).or_insert((Some(v.clone()), None));
                    }
                    for (k, v) in &n.elements {
                        elements.entry(k.clone()).or_insert((None, None)).1 = Some(v.clone());
                    }
                }
                *size = (*size + n.elements.len()).saturating_sub(o.elements.len());
                if *size == 0 {
                    self.map_sizes.remove(&(id, name.clone()));
                }
            } else if let Some(d) = delta.as_deref_mut() {
                let decl =
                    |c: &Collection| Collection { decl: c.decl.clone(), is_map: c.is_map, elements: BTreeMap::new() };
                let entry = d.owned.entry(name.clone()).or_insert((None, None));
                if let Some(c) = old {
                    entry.0 = Some(decl(c));
                }
                entry.1 = new.map(decl);
            }
        }
    }

    fn merge_shared(
        &mut self,
        id: TableId,
        collection: &'static str,
        owner: &Arc<ServiceKey>,
        before: &Collection,
        after: &Collection,
        mut delta: Option<&mut Delta>,
    ) {
        let mut keys: BTreeSet<&String> = before.elements.keys().collect();
        keys.extend(after.elements.keys());
        for key in keys {
            let element = (id, collection, key.clone());
            let owners = self.shared.entry(element.clone()).or_default();
            let was = effective(owners);
            owners.retain(|(k, _)| k.as_ref() != owner.as_ref());
            if let Some(v) = after.elements.get(key) {
                owners.push((owner.clone(), v.clone()));
            }
            let now = effective(owners);
            if owners.is_empty() {
                self.shared.remove(&element);
            }
            if let Some(d) = delta.as_deref_mut() {
                d.elements.entry(collection.to_string()).or_default().entry(key.clone()).or_insert((was, None)).1 = now;
            }
        }
    }
}

/// The tables listed, or why there is nothing to adopt: `None` when a table is missing.
fn live_or_why(listed: Result<Option<Live>, NftError>) -> Result<Live, Option<String>> {
    match listed {
        Ok(Some(live)) => Ok(live),
        Ok(None) => Err(None),
        Err(e) => Err(Some(format!("listing the tables: {e}"))),
    }
}

/// The elements of the kernel's collections, listed on a thread of their own while the
/// Services render, then compared there with those wanted ([`ElementListing::finish`]), so
/// that the listing is freed by the thread that made it. Joined when dropped, so that the
/// socket is never used by two threads at once.
struct ElementListing {
    wanted: Option<SyncSender<Arc<Desired>>>,
    thread: Option<std::thread::JoinHandle<Result<ElementDiff, String>>>,
}

impl ElementListing {
    fn start(netlink: Arc<Netlink>, live: Arc<Live>) -> Self {
        let (wanted, desired) = std::sync::mpsc::sync_channel::<Arc<Desired>>(1);
        let thread = std::thread::spawn(move || {
            let elements = list_elements(&netlink, &live.element_sets());
            let desired = desired.recv().map_err(|_| "nothing to compare the elements with".to_string())?;
            diff_elements(&live, &elements.map_err(|e| format!("listing the elements: {e}"))?, &desired)
        });
        Self { wanted: Some(wanted), thread: Some(thread) }
    }

    /// What differs between the elements listed and those `desired` wants.
    fn finish(mut self, desired: Arc<Desired>) -> Result<ElementDiff, String> {
        if let Some(wanted) = self.wanted.take() {
            let _ = wanted.send(desired);
        }
        let thread = self.thread.take().ok_or_else(|| "the elements were compared already".to_string())?;
        thread.join().map_err(|_| panicked("listing the elements").to_string())?
    }
}

impl Drop for ElementListing {
    fn drop(&mut self) {
        // Without what is wanted, the thread ends once it has listed.
        self.wanted.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn panicked(thread: &str) -> NftError {
    NftError::Rejected { status: "panicked".into(), stderr: format!("the thread {thread} panicked") }
}

/// The value of the greatest Service key among those wanting an element.
fn effective(owners: &[(Arc<ServiceKey>, String)]) -> Option<String> {
    owners.iter().max_by(|a, b| a.0.cmp(&b.0)).map(|(_, v)| v.clone())
}

/// Records which ports asked a [`SlotTable`] for a slot.
struct Recording<'a> {
    table: &'a mut SlotTable,
    asked: Vec<String>,
}

impl SlotSource for Recording<'_> {
    fn slot(&mut self, port_id: &str, endpoints: usize) -> Option<Slot> {
        self.asked.push(port_id.to_string());
        self.table.slot(port_id, endpoints)
    }
}

/// What a sync took away from ClientIP affinity: only entries naming one of these endpoints or
/// frontends may have become invalid.
#[derive(Debug, Default)]
struct Narrowed {
    /// Every entry (the clients a previous agent recorded).
    every: bool,
    /// Endpoint address, protocol, port.
    endpoints: HashSet<(IpAddr, &'static str, u16)>,
    /// Frontend address (none for a NodePort), protocol, port.
    frontends: HashSet<(Option<IpAddr>, &'static str, u16)>,
}

impl Narrowed {
    fn touches(&self, e: &AffinityEntry) -> bool {
        self.every
            || self.endpoints.contains(&(e.endpoint, e.protocol, e.endpoint_port))
            || self.frontends.contains(&(Some(e.frontend), e.protocol, e.port))
            || self.frontends.contains(&(None, e.protocol, e.port))
    }
}

/// `ADDR . PROTO . PORT` or `PROTO . PORT`, as the renderer writes affinity elements.
fn parse_affinity_key(key: &str) -> Option<(Option<IpAddr>, &'static str, u16)> {
    let proto = |p: &str| Protocol::from_nft_name(p).map(Protocol::nft_name);
    let parts: Vec<&str> = key.split(" . ").collect();
    match parts.as_slice() {
        [addr, p, port] => Some((Some(addr.parse().ok()?), proto(p)?, port.parse().ok()?)),
        [p, port] => Some((None, proto(p)?, port.parse().ok()?)),
        _ => None,
    }
}

impl Delta {
    /// The affinity endpoints and frontends the sync removed (or whose recording chain it
    /// changed), if any.
    fn narrowed_affinity(&self) -> Option<Narrowed> {
        let mut narrowed = Narrowed::default();
        for name in [AFFINITY_ENDPOINTS, AFFINITY_ADDRESSES, AFFINITY_NODEPORTS] {
            let Some(elements) = self.elements.get(name) else { continue };
            for (key, (old, new)) in elements {
                if old.is_none() || old == new {
                    continue;
                }
                let Some((addr, proto, port)) = parse_affinity_key(key) else { continue };
                if name == AFFINITY_ENDPOINTS {
                    if let Some(addr) = addr {
                        narrowed.endpoints.insert((addr, proto, port));
                    }
                } else {
                    narrowed.frontends.insert((addr, proto, port));
                }
            }
        }
        (!narrowed.endpoints.is_empty() || !narrowed.frontends.is_empty()).then_some(narrowed)
    }

    fn rule_change(&self) -> isize {
        let count = |c: &Option<Chain>| c.as_ref().map_or(0, |c| c.rules.len());
        self.chains.values().map(|(o, n)| to_isize(count(n)) - to_isize(count(o))).sum()
    }

    fn element_change(&self) -> isize {
        self.elements
            .values()
            .flat_map(|e| e.values())
            .map(|(o, n)| isize::from(n.is_some()) - isize::from(o.is_some()))
            .sum()
    }
}

fn to_isize(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

/// The partial transaction, table by table, in the order nft needs: declarations, chains,
/// elements, then emptying what is no longer wanted and deleting what the previous sync emptied.
/// Written twice: as an nft script, and as a netlink batch while every step is one the netlink
/// encoder knows (see [`crate::netlink`]); the runner picks.
struct PartialScript {
    script: String,
    batch: Option<Batch>,
    chains_written: usize,
    elements_changed: usize,
    stale_after: BTreeSet<Stale>,
}

impl Default for PartialScript {
    fn default() -> Self {
        Self {
            script: String::new(),
            batch: Some(Batch::new()),
            chains_written: 0,
            elements_changed: 0,
            stale_after: BTreeSet::new(),
        }
    }
}

impl PartialScript {
    /// Adds a step to the batch; a step the encoder declines drops the batch.
    fn encode(&mut self, step: impl FnOnce(&mut Batch) -> bool) {
        if let Some(b) = self.batch.as_mut()
            && !step(b)
        {
            self.batch = None;
        }
    }

    fn table(
        &mut self,
        id: TableId,
        d: &Delta,
        stale: &BTreeSet<Stale>,
        map_sizes: &HashMap<(TableId, String), usize>,
        templates: &HashMap<(Family, String), Attrs>,
    ) {
        use std::fmt::Write as _;
        for (name, (old, new)) in &d.owned {
            if let (None, Some(c)) = (old, new) {
                let kind = if c.is_map { "map" } else { "set" };
                let _ = writeln!(self.script, "add {kind} {id} {name} {{ {} }}", c.decl);
                self.batch = None;
            }
        }
        for (name, (before, decl)) in &d.maps {
            if *before == 0 && map_sizes.contains_key(&(id, name.clone())) {
                let _ = writeln!(self.script, "add map {id} {name} {{ {decl} }}");
                match endpoint_map_protocol(name).and_then(|proto| templates.get(&(id.family, proto.to_string()))) {
                    Some(copied) => self.encode(|b| {
                        b.new_set(id, name, copied);
                        true
                    }),
                    None => self.batch = None,
                }
            }
        }
        for (name, (old, new)) in &d.chains {
            if let (None, Some(chain)) = (old, new) {
                write_chain_decl(&mut self.script, id, name, chain);
                let base = chain.base.is_some();
                self.encode(|b| {
                    b.new_chain(id, name);
                    !base
                });
            }
        }
        for (name, (old, new)) in &d.chains {
            let Some(n) = new else { continue };
            match old {
                Some(o) if o == n => continue,
                Some(_) => {
                    let _ = writeln!(self.script, "flush chain {id} {name}");
                    self.encode(|b| {
                        b.flush_chain(id, name);
                        true
                    });
                }
                None => {}
            }
            write_rules(&mut self.script, id, name, n);
            self.encode(|b| n.rules.iter().all(|r| b.add_rule(id, name, r)));
            self.chains_written += 1;
        }
        for (name, elements) in &d.elements {
            let removed: Vec<(&String, &String)> = elements
                .iter()
                .filter_map(|(k, (o, n))| o.as_ref().filter(|o| Some(*o) != n.as_ref()).map(|o| (k, o)))
                .collect();
            let added: Vec<(&String, &String)> = elements
                .iter()
                .filter_map(|(k, (o, n))| n.as_ref().filter(|n| Some(*n) != o.as_ref()).map(|n| (k, n)))
                .collect();
            self.elements_changed += removed.len() + added.len();
            write_elements(&mut self.script, "delete", id, name, removed.iter().copied());
            write_elements(&mut self.script, "add", id, name, added.iter().copied());
            let (removed, added) = (&removed, &added);
            self.encode(|b| {
                (removed.is_empty()
                    || b.elements(id, name, false, removed.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
                    && (added.is_empty()
                        || b.elements(id, name, true, added.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
            });
        }
        for (name, (old, new)) in &d.chains {
            if old.is_some() && new.is_none() {
                let _ = writeln!(self.script, "flush chain {id} {name}");
                self.encode(|b| {
                    b.flush_chain(id, name);
                    true
                });
                self.stale_after.insert(Stale::Chain(id, name.clone()));
            }
        }
        for (name, (old, new)) in &d.owned {
            if let (Some(c), None) = (old, new) {
                // A Service's own collections (none are rendered now) hold no elements we track.
                self.stale_after.insert(if c.is_map {
                    Stale::Map(id, name.clone())
                } else {
                    Stale::Collection(id, name.clone())
                });
            }
        }
        for (name, (before, _)) in &d.maps {
            if *before > 0 && !map_sizes.contains_key(&(id, name.clone())) {
                self.stale_after.insert(Stale::Map(id, name.clone()));
            }
        }
        // Delete what the previous sync emptied, unless wanted again; chains first, as a set
        // or map is referenced by a chain's rules until those are gone.
        let wanted_chain = |name: &String| d.chains.get(name).is_some_and(|(_, n)| n.is_some());
        for s in stale {
            if let Stale::Chain(f, name) = s
                && *f == id
                && !wanted_chain(name)
            {
                let _ = writeln!(self.script, "delete chain {id} {name}");
                self.encode(|b| {
                    b.delete_chain(id, name);
                    true
                });
            }
        }
        for s in stale {
            let (f, name, kind) = match s {
                Stale::Chain(..) => continue,
                Stale::Collection(f, name) => (f, name, "set"),
                Stale::Map(f, name) => (f, name, "map"),
            };
            let wanted =
                d.owned.get(name).is_some_and(|(_, n)| n.is_some()) || map_sizes.contains_key(&(id, name.clone()));
            if *f == id && !wanted {
                let _ = writeln!(self.script, "delete {kind} {id} {name}");
                self.encode(|b| {
                    b.delete_set(id, name);
                    true
                });
            }
        }
    }
}
