//! Turns the model into the nftables ruleset this node must have (pure).
//!
//! Shape, per family (`ip` and `ip6`): a frame table `hawser`, which every packet passes, and
//! [`NAT_SHARDS`] NAT tables `hawser-1` … `hawser-8`, which only a connection's first packet
//! passes and over which the Services are spread by a hash of their namespace and name (see
//! [`TableId`]):
//! - in the frame, base chains `filter-prerouting`/`filter-output` (filter, priority -115) jump to
//!   `filter-dispatch`, which looks up `filter-addresses` (addr . proto . port) and, for this
//!   node's own non-loopback addresses, `filter-nodeports` (proto . port); the per-port
//!   `fw-…` chains enforce `loadBalancerSourceRanges` and reject (no endpoints) or drop
//!   (Local with no local endpoint) new connections;
//! - in each NAT table, base chains `nat-prerouting`/`nat-output` (nat, priority -110, i.e.
//!   before kube-proxy's dstnat -100) jump to `services`, which dispatches through the verdict maps
//!   `service-addresses-local` and `service-nodeports-local` (Local policy), then, with the
//!   masquerade mark set, `service-addresses` and `service-nodeports` (Cluster policy) to the
//!   per-port `svc-…` chains, and clears the mark when none matched;
//! - `svc-…` DNATs in one rule: `dnat to numgen random mod N offset K map
//!   @endpoints-PROTO-BB`, where the Service port owns the keys `K..K+N` of one of
//!   [`ENDPOINT_MAP_BUCKETS`] shared maps of its protocol (see [`Slot`]); a single endpoint
//!   is a plain `dnat to`. IPv4 ports with ClientIP affinity have the same rule: `services`
//!   first looks the client and frontend up in the dynamic `affinity-cluster`/`affinity-local`
//!   maps (`…-nodeports` for NodePorts) and DNATs a known client to its endpoint, and the filter chains
//!   `affinity-prerouting`/`affinity-output` (priority -99, right after the NAT hook) record the
//!   endpoint picked for a new connection (see [`AFFINITY_CLUSTER`]); IPv6 ones have two rules
//!   per endpoint on the `ip6` table's `affinity` set (see [`AFFINITY_SET`]);
//! - the frame's `nat-postrouting` masquerades (fully-random) what carries our mark bit (everything a
//!   Cluster-policy Service DNATs), and hairpin traffic of Local-policy Services: a DNATed
//!   packet whose source is the endpoint it was sent to (`hairpin` set, their endpoints only).
//!
//! Why this shape: a ruleset load costs the kernel, for every element added to a map, a
//! check per rule that refers to the map, and a named or anonymous set costs a scan of all
//! sets of the table. Per-endpoint chains and per-port anonymous maps made a 10k-Service
//! transaction take minutes; one rule per Service port, a few hundred shared maps (each
//! referenced by about 1/256 of the rules) and plain elements keep it linear. Likewise one
//! named set per affinity endpoint made an affinity load quadratic (1k Services × 10
//! endpoints: 13 s, nearly all in the kernel), and two rules per endpoint on one shared set
//! made it 6× a load without affinity (the kernel parses every expression of every rule);
//! affinity now adds set elements only, and no rule per Service. And a transaction that adds a
//! rule or a `goto` element makes the kernel re-validate every chain reachable from the base
//! chains of the table it touches, walking every element of its verdict maps: with all 10k
//! Services in one table that walk was most of a one-endpoint change (38–48 ms of kernel time on
//! a slow machine), spread over 8 NAT tables it is an eighth. The frame stays one table so that
//! an established connection's packets pass one filter chain, not one per NAT table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{ClusterModel, Endpoint, Family, PortModel, Protocol, ServiceModel, TrafficPolicy};

/// Name of the table of each family that filters (source ranges, rejects) and masquerades:
/// the [`TableId::frame`] of the family.
pub const TABLE: &str = "hawser";
/// Number of NAT tables per family (`hawser-1` … `hawser-8`) the Services are spread over, by
/// a hash of their namespace and name. A transaction that adds a rule or a `goto` element makes
/// the kernel re-validate every chain reachable from the base chains of the table it touches,
/// a walk of every dispatch element of that table: spread over 8 tables, a one-endpoint
/// change at 10k Services re-validates 1/8 of them. Only the NAT hook, which sees the first
/// packet of a connection, passes through all of them; filtering stays in one table.
pub const NAT_SHARDS: u8 = 8;
const TABLE_NAMES: [&str; 1 + NAT_SHARDS as usize] =
    [TABLE, "hawser-1", "hawser-2", "hawser-3", "hawser-4", "hawser-5", "hawser-6", "hawser-7", "hawser-8"];

/// One of our tables: the family's frame (index 0: filtering, masquerading, the hairpin set) or
/// one of its [`NAT_SHARDS`] NAT tables (1 ..= `NAT_SHARDS`: the Services' DNAT, dispatch maps,
/// endpoint maps and ClientIP affinity). Displays as nft names it in a command (`ip hawser-3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId {
    /// Its family.
    pub family: Family,
    /// 0 for the frame, else the NAT shard.
    pub index: u8,
}

impl TableId {
    /// The family's frame table, `hawser`.
    pub const fn frame(family: Family) -> Self {
        Self { family, index: 0 }
    }

    /// The NAT table of `family` that holds the Service `namespace/name`.
    pub fn nat(family: Family, namespace: &str, name: &str) -> Self {
        let hash = fnv1a(fnv1a(fnv1a(FNV_OFFSET, namespace), "/"), name);
        Self { family, index: 1 + u8::try_from(hash % u32::from(NAT_SHARDS)).unwrap_or(0) }
    }

    /// Every table of `family`: the frame, then the NAT tables.
    pub fn of_family(family: Family) -> impl Iterator<Item = Self> {
        (0..=NAT_SHARDS).map(move |index| Self { family, index })
    }

    /// Every table of ours, IPv4's first.
    pub fn all() -> impl Iterator<Item = Self> {
        [Family::V4, Family::V6].into_iter().flat_map(Self::of_family)
    }

    /// Whether it is the frame.
    pub const fn is_frame(self) -> bool {
        self.index == 0
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        TABLE_NAMES[usize::from(self.index)]
    }

    /// The table the adoption writes this one's frame into (see [`crate::adopt`]): the
    /// family's frame's own, or the one all its NAT tables share (their frames differ only
    /// by the affinity recording chains each has, which are the same wherever they are).
    pub fn check(self) -> Self {
        Self { family: self.family, index: self.index.min(1) }
    }

