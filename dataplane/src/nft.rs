//! Applies rulesets to the kernel: runs `nft -f -` with a generated script, one transaction
//! per sync, and keeps what was applied to diff the next sync against.
//!
//! We run the `nft` binary ourselves rather than using the `nftables` crate because that crate
//! drops nft's stderr, and nft's error text is what makes a failed sync debuggable.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::affinity::{self, AffinityEntry};
use crate::diff::{FullSync, Plan, Stale, StepWriter, cleanup_script, full_plan, partial_plan};
use crate::netlink::{Attrs, Batch, Netlink};
use crate::render::{AFFINITY_MAPS, Ruleset, TableId};

/// Failure to run an nft transaction.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// nft could not be started or talked to.
    #[error("running {program:?}: {source}")]
    Spawn {
        /// The command line that failed.
        program: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// nft ran and rejected the transaction; nothing of it was applied.
    #[error("nft rejected the transaction ({status}): {stderr}")]
    Rejected {
        /// Exit status.
        status: String,
        /// nft's error output.
        stderr: String,
    },
}

/// Something that runs an nft script as one transaction. Tests of the diff logic use a
/// recording implementation; the agent and the netns tests use [`NftCommand`].
pub trait NftRunner: Send + Sync {
    /// Applies `script` atomically.
    fn run(&self, script: &str) -> Result<(), NftError>;

    /// Applies a partial transaction: `batch`, its netlink encoding when it has one, or
    /// `script`, which says the same. Returns the writer used. Runners without a netlink
    /// socket run the script.
    fn run_partial(&self, script: &str, batch: Option<&Batch>) -> Result<Writer, NftError> {
        let _ = batch;
        self.run(script).map(|()| Writer::Nft)
    }

    /// Applies a full resync atomically.
    fn run_full(&self, full: &FullSync<'_>) -> Result<Writer, NftError> {
        self.run(&full.script()).map(|()| Writer::Nft)
    }

    /// Where to write a full resync in steps ([`Stepwise`](crate::diff::Stepwise)) while it
    /// is rendered: only into a kernel that has none of our tables, and only for runners
    /// that write netlink batches. `None` otherwise; the resync then goes through
    /// [`NftRunner::run_full`].
    fn stepwise(&self) -> Result<Option<Box<dyn StepWriter>>, NftError> {
        Ok(None)
    }

    /// Deletes the ClientIP affinity entries of table `table` that `stale` (given the map's name)
    /// selects; returns how many. Runners that program no kernel have none.
    fn purge_affinity(&self, table: TableId, stale: &StaleEntry<'_>) -> Result<usize, NftError> {
        let _ = (table, stale);
        Ok(0)
    }

    /// The netlink socket to list and write the kernel's tables with, for a full resync to
    /// adopt the tables it finds ([`crate::adopt`]); `None` for runners without one.
    fn netlink(&self) -> Option<Arc<Netlink>> {
        None
    }
}

/// Selects affinity entries to delete: the map's name and the entry.
pub type StaleEntry<'a> = dyn Fn(&str, &AffinityEntry) -> bool + 'a;

/// Entries that expire between the listing and the delete make the delete fail (the kernel
/// refuses to delete what is not there); a purge retries that often with a fresh listing.
const PURGE_ATTEMPTS: usize = 3;

/// Entries the kernel surely lists in one message (one 32 KiB dump buffer holds about 400). A
/// longer listing comes in parts, each resumed by count, so an entry can be missed when others
/// expire meanwhile: the purge then lists again, until a pass deletes nothing (at most
/// [`PURGE_PASSES`] passes).
const ONE_PART: usize = 200;
/// See [`ONE_PART`].
const PURGE_PASSES: usize = 3;

impl<T: NftRunner + ?Sized> NftRunner for Box<T> {
    fn run(&self, script: &str) -> Result<(), NftError> {
        (**self).run(script)
    }

    fn run_partial(&self, script: &str, batch: Option<&Batch>) -> Result<Writer, NftError> {
        (**self).run_partial(script, batch)
    }

    fn run_full(&self, full: &FullSync<'_>) -> Result<Writer, NftError> {
        (**self).run_full(full)
    }

    fn stepwise(&self) -> Result<Option<Box<dyn StepWriter>>, NftError> {
        (**self).stepwise()
    }

    fn purge_affinity(&self, table: TableId, stale: &StaleEntry<'_>) -> Result<usize, NftError> {
        (**self).purge_affinity(table, stale)
    }

    fn netlink(&self) -> Option<Arc<Netlink>> {
        (**self).netlink()
    }
}

/// What wrote a transaction to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// Nothing was written.
    None,
    /// `nft -f -`.
    Nft,
    /// hawser's own nfnetlink batch.
    Netlink,
    /// A full resync into a kernel without our tables: `nft -f -` for the frame (written
    /// ahead by the agent while its lists load), then netlink batches for the rest (see
    /// [`Stepwise`](crate::diff::Stepwise)).
    NftThenNetlink,
}