    /// The name of [`TableId::check`]'s table.
    pub fn check_name(self) -> &'static str {
        if self.is_frame() { "hawser-check" } else { "hawser-check-nat" }
    }

    /// The nft family keyword.
    pub fn fam(self) -> &'static str {
        family_name(self.family)
    }
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.fam(), self.name())
    }
}
/// Default packet-mark bit requesting masquerade; distinct from kube-proxy's 0x4000.
pub const DEFAULT_MASQUERADE_MARK: u32 = 0x0040_0000;
/// Number of shared endpoint maps per family and protocol (`endpoints-tcp-00` … `-ff`). The kernel
/// validates each added map element once per rule that refers to the map, so spreading the
/// Service ports over many maps keeps a full load close to linear; only maps in use exist.
pub const ENDPOINT_MAP_BUCKETS: u32 = 256;
/// Smallest key range reserved for a Service port in an endpoint map; ranges are powers of
/// two so that a port can gain endpoints without moving.
pub const MIN_SLOT_CAPACITY: u32 = 16;
/// What the names of the shared endpoint maps start with.
pub const ENDPOINT_MAP_PREFIX: &str = "endpoints-";

/// Rendering settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderConfig {
    /// The mark bit that requests masquerading in postrouting.
    pub masquerade_mark: u32,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self { masquerade_mark: DEFAULT_MASQUERADE_MARK }
    }
}

/// A chain: its base-chain declaration (hook, priority) if any, and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    /// `{ type … hook … priority …; }` for base chains.
    pub base: Option<String>,
    /// Rules in order.
    pub rules: Vec<String>,
}

/// A named set or map: declaration and elements (key → value for maps, key → "" for sets).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Collection {
    /// Body of the declaration, e.g. `type ipv4_addr; flags dynamic,timeout; timeout 10s;`.
    pub decl: String,
    /// Whether it is a map (`add map`) rather than a set.
    pub is_map: bool,
    /// Elements.
    pub elements: BTreeMap<String, String>,
}

impl Collection {
    /// The same declaration, without elements.
    pub fn clone_empty(&self) -> Self {
        Self { decl: self.decl.clone(), is_map: self.is_map, elements: BTreeMap::new() }
    }
}

/// One of our tables ([`TableId`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
    /// Sets and maps by name.
    pub collections: BTreeMap<String, Collection>,
}

/// The keys a Service port owns in a shared endpoint map: `offset .. offset + capacity` of
/// map `endpoints-{proto}-{bucket:02x}`; its `N` endpoints use the first `N` of them.
///
/// Slots are kept from one render to the next (see [`render_from`]) so that a change to one
/// Service does not move the keys, and rewrite the rules, of any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Which endpoint map.
    pub bucket: u32,
    /// First key.
    pub offset: u32,
    /// Number of keys reserved.
    pub capacity: u32,
}

/// The complete desired ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Tables: each family's frame and NAT tables.
    pub tables: BTreeMap<TableId, Table>,
    /// Endpoint-map slots by family and Service port (`NS/NAME/PROTO/PORT`).
    pub slots: BTreeMap<Family, BTreeMap<String, Slot>>,
}

impl Ruleset {
    /// Number of map and set elements we program (dynamic affinity entries excluded).
    pub fn element_count(&self) -> usize {
        self.tables.values().flat_map(|t| t.collections.values()).map(|c| c.elements.len()).sum()
    }

    /// Number of rules over all chains.
    pub fn rule_count(&self) -> usize {
        self.tables.values().flat_map(|t| t.chains.values()).map(|c| c.rules.len()).sum()
    }
}

/// The nft family keyword.
pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_kw(family: Family) -> &'static str {
    family_name(family)
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn loopback(family: Family) -> &'static str {
    match family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1",
    }
}

/// Chain-name part for a Service port: nft identifiers allow `/`, `.`, `-`, `_` but not `:`.
fn port_id(svc: &ServiceModel, port: &PortModel) -> String {
    format!("{}/{}/{}/{}", svc.key.namespace, svc.key.name, port.protocol.nft_name(), port.port)
}

fn dnat_target(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Renders the ruleset for the model, allocating endpoint-map slots from scratch.
pub fn render(model: &ClusterModel, config: &RenderConfig) -> Ruleset {
    render_from(model, config, None)
}

/// Renders the ruleset for the model, keeping the endpoint-map slots of `previous` (the
/// ruleset in the kernel) for the Service ports that still fit in them, so that a partial
/// sync only touches what changed.
pub fn render_from(model: &ClusterModel, config: &RenderConfig, previous: Option<&Ruleset>) -> Ruleset {
    let mut ruleset = skeletons(config);
    for family in [Family::V4, Family::V6] {
        let mut slots = SlotAllocator::new(previous.and_then(|p| p.slots.get(&family)));
        render_services(&mut ruleset.tables, &mut slots, model.services.values(), family);
        ruleset.slots.insert(family, slots.assigned);
    }
    ruleset
}

/// Renders the ruleset of `services` with the slots they were given (a full resync of
/// incrementally kept state).
pub fn render_with_slots<'a>(
    services: impl Iterator<Item = &'a ServiceModel> + Clone,
    config: &RenderConfig,
    slots: &BTreeMap<Family, SlotTable>,
) -> Ruleset {
    let mut ruleset = skeletons(config);
    for family in [Family::V4, Family::V6] {
        let empty = SlotTable::default();
        let mut fixed = FixedSlots { table: slots.get(&family).unwrap_or(&empty), used: Vec::new() };
        render_services(&mut ruleset.tables, &mut fixed, services.clone(), family);
        ruleset.slots.insert(family, fixed.used.into_iter().collect());
    }
    ruleset
}

/// Renders the `family` part of each of `services` into `tables` (which hold every table of
/// ours).
fn render_services<'a>(
    tables: &mut BTreeMap<TableId, Table>,
    slots: &mut dyn SlotSource,
    services: impl Iterator<Item = &'a ServiceModel>,
    family: Family,
) {
    let frame_id = TableId::frame(family);
    let mut frame = tables.remove(&frame_id).unwrap_or_default();
    for svc in services.filter(|svc| svc.families.contains(&family)) {
        let nat = tables.entry(TableId::nat(family, &svc.key.namespace, &svc.key.name)).or_default();
        render_service(&mut frame, nat, slots, svc, family);
    }
    tables.insert(frame_id, frame);
}

/// Every table of ours with nothing of any Service.
fn skeletons(config: &RenderConfig) -> Ruleset {
    let tables = TableId::all().map(|id| (id, base_table(id, config))).collect();
    Ruleset { tables, slots: BTreeMap::new() }
}

/// What one Service renders to in one family, in its frame table and its NAT table (in that
/// order): its own chains and sets, and its elements of the shared maps (only the shared
/// collections it adds to are present, holding only its elements).
pub fn render_fragment(svc: &ServiceModel, family: Family, slots: &mut dyn SlotSource) -> [(TableId, Table); 2] {
    let (mut frame, mut nat) = (Table::default(), Table::default());
    render_service(&mut frame, &mut nat, slots, svc, family);
    [(TableId::frame(family), frame), (TableId::nat(family, &svc.key.namespace, &svc.key.name), nat)]
}

/// Where rendering gets a Service port's endpoint-map slot from.
pub trait SlotSource {
    /// The slot of `port_id` for `endpoints` endpoints; `None` falls back to an anonymous map.
    fn slot(&mut self, port_id: &str, endpoints: usize) -> Option<Slot>;
}

/// Slots kept across syncs: a port keeps its slot while it fits; a slot given up stays
/// reserved until [`SlotTable::release`] (after the transaction that stops using it).
#[derive(Debug, Clone, Default)]
pub struct SlotTable {
    /// Reserved ranges per bucket: start → end (exclusive).
    taken: BTreeMap<u32, BTreeMap<u64, u64>>,
    /// Slot of each Service port.
    assigned: std::collections::HashMap<String, Slot>,
}

impl SlotTable {
    /// The slot `port_id` has now.
    pub fn get(&self, port_id: &str) -> Option<Slot> {
        self.assigned.get(port_id).copied()
    }

    /// Forgets `port_id`'s slot; its range stays reserved until released.
    pub fn unassign(&mut self, port_id: &str) -> Option<Slot> {
        self.assigned.remove(port_id)
    }

    /// Gives `port_id` the slot a previous agent left it (see [`crate::adopt`]), unless the
    /// port has one or the keys overlap a slot taken already; returns whether it did.
    pub fn adopt(&mut self, port_id: &str, slot: Slot) -> bool {
        let start = u64::from(slot.offset);
        let end = start + u64::from(slot.capacity);
        let ranges = self.taken.entry(slot.bucket).or_default();
        let overlaps = ranges.range(..end).next_back().is_some_and(|(_, e)| *e > start);
        if overlaps || self.assigned.contains_key(port_id) {
            return false;
        }
        ranges.insert(start, end);
        self.assigned.insert(port_id.to_string(), slot);
        true
    }

    /// Makes `slot`'s keys available again.
    pub fn release(&mut self, slot: Slot) {
        if let Some(ranges) = self.taken.get_mut(&slot.bucket) {
            ranges.remove(&u64::from(slot.offset));
        }
    }
}

impl SlotSource for SlotTable {
    fn slot(&mut self, port_id: &str, endpoints: usize) -> Option<Slot> {
        let bucket = stable_hash(port_id) % ENDPOINT_MAP_BUCKETS;
        let wanted = u32::try_from(endpoints).ok()?;
        if let Some(prev) = self.assigned.get(port_id)
            && prev.bucket == bucket
            && prev.capacity >= wanted
        {
            return Some(*prev);
        }
        let slot = allocate(self.taken.entry(bucket).or_default(), bucket, wanted)?;
        self.assigned.insert(port_id.to_string(), slot);
        Some(slot)
    }
}

/// The slots of a [`SlotTable`] as they are, recording which ports asked (rendering what a
/// Service had, or a full resync of what is kept).
pub struct FixedSlots<'a> {
    /// The slots.
    pub table: &'a SlotTable,
    /// Ports that had a slot.
    pub used: Vec<(String, Slot)>,
}

impl SlotSource for FixedSlots<'_> {
    fn slot(&mut self, port_id: &str, _endpoints: usize) -> Option<Slot> {
        let slot = self.table.get(port_id)?;
        self.used.push((port_id.to_string(), slot));
        Some(slot)
    }
}

/// The first free range of `bucket` for `wanted` keys (a power of two, at least
/// [`MIN_SLOT_CAPACITY`]), reserved; `None` when the bucket is full.
fn allocate(ranges: &mut BTreeMap<u64, u64>, bucket: u32, wanted: u32) -> Option<Slot> {
    let capacity = wanted.checked_next_power_of_two()?.max(MIN_SLOT_CAPACITY);
    let mut cursor = 0u64;
    for (&start, &end) in ranges.iter() {
        if start >= cursor + u64::from(capacity) {
            break;
        }
        cursor = cursor.max(end);
    }
    if cursor + u64::from(capacity) > 1 << 32 {
        return None;
    }
    ranges.insert(cursor, cursor + u64::from(capacity));
    Some(Slot { bucket, offset: u32::try_from(cursor).ok()?, capacity })
}

/// FNV-1a: a hash that is the same in every build and process.
fn stable_hash(text: &str) -> u32 {
    fnv1a(FNV_OFFSET, text)
}

const FNV_OFFSET: u32 = 0x811c_9dc5;

/// FNV-1a of `text` continued from `hash` (of what came before it).
fn fnv1a(hash: u32, text: &str) -> u32 {
    text.bytes().fold(hash, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Hands out endpoint-map slots. Slots of the previous ruleset stay reserved for the whole
/// render (even those of ports that are gone), so a key is never given to another Service
/// port in the transaction that removes its old element.
struct SlotAllocator<'a> {
    previous: Option<&'a BTreeMap<String, Slot>>,
    /// Reserved ranges per bucket: start → end (exclusive).
    taken: BTreeMap<u32, BTreeMap<u64, u64>>,
    assigned: BTreeMap<String, Slot>,
}

impl<'a> SlotAllocator<'a> {
    fn new(previous: Option<&'a BTreeMap<String, Slot>>) -> Self {
        let mut taken: BTreeMap<u32, BTreeMap<u64, u64>> = BTreeMap::new();
        for slot in previous.into_iter().flat_map(|p| p.values()) {
            let start = u64::from(slot.offset);
            taken.entry(slot.bucket).or_default().insert(start, start + u64::from(slot.capacity));
        }
        Self { previous, taken, assigned: BTreeMap::new() }
    }
}

impl SlotSource for SlotAllocator<'_> {
    /// Its previous slot when big enough, else the first free range of its bucket.
    fn slot(&mut self, port_id: &str, endpoints: usize) -> Option<Slot> {
        let bucket = stable_hash(port_id) % ENDPOINT_MAP_BUCKETS;
        let wanted = u32::try_from(endpoints).ok()?;
        if let Some(prev) = self.previous.and_then(|p| p.get(port_id))
            && prev.bucket == bucket
            && prev.capacity >= wanted
        {
            self.assigned.insert(port_id.to_string(), *prev);
            return Some(*prev);
        }
        let slot = allocate(self.taken.entry(bucket).or_default(), bucket, wanted)?;
        self.assigned.insert(port_id.to_string(), slot);
        Some(slot)
    }
}