impl Writer {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Nft => "nft",
            Self::Netlink => "netlink",
            Self::NftThenNetlink => "nft+netlink",
        }
    }
}

/// Runs a real `nft` binary, optionally behind a prefix such as `ip netns exec NODE`, and
/// partial transactions over its own netlink socket when it has one.
#[derive(Debug, Clone)]
pub struct NftCommand {
    argv: Vec<String>,
    netlink: Option<Arc<Netlink>>,
}

impl NftCommand {
    /// `nft` from PATH.
    pub fn new() -> Self {
        Self { argv: vec!["nft".into()], netlink: None }
    }

    /// A custom command line ending in the nft binary, e.g. `["ip","netns","exec","n1","nft"]`.
    pub fn with_argv(argv: Vec<String>) -> Self {
        Self { argv, netlink: None }
    }

    /// Also writes partial transactions through `netlink`, a socket opened in the network
    /// namespace nft programs.
    pub fn with_netlink(mut self, netlink: Netlink) -> Self {
        self.netlink = Some(Arc::new(netlink));
        self
    }

    /// Runs nft with extra arguments and returns stdout (for listing the ruleset).
    pub fn output(&self, args: &[&str]) -> Result<String, NftError> {
        let (program, rest) = self.split();
        let out = Command::new(program).args(rest).args(args).output().map_err(|source| self.spawn_error(source))?;
        if !out.status.success() {
            return Err(NftError::Rejected {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One listing of both affinity maps and one transaction deleting what `stale` selects:
    /// over netlink when the runner has a socket, else with nft. Returns the entries deleted
    /// and the longest listing.
    fn purge_once(&self, table: TableId, stale: &StaleEntry<'_>) -> Result<(usize, usize), NftError> {
        let (mut purged, mut listed) = (0, 0);
        if let Some(netlink) = &self.netlink {
            let mut batch = Batch::new();
            for map in AFFINITY_MAPS.map(|m| m.name) {
                let (mut count, mut keys) = (0, Vec::new());
                netlink.each_element(table, map, |key, data| {
                    count += 1;
                    if AffinityEntry::from_registers(table.family, key, data).is_some_and(|entry| stale(map, &entry)) {
                        keys.push(key.to_vec());
                    }
                })?;
                listed = listed.max(count);
                purged += keys.len();
                batch.delete_raw_elements(table, map, keys.iter().map(Vec::as_slice));
            }
            netlink.commit(&batch)?;
            return Ok((purged, listed));
        }
        let mut script = String::new();
        for map in AFFINITY_MAPS.map(|m| m.name) {
            let entries = affinity::parse_listing(&self.output(&["list", "map", table.fam(), table.name(), map])?);
            listed = listed.max(entries.len());
            let keys: Vec<String> = entries.into_iter().filter(|e| stale(map, e)).map(|e| e.key_text()).collect();
            purged += keys.len();
            if !keys.is_empty() {
                let _ = writeln!(script, "delete element {table} {map} {{ {} }}", keys.join(", "));
            }
        }
        if !script.is_empty() {
            self.run(&script)?;
        }
        Ok((purged, listed))
    }

    fn split(&self) -> (&str, &[String]) {
        match self.argv.split_first() {
            Some((p, rest)) => (p.as_str(), rest),
            None => ("nft", &[]),
        }
    }

    fn spawn_error(&self, source: std::io::Error) -> NftError {
        NftError::Spawn { program: self.argv.join(" "), source }
    }
}

/// Where the steps of a full resync written in steps go: scripts through nft, batches over
/// netlink (what [`NftCommand`] hands the syncer).
pub struct Steps {
    nft: NftCommand,
    netlink: Arc<Netlink>,
}

impl Steps {
    /// Scripts through `nft`, batches over `netlink`.
    pub fn new(nft: NftCommand, netlink: Arc<Netlink>) -> Self {
        Self { nft, netlink }
    }
}

impl StepWriter for Steps {
    fn script(&self, script: &str) -> Result<(), NftError> {
        let started = Instant::now();
        self.nft.run(script)?;
        debug!(bytes = script.len(), ms = started.elapsed().as_secs_f64() * 1e3, "full sync step written by nft");
        Ok(())
    }

    fn batch(&self, batch: &Batch) -> Result<(), NftError> {
        let started = Instant::now();
        self.netlink.commit(batch)?;
        debug!(bytes = batch.len(), ms = started.elapsed().as_secs_f64() * 1e3, "full sync step written over netlink");
        Ok(())
    }

    fn declaration(&self, table: TableId, name: &str) -> Result<Option<Attrs>, NftError> {
        Ok(self.netlink.get_set(table, name)?.map(|set| set.decl))
    }
}

impl Default for NftCommand {
    fn default() -> Self {
        Self::new()
    }
}

impl NftRunner for NftCommand {
    fn run_partial(&self, script: &str, batch: Option<&Batch>) -> Result<Writer, NftError> {
        match (&self.netlink, batch) {
            (Some(netlink), Some(batch)) => netlink.commit(batch).map(|()| Writer::Netlink),
            _ => self.run(script).map(|()| Writer::Nft),
        }
    }

    /// Into a kernel that has none of our tables, the frame through nft and the bulk in
    /// netlink batches (nft spends seconds parsing 10k Services' elements); tables that exist
    /// are replaced atomically by [`NftRunner::run_full`].
    fn stepwise(&self) -> Result<Option<Box<dyn StepWriter>>, NftError> {
        let Some(netlink) = &self.netlink else { return Ok(None) };
        for id in TableId::all() {
            if netlink.table_exists(id)? {
                return Ok(None);
            }
        }
        Ok(Some(Box::new(Steps::new(self.clone(), netlink.clone()))))
    }

    fn netlink(&self) -> Option<Arc<Netlink>> {
        self.netlink.clone()
    }

    fn purge_affinity(&self, table: TableId, stale: &StaleEntry<'_>) -> Result<usize, NftError> {
        let mut purged = 0;
        for pass in 1..=PURGE_PASSES {
            let mut attempt = 0;
            let (deleted, listed) = loop {
                attempt += 1;
                match self.purge_once(table, stale) {
                    Err(NftError::Rejected { .. }) if attempt < PURGE_ATTEMPTS => {}
                    result => break result?,
                }
            };
            purged += deleted;
            if listed <= ONE_PART || (deleted == 0 && pass > 1) {
                break;
            }
        }
        Ok(purged)
    }

    fn run(&self, script: &str) -> Result<(), NftError> {
        let (program, rest) = self.split();
        let mut child = Command::new(program)
            .args(rest)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(|source| self.spawn_error(source))?;
        }
        let out = child.wait_with_output().map_err(|source| self.spawn_error(source))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftError::Rejected {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Whether it was a full resync.
    pub full: bool,
    /// Whether a transaction was run at all.
    pub applied: bool,
    /// Chains created or rewritten.
    pub chains_written: usize,
    /// Elements added or removed.
    pub elements_changed: usize,
    /// Time to compute the plan (for a full resync written in steps: to render and encode it).
    pub diff_time: Duration,
    /// Time writing to the kernel took (for a full resync written in steps, the writes'
    /// own time, which overlaps the rendering).
    pub apply_time: Duration,
    /// What wrote the transaction.
    pub writer: Writer,
    /// ClientIP affinity entries deleted because the sync made them invalid.
    pub affinity_purged: usize,
    /// Why a full resync replaced the tables it found rather than adopting them
    /// ([`crate::adopt`]).
    pub replaced: Option<String>,
}

/// Keeps the applied ruleset and turns desired rulesets into transactions.
pub struct Applier<R> {
    runner: R,
    applied: Option<Ruleset>,
    stale: BTreeSet<Stale>,
}

impl<R: NftRunner> Applier<R> {
    /// An applier whose first sync is a full resync.
    pub fn new(runner: R) -> Self {
        Self { runner, applied: None, stale: BTreeSet::new() }
    }

    /// The runner, e.g. to inspect a recording one.
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// The ruleset currently believed to be in the kernel.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Makes the next sync a full resync.
    pub fn force_full_resync(&mut self) {
        self.applied = None;
        self.stale.clear();
    }

    /// Brings the kernel to `desired` in one transaction. After a failure the kernel keeps
    /// the previous rules (the transaction is atomic) and the next sync is a full resync.
    pub fn sync(&mut self, desired: Ruleset) -> Result<SyncReport, NftError> {
        let started = Instant::now();
        let (plan, full): (Plan, bool) = match &self.applied {
            None => (full_plan(&desired), true),
            Some(applied) => (partial_plan(applied, &self.stale, &desired), false),
        };
        let diff_time = started.elapsed();
        let mut report = SyncReport {
            full,
            applied: false,
            chains_written: plan.chains_written,
            elements_changed: plan.elements_changed,
            diff_time,
            apply_time: Duration::ZERO,
            writer: Writer::None,
            affinity_purged: 0,
            replaced: None,
        };
        if plan.is_empty() {
            return Ok(report);
        }
        let applying = Instant::now();
        if let Err(e) = self.runner.run(&plan.script) {
            self.force_full_resync();
            return Err(e);
        }
        report.apply_time = applying.elapsed();
        report.applied = true;
        report.writer = Writer::Nft;
        self.applied = Some(desired);
        self.stale = plan.stale_after;
        Ok(report)
    }

    /// Deletes both `hawser` tables.
    pub fn cleanup(&mut self) -> Result<(), NftError> {
        self.force_full_resync();
        self.runner.run(&cleanup_script())
    }
}