/// The part of a table that is there whatever the Services: base chains, dispatch chains,
/// and the shared sets and maps, empty.
pub fn base_table(id: TableId, config: &RenderConfig) -> Table {
    if id.is_frame() { frame_skeleton(id.family, config) } else { nat_skeleton(id.family, config) }
}

/// The first (lowest) bucket of the endpoint maps `svc`'s ports would take slots in
/// ([`ENDPOINT_MAP_BUCKETS`] for a Service without ports).
pub fn first_endpoint_bucket(svc: &ServiceModel) -> u32 {
    svc.ports
        .iter()
        .map(|port| stable_hash(&port_id(svc, port)) % ENDPOINT_MAP_BUCKETS)
        .min()
        .unwrap_or(ENDPOINT_MAP_BUCKETS)
}

/// The endpoint map of `proto` and `bucket` in `family`, declared empty: its name and
/// declaration.
pub fn declared_endpoint_map(family: Family, proto: &str, bucket: u32) -> (String, Collection) {
    (endpoint_map_name(proto, bucket), endpoint_map(family, proto))
}

/// An endpoint map's declaration, empty: slot keys to `address . port`.
fn endpoint_map(family: Family, proto: &str) -> Collection {
    Collection {
        decl: format!("typeof numgen random mod 2 : {} daddr . {proto} dport;", addr_kw(family)),
        is_map: true,
        elements: BTreeMap::new(),
    }
}

fn base_chain(kind: &str, hook: &str, prio: &str, jump: &str) -> Chain {
    Chain {
        base: Some(format!("type {kind} hook {hook} priority {prio}; policy accept;")),
        rules: vec![format!("jump {jump}")],
    }
}

/// The collections of the frame tables; all others are in the NAT tables.
const FRAME_COLLECTIONS: [&str; 3] = ["filter-addresses", "filter-nodeports", "hairpin"];

/// A family's frame table, `hawser`: what every packet passes (filtering: source ranges,
/// rejects) and masquerading.
fn frame_skeleton(family: Family, config: &RenderConfig) -> Table {
    let fam = addr_kw(family);
    let mark = config.masquerade_mark;
    let mut t = Table::default();
    // Priorities are numeric: nft 1.0.x refuses the `dstnat` keyword on the output hook.
    // Filtering runs before our DNAT (-110) so that source ranges and rejects see the
    // original destination; both run before kube-proxy's dstnat so hawser decides first.
    t.chains.insert("filter-prerouting".into(), base_chain("filter", "prerouting", "-115", "filter-dispatch"));
    t.chains.insert("filter-output".into(), base_chain("filter", "output", "-115", "filter-dispatch"));
    t.chains.insert(
        "nat-postrouting".into(),
        Chain {
            base: Some("type nat hook postrouting priority 90; policy accept;".into()),
            rules: vec![
                // Clear our bit so the packet leaves unmarked; the conntrack entry keeps the NAT.
                format!("meta mark & {mark:#010x} != 0 meta mark set meta mark ^ {mark:#010x} masquerade fully-random"),
                // Hairpin: a pod reaching its own Service through us must be masqueraded or
                // the reply would bypass the reverse NAT. After DNAT its source and
                // destination are both the endpoint's address.
                format!("ct status dnat {fam} saddr . {fam} daddr @hairpin masquerade fully-random"),
            ],
        },
    );
    t.chains.insert(
        "filter-dispatch".into(),
        Chain {
            base: None,
            rules: vec![
                format!("{fam} daddr . meta l4proto . th dport vmap @filter-addresses"),
                format!("{} meta l4proto . th dport vmap @filter-nodeports", nodeport_match(family)),
            ],
        },
    );
    t.chains.insert(
        "reject-chain".into(),
        Chain {
            base: None,
            // A TCP reset makes connect() fail with ECONNREFUSED at once; other protocols get
            // ICMP port unreachable.
            rules: vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()],
        },
    );
    t.collections = shared_collections(family)
        .iter()
        .filter(|(name, _)| FRAME_COLLECTIONS.contains(&name.as_str()))
        .map(|(name, c)| (name.clone(), c.clone()))
        .collect();
    t
}

/// NodePorts: only this node's own addresses, never loopback (kube-proxy's rule: a NodePort on
/// 127.0.0.1 would need route_localnet and expose the Service locally).
fn nodeport_match(family: Family) -> String {
    format!("fib daddr type local {} daddr != {}", addr_kw(family), loopback(family))
}

/// One of a family's NAT tables: the DNAT of its Services, and their ClientIP affinity.
fn nat_skeleton(family: Family, config: &RenderConfig) -> Table {
    let fam = addr_kw(family);
    let mark = config.masquerade_mark;
    let nodeport_match = nodeport_match(family);
    let mut t = Table::default();
    // Every NAT table's chains run at this priority: the kernel's NAT hook stops at the first
    // chain that DNATs, so a connection's later tables are skipped.
    t.chains.insert("nat-prerouting".into(), base_chain("nat", "prerouting", "-110", "services"));
    t.chains.insert("nat-output".into(), base_chain("nat", "output", "-110", "services"));
    // Local policy keeps the client's address. Cluster policy masquerades all it DNATs: the
    // rule sets our mark bit before its lookup, and the last rule clears it again when neither
    // Cluster lookup matched. Marking in the `svc-…` chains instead would cost the kernel three
    // more expressions to parse for each of them (about a fifth of a 10k-Service load). The
    // bit is ours: a packet that enters with it and is not for a Service leaves without it.
    let mut services = vec![
        format!("{fam} daddr . meta l4proto . th dport vmap @{SERVICE_ADDRESSES_LOCAL}"),
        format!("{nodeport_match} meta l4proto . th dport vmap @{SERVICE_NODEPORTS_LOCAL}"),
        format!(
            "meta mark set meta mark | {mark:#010x} {fam} daddr . meta l4proto . th dport vmap @{SERVICE_ADDRESSES}"
        ),
        format!("{nodeport_match} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        format!("meta mark set meta mark & {:#010x}", !mark),
    ];
    if family == Family::V4 {
        // A client with a ClientIP affinity entry for this frontend goes back to its endpoint
        // (the entry exists only while that endpoint serves the frontend's port; see
        // `affinity-dispatch`); Cluster policy marks it for masquerade, as the dispatch below
        // would. An entry is keyed by the frontend itself, so the only check needed is that a
        // NodePort entry's address is this node's: its recording cannot tell (a connection
        // another proxy DNATed, to a port equal to one of our NodePorts, is recorded too).
        // Looking our frontends up in `affinity-addresses`/`-nodeports` here would make the
        // kernel walk those `jump` maps at every commit that adds a rule.
        let entry = format!("{fam} saddr . {fam} daddr . meta l4proto . th dport");
        let kinds = [
            (String::new(), AFFINITY_LOCAL, AFFINITY_CLUSTER),
            (format!("{nodeport_match} "), AFFINITY_LOCAL_NODEPORTS, AFFINITY_CLUSTER_NODEPORTS),
        ];
        let lookups = kinds.into_iter().flat_map(|(gate, local, cluster)| {
            [
                format!("{gate}dnat to {entry} map @{local}"),
                format!(
                    "{gate}{entry} @{cluster} meta mark set meta mark | {mark:#010x} dnat to {entry} map @{cluster}"
                ),
            ]
        });
        services.splice(0..0, lookups);
        affinity_recording(&mut t, fam);
    }
    t.chains.insert("services".into(), Chain { base: None, rules: services });
    t.collections = shared_collections(family)
        .iter()
        .filter(|(name, _)| !FRAME_COLLECTIONS.contains(&name.as_str()))
        .map(|(name, c)| (name.clone(), c.clone()))
        .collect();
    t
}

/// The chains recording IPv4 ClientIP affinity entries.
///
/// An entry is recorded once the connection is DNATed: every nat chain runs in the kernel's
/// NAT hook at -100, whatever its own priority, so -99 is the first point after it. The
/// original destination is then the frontend, the destination the endpoint picked. Only an
/// endpoint that serves an affinity port (`affinity-endpoints`) of a frontend with affinity
/// (`affinity-addresses`, `affinity-nodeports`) is recorded, through the frontend's
/// `affinity-rec-POLICY-TIMEOUT-PROTO` chain.
fn affinity_recording(t: &mut Table, fam: &str) {
    let record = format!(
        "ct state new ct status dnat {fam} daddr . meta l4proto . th dport @{AFFINITY_ENDPOINTS} jump affinity-dispatch"
    );
    for hook in ["prerouting", "output"] {
        t.chains.insert(
            format!("affinity-{hook}"),
            Chain {
                base: Some(format!("type filter hook {hook} priority -99; policy accept;")),
                rules: vec![record.clone()],
            },
        );
    }
    // nft types `ct original proto-dst` only after a protocol match; one match of all three
    // keeps it to one rule per map. Every commit that adds a rule makes the kernel walk each
    // `vmap` of every chain it reaches, once per rule looking the map up: with a rule per
    // protocol, the 10k-Service affinity maps were walked three times over.
    let protos = Protocol::ALL.map(Protocol::nft_name).join(", ");
    let rules = vec![
        format!(
            "meta l4proto {{ {protos} }} ct original {fam} daddr . meta l4proto . ct original proto-dst vmap @{AFFINITY_ADDRESSES}"
        ),
        format!("meta l4proto {{ {protos} }} meta l4proto . ct original proto-dst vmap @{AFFINITY_NODEPORTS}"),
    ];
    t.chains.insert("affinity-dispatch".into(), Chain { base: None, rules });
}

/// The verdict maps from a Cluster-policy Service's frontend (`address . protocol . port`) to
/// its `svc-…` chain; `services` marks what they match for masquerade.
pub const SERVICE_ADDRESSES: &str = "service-addresses";
/// The same from its NodePort (`protocol . port`).
pub const SERVICE_NODEPORTS: &str = "service-nodeports";
/// [`SERVICE_ADDRESSES`] of Local-policy Services, which keep the client's address.
pub const SERVICE_ADDRESSES_LOCAL: &str = "service-addresses-local";
/// [`SERVICE_NODEPORTS`] of Local-policy Services.
pub const SERVICE_NODEPORTS_LOCAL: &str = "service-nodeports-local";
const SERVICE_MAPS: [&str; 2] = [SERVICE_ADDRESSES, SERVICE_NODEPORTS];
const SERVICE_MAPS_LOCAL: [&str; 2] = [SERVICE_ADDRESSES_LOCAL, SERVICE_NODEPORTS_LOCAL];
const FILTER_MAPS: [&str; 2] = ["filter-addresses", "filter-nodeports"];

/// Names of the collections of the skeleton that every Service adds elements to.
pub const SHARED_COLLECTIONS: [&str; 15] = [
    "filter-addresses",
    SERVICE_ADDRESSES,
    SERVICE_ADDRESSES_LOCAL,
    "filter-nodeports",
    SERVICE_NODEPORTS,
    SERVICE_NODEPORTS_LOCAL,
    "hairpin",
    AFFINITY_ENDPOINTS,
    AFFINITY_ADDRESSES,
    AFFINITY_NODEPORTS,
    AFFINITY_CLUSTER,
    AFFINITY_LOCAL,
    AFFINITY_CLUSTER_NODEPORTS,
    AFFINITY_LOCAL_NODEPORTS,
    AFFINITY_SET,
];

/// Shared collection `name` of `table`, declared as the skeleton does when `table` (a
/// fragment) has no element of it yet; `None` when the skeleton of `family` has none of that
/// name.
fn shared<'t>(table: &'t mut Table, family: Family, name: &str) -> Option<&'t mut Collection> {
    if !table.collections.contains_key(name) {
        let declared = shared_collections(family).get(name)?;
        table.collections.insert(name.to_string(), declared.clone());
    }
    table.collections.get_mut(name)
}

/// The skeleton's dispatch maps and hairpin set, empty, declared once per family.
fn shared_collections(family: Family) -> &'static BTreeMap<String, Collection> {
    static DECLARED: std::sync::LazyLock<[BTreeMap<String, Collection>; 2]> =
        std::sync::LazyLock::new(|| [declare_shared(Family::V4), declare_shared(Family::V6)]);
    &DECLARED[usize::from(family == Family::V6)]
}

fn declare_shared(family: Family) -> BTreeMap<String, Collection> {
    let mut collections = BTreeMap::new();
    let addr_map = format!("type {} . inet_proto . inet_service : verdict;", addr_type(family));
    let port_map = "type inet_proto . inet_service : verdict;".to_string();
    for (name, decl) in [
        ("filter-addresses", &addr_map),
        (SERVICE_ADDRESSES, &addr_map),
        (SERVICE_ADDRESSES_LOCAL, &addr_map),
        ("filter-nodeports", &port_map),
        (SERVICE_NODEPORTS, &port_map),
        (SERVICE_NODEPORTS_LOCAL, &port_map),
    ] {
        collections.insert(name.into(), Collection { decl: decl.clone(), is_map: true, elements: BTreeMap::new() });
    }
    let addr = addr_type(family);
    collections.insert(
        "hairpin".into(),
        Collection { decl: format!("type {addr} . {addr};"), is_map: false, elements: BTreeMap::new() },
    );
    if family == Family::V6 {
        collections.insert(
            AFFINITY_SET.into(),
            Collection {
                decl: format!(
                    "type {addr} . {addr} . inet_service . mark; flags dynamic,timeout; size {AFFINITY_MAP_SIZE};"
                ),
                is_map: false,
                elements: BTreeMap::new(),
            },
        );
        return collections;
    }
    for (name, decl) in [(AFFINITY_ADDRESSES, &addr_map), (AFFINITY_NODEPORTS, &port_map)] {
        collections.insert(name.into(), Collection { decl: decl.clone(), is_map: true, elements: BTreeMap::new() });
    }
    collections.insert(
        AFFINITY_ENDPOINTS.into(),
        Collection {
            decl: format!("type {addr} . inet_proto . inet_service;"),
            is_map: false,
            elements: BTreeMap::new(),
        },
    );
    for map in AFFINITY_MAPS {
        collections.insert(
            map.name.into(),
            Collection {
                decl: format!(
                    "type {addr} . {addr} . inet_proto . inet_service : {addr} . inet_service; flags dynamic,timeout; size {AFFINITY_MAP_SIZE};"
                ),
                is_map: true,
                elements: BTreeMap::new(),
            },
        );
    }
    collections
}

/// One set of endpoint maps per protocol: with a shared `th dport` in the `typeof`, nft 1.0.6
/// rejects rules added to an existing map ("conflicting protocols specified: tcp vs. th").
fn endpoint_map_name(proto: &str, bucket: u32) -> String {
    format!("{ENDPOINT_MAP_PREFIX}{proto}-{bucket:02x}")
}

/// The protocol of endpoint map `name` (`endpoints-PROTO-BUCKET`).
pub fn endpoint_map_protocol(name: &str) -> Option<&str> {
    Some(name.strip_prefix(ENDPOINT_MAP_PREFIX)?.rsplit_once('-')?.0)
}

/// The bucket of endpoint map `name` (`endpoints-PROTO-BUCKET`, the bucket in hex).
pub fn endpoint_map_bucket(name: &str) -> Option<u32> {
    u32::from_str_radix(name.strip_prefix(ENDPOINT_MAP_PREFIX)?.rsplit_once('-')?.1, 16).ok()
}

/// Renders `svc`'s `family` part: its filtering and hairpin elements into the family's
/// `frame`, the rest into `table`, its NAT table.
fn render_service(
    frame: &mut Table,
    table: &mut Table,
    slots: &mut dyn SlotSource,
    svc: &ServiceModel,
    family: Family,
) {
    let fam = addr_kw(family);
    let addresses: Vec<IpAddr> = svc.lb_addresses.iter().copied().filter(|a| Family::of(a) == family).collect();
    let allowed: Option<Vec<IpNet>> = svc.source_ranges.as_ref().map(|ranges| {
        // nft rejects overlapping intervals in one anonymous set ("conflicting intervals"),
        // so overlapping or adjacent ranges are merged first.
        IpNet::aggregate(
            &ranges
                .iter()
                .copied()
                .filter(|n| match n {
                    IpNet::V4(_) => family == Family::V4,
                    IpNet::V6(_) => family == Family::V6,
                })
                .collect::<Vec<_>>(),
        )
    });

    for port in &svc.ports {
        let pid = port_id(svc, port);
        let proto = port.protocol.nft_name();
        let (endpoints, _) = svc.usable_endpoints(port, family);

        // Filter: source ranges, then reject/drop when nothing can serve.
        let mut fw_rules = Vec::new();
        match &allowed {
            None => {}
            // Restricted, but to other families only: nothing of this family is allowed.
            Some(nets) if nets.is_empty() => fw_rules.push("drop".to_string()),
            Some(nets) => {
                let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
                fw_rules.push(format!("{fam} saddr != {{ {} }} drop", list.join(", ")));
            }
        }
        if endpoints.is_empty() {
            if svc.has_cluster_endpoints(port, family) {
                // Local policy without a local endpoint: drop, as the load balancer's health
                // check (per-Service path) already steers traffic away from this node.
                fw_rules.push("ct state new drop".into());
            } else {
                fw_rules.push("ct state new goto reject-chain".into());
            }
        }
        if !fw_rules.is_empty() {
            let fw = format!("fw-{pid}");
            frame.chains.insert(fw.clone(), Chain { base: None, rules: fw_rules });
            insert_dispatch(frame, family, FILTER_MAPS, &addresses, port, &format!("goto {fw}"));
        }

        if endpoints.is_empty() {
            continue;
        }

        // NAT: one service chain. Cluster policy masquerades all it DNATs (`services` marks
        // it); Local keeps the client's address, so only a pod reaching itself (hairpin) is
        // masqueraded.
        let svc_chain = format!("svc-{pid}");
        let local = svc.traffic_policy == TrafficPolicy::Local;
        if local && let Some(hairpin) = shared(frame, family, "hairpin") {
            for ep in &endpoints {
                hairpin.elements.insert(format!("{} . {}", ep.ip, ep.ip), String::new());
            }
        }
        let mut rules = Vec::new();
        match (svc.affinity_timeout, family) {
            (Some(timeout), Family::V6) => affinity_rules_v6(&mut rules, &pid, proto, &endpoints, timeout),
            (affinity, _) => {
                if let Some(timeout) = affinity {
                    record_affinity(table, &addresses, port, &endpoints, family, svc.traffic_policy, timeout);
                }
                dnat_rules(table, slots, &mut rules, &pid, proto, &endpoints, family);
            }
        }
        table.chains.insert(svc_chain.clone(), Chain { base: None, rules });
        let maps = if local { SERVICE_MAPS_LOCAL } else { SERVICE_MAPS };
        insert_dispatch(table, family, maps, &addresses, port, &format!("goto {svc_chain}"));
    }
}

/// `dnat to` the one endpoint, or to a random one of the port's slot in an endpoint map.
fn dnat_rules(
    table: &mut Table,
    slots: &mut dyn SlotSource,
    rules: &mut Vec<String>,
    pid: &str,
    proto: &str,
    endpoints: &[&Endpoint],
    family: Family,
) {
    let slot = match endpoints {
        [only] => {
            rules.push(format!("meta l4proto {proto} dnat to {}", dnat_target(only.ip, only.port)));
            return;
        }
        _ => slots.slot(pid, endpoints.len()),
    };
    let Some(slot) = slot else {
        // A full bucket (2^32 keys) cannot happen with real endpoint counts; fall back to an
        // anonymous map rather than dropping the Service.
        let arms: Vec<String> =
            endpoints.iter().enumerate().map(|(i, ep)| format!("{i} : {} . {}", ep.ip, ep.port)).collect();
        rules.push(format!(
            "meta l4proto {proto} dnat to numgen random mod {} map {{ {} }}",
            endpoints.len(),
            arms.join(", ")
        ));
        return;
    };
    let name = endpoint_map_name(proto, slot.bucket);
    let map = table.collections.entry(name.clone()).or_insert_with(|| endpoint_map(family, proto));
    for (i, ep) in (slot.offset..).zip(endpoints) {
        map.elements.insert(i.to_string(), format!("{} . {}", ep.ip, ep.port));
    }
    rules.push(format!(
        "meta l4proto {proto} dnat to numgen random mod {} offset {} map @{name}",
        endpoints.len(),
        slot.offset
    ));
}

/// ClientIP affinity for one Service port: its endpoints join `affinity-endpoints` and its
/// frontends (addresses and NodePort) the affinity dispatch maps, which jump to the
/// `affinity-rec-POLICY-TIMEOUT-PROTO[-nodeports]` chain (shared by all such ports) recording
/// `client . frontend address . protocol . frontend port : endpoint . port` in the map of the
/// policy and kind of frontend, with the Service's timeout. The `services` chain sends a
/// client with an entry straight to its endpoint: one lookup, whatever the number of
/// endpoints or affinity Services.
///
/// An entry outlives its endpoint only until the sync that removes the endpoint (or the
/// frontend, or changes the policy) deletes it ([`crate::sync`] purges it); once the endpoint
/// has left `affinity-endpoints` no new entry can name it.
fn record_affinity(
    table: &mut Table,
    addresses: &[IpAddr],
    port: &PortModel,
    endpoints: &[&Endpoint],
    family: Family,
    policy: TrafficPolicy,
    timeout: u32,
) {
    let fam = addr_kw(family);
    let proto = port.protocol.nft_name();
    let policy_name = match policy {
        TrafficPolicy::Cluster => "cluster",
        TrafficPolicy::Local => "local",
    };
    let chains = [
        format!("{AFFINITY_RECORD_PREFIX}{policy_name}-{timeout}-{proto}"),
        format!("{AFFINITY_RECORD_PREFIX}{policy_name}-{timeout}-{proto}{NODEPORT_RECORD_SUFFIX}"),
    ];
    for (chain, node_port) in chains.iter().zip([false, true]) {
        let map =
            AFFINITY_MAPS.iter().find(|m| m.policy == policy_name && m.node_port == node_port).map_or("", |m| m.name);
        table.chains.entry(chain.clone()).or_insert_with(|| Chain {
            base: None,
            rules: vec![format!(
                "meta l4proto {proto} update @{map} {{ {fam} saddr . ct original {fam} daddr . meta l4proto . ct original proto-dst timeout {timeout}s : {fam} daddr . {proto} dport }}"
            )],
        });
    }
    if let Some(set) = shared(table, family, AFFINITY_ENDPOINTS) {
        for ep in endpoints {
            set.elements.insert(format!("{} . {proto} . {}", ep.ip, ep.port), String::new());
        }
    }
    let [to_addresses, to_node_port] = chains.map(|chain| format!("jump {chain}"));
    insert_dispatch_to(
        table,
        family,
        [AFFINITY_ADDRESSES, AFFINITY_NODEPORTS],
        addresses,
        port,
        [&to_addresses, &to_node_port],
    );
}

/// The dynamic maps of ClientIP affinity entries, per traffic policy (a Cluster-policy entry
/// also sets the masquerade mark).
pub const AFFINITY_CLUSTER: &str = "affinity-cluster";
/// See [`AFFINITY_CLUSTER`].
pub const AFFINITY_LOCAL: &str = "affinity-local";
/// The endpoints (`address . protocol . port`) of all ports with ClientIP affinity.
pub const AFFINITY_ENDPOINTS: &str = "affinity-endpoints";
/// Frontend address, protocol and port of each port with ClientIP affinity, to the chain
/// recording its entries.
pub const AFFINITY_ADDRESSES: &str = "affinity-addresses";
/// NodePorts with ClientIP affinity, to the chain recording their entries.
pub const AFFINITY_NODEPORTS: &str = "affinity-nodeports";
/// The dynamic maps of the ClientIP affinity entries of NodePort clients, per traffic policy:
/// kept apart so that the `services` chain uses them only for this node's addresses.
pub const AFFINITY_CLUSTER_NODEPORTS: &str = "affinity-cluster-nodeports";
/// See [`AFFINITY_CLUSTER_NODEPORTS`].
pub const AFFINITY_LOCAL_NODEPORTS: &str = "affinity-local-nodeports";
/// A dynamic map of ClientIP affinity entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffinityMap {
    /// Its name.
    pub name: &'static str,
    /// The traffic policy of the ports it records (`cluster`, `local`), as the recording
    /// chains' names spell it.
    pub policy: &'static str,
    /// Whether it records NodePort clients (else load-balancer address clients).
    pub node_port: bool,
}

/// The dynamic maps of ClientIP affinity entries (IPv4), by policy and kind of frontend.
pub const AFFINITY_MAPS: [AffinityMap; 4] = [
    AffinityMap { name: AFFINITY_CLUSTER, policy: "cluster", node_port: false },
    AffinityMap { name: AFFINITY_LOCAL, policy: "local", node_port: false },
    AffinityMap { name: AFFINITY_CLUSTER_NODEPORTS, policy: "cluster", node_port: true },
    AffinityMap { name: AFFINITY_LOCAL_NODEPORTS, policy: "local", node_port: true },
];

/// Chains recording affinity entries: `affinity-rec-POLICY-TIMEOUT-PROTO` for the
/// load-balancer addresses, and the same with [`NODEPORT_RECORD_SUFFIX`] for NodePorts, shared
/// by the ports with that policy, timeout and protocol.
pub const AFFINITY_RECORD_PREFIX: &str = "affinity-rec-";
/// See [`AFFINITY_RECORD_PREFIX`].
pub const NODEPORT_RECORD_SUFFIX: &str = "-nodeports";
/// Most entries each affinity map holds (nft's default for a set filled by rules is 65535,
/// for all affinity Services together). The kernel allocates entries as they come.
pub const AFFINITY_MAP_SIZE: u32 = 1 << 20;

/// ClientIP affinity of IPv6 Service ports, through the `ip6` table's `affinity` set, whose
/// elements are
/// `client . endpoint address . endpoint port . port key` with the Service's timeout: a client
/// with an entry for one of the port's (ready) endpoints goes back to it and refreshes the
/// entry; otherwise one endpoint is picked uniformly (rule `i` of `N` matches with
/// probability `1/(N-i)`, as kube-proxy's iptables rules do) and recorded.
///
/// nft 1.0.6 refuses constants in a lookup key, so the endpoint and port key are written
/// `EXPR & 0 | CONSTANT`. An entry for an endpoint that is gone (or no longer ready) matches
/// no rule and expires. Should the set be full, the last rule DNATs without affinity.
fn affinity_rules_v6(rules: &mut Vec<String>, pid: &str, proto: &str, endpoints: &[&Endpoint], timeout: u32) {
    let fam = "ip6";
    let key = affinity_key(pid);
    let zero = "::";
    let entry = |ep: &Endpoint| format!("{fam} saddr . {} . {} . {key:#010x}", ep.ip, ep.port);
    let record = |ep: &Endpoint| {
        format!(
            "update @{AFFINITY_SET} {{ {} timeout {timeout}s }} meta l4proto {proto} dnat to {}",
            entry(ep),
            dnat_target(ep.ip, ep.port)
        )
    };
    if endpoints.len() > 1 {
        for ep in endpoints {
            rules.push(format!(
                "{fam} saddr . {fam} daddr & {zero} | {} . th dport & 0 | {} . meta mark & 0 | {key:#010x} @{AFFINITY_SET} {}",
                ep.ip,
                ep.port,
                record(ep)
            ));
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        if i + 1 < n {
            rules.push(format!("numgen random mod {} == 0 {}", n - i, record(ep)));
        } else {
            rules.push(record(ep));
        }
    }
    // Reached only when the set is full (the update fails): serve, without affinity.
    if let Some(last) = endpoints.last() {
        rules.push(format!("meta l4proto {proto} dnat to {}", dnat_target(last.ip, last.port)));
    }
}

/// The dynamic set of IPv6 ClientIP affinity entries. nft 1.0.6 cannot generate an update of a
/// dynamic *map* whose key or data concatenates an IPv6 address with anything (it aborts on a
/// register assertion), which the IPv4 shape needs; IPv6 keeps two rules per endpoint.
pub const AFFINITY_SET: &str = "affinity";

/// A Service port's part of its affinity entries: the same in every build and sync, so that
/// entries outlive partial syncs; two ports whose keys collide share only the entries of
/// endpoints (address and port) they both have.
fn affinity_key(pid: &str) -> u32 {
    stable_hash(pid)
}

/// Adds `port`'s frontends to a pair of dispatch maps (addresses, NodePorts), with `verdict`.
fn insert_dispatch(
    table: &mut Table,
    family: Family,
    maps: [&str; 2],
    addresses: &[IpAddr],
    port: &PortModel,
    verdict: &str,
) {
    insert_dispatch_to(table, family, maps, addresses, port, [verdict, verdict]);
}

/// The same with a verdict for the addresses and another for the NodePort.
fn insert_dispatch_to(
    table: &mut Table,
    family: Family,
    [address_map, node_port_map]: [&str; 2],
    addresses: &[IpAddr],
    port: &PortModel,
    [address_verdict, node_port_verdict]: [&str; 2],
) {
    let proto = port.protocol.nft_name();
    if !addresses.is_empty()
        && let Some(map) = shared(table, family, address_map)
    {
        for addr in addresses {
            map.elements.insert(format!("{addr} . {proto} . {}", port.port), address_verdict.to_string());
        }
    }
    if let Some(node_port) = port.node_port
        && let Some(map) = shared(table, family, node_port_map)
    {
        map.elements.insert(format!("{proto} . {node_port}"), node_port_verdict.to_string());
    }
}

/// The full script for `ruleset`, as a fresh transaction would program it (for golden files
/// and debugging).
pub fn to_script(ruleset: &Ruleset) -> String {
    let mut out = String::new();
    for (id, table) in &ruleset.tables {
        let _ = writeln!(out, "add table {id}");
        for (name, c) in &table.collections {
            let kind = if c.is_map { "map" } else { "set" };
            let _ = writeln!(out, "add {kind} {id} {name} {{ {} }}", c.decl);
        }
        for (name, chain) in &table.chains {
            write_chain_decl(&mut out, *id, name, chain);
        }
        for (name, chain) in &table.chains {
            write_rules(&mut out, *id, name, chain);
        }
        for (name, c) in &table.collections {
            write_elements(&mut out, "add", *id, name, c.elements.iter());
        }
    }
    out
}

pub(crate) fn write_chain_decl(out: &mut String, id: TableId, name: &str, chain: &Chain) {
    match &chain.base {
        Some(base) => {
            let _ = writeln!(out, "add chain {id} {name} {{ {base} }}");
        }
        None => {
            let _ = writeln!(out, "add chain {id} {name}");
        }
    }
}

pub(crate) fn write_rules(out: &mut String, id: TableId, name: &str, chain: &Chain) {
    for rule in &chain.rules {
        let _ = writeln!(out, "add rule {id} {name} {rule}");
    }
}

/// Writes elements in batches: one `add element` per element would make a 10k-Service script
/// needlessly long for nft to parse.
pub(crate) fn write_elements<'a>(
    out: &mut String,
    verb: &str,
    id: TableId,
    name: &str,
    elements: impl Iterator<Item = (&'a String, &'a String)>,
) {
    let mut batch: Vec<String> = Vec::new();
    let flush = |out: &mut String, batch: &mut Vec<String>| {
        if !batch.is_empty() {
            let _ = writeln!(out, "{verb} element {id} {name} {{ {} }}", batch.join(", "));
            batch.clear();
        }
    };
    for (k, v) in elements {
        if v.is_empty() || verb == "delete" {
            batch.push(k.clone());
        } else {
            batch.push(format!("{k} : {v}"));
        }
        if batch.len() >= 512 {
            flush(out, &mut batch);
        }
    }
    flush(out, &mut batch);
}

/// Names of chains that a `svc-…`/`fw-…` chain belongs to, for tests and tooling.
pub fn service_chain_names(ruleset: &Ruleset, family: Family) -> BTreeSet<String> {
    ruleset
        .tables
        .iter()
        .filter(|(id, _)| id.family == family)
        .flat_map(|(_, t)| t.chains.keys())
        .filter(|k| k.starts_with("svc-") || k.starts_with("ep-") || k.starts_with("fw-"))
        .cloned()
        .collect()
}

impl Ruleset {
    /// The tables of `family`.
    pub fn family(&self, family: Family) -> impl Iterator<Item = (&TableId, &Table)> {
        self.tables.iter().filter(move |(id, _)| id.family == family)
    }

    /// The tables of `family` as one (for tests and tooling): every chain and collection,
    /// with the elements of the collections of the same name together.
    pub fn merged(&self, family: Family) -> Table {
        let mut merged = Table::default();
        for (_, table) in self.family(family) {
            merged.chains.extend(table.chains.iter().map(|(n, c)| (n.clone(), c.clone())));
            for (name, c) in &table.collections {
                let into = merged.collections.entry(name.clone()).or_insert_with(|| c.clone_empty());
                into.elements.extend(c.elements.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        merged
    }
}
