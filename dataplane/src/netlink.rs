//! Writes the common partial changes straight to the kernel over nfnetlink, in one batch
//! (one transaction, atomic like `nft -f`).
//!
//! Why: at 10k Services `nft -f` spends 25–60 ms on a one-element change, nearly all of it
//! listing the table's 10k chains and 500 sets into its cache before it sends anything (the
//! kernel's own work on such a change is well under a millisecond; see dataplane/README.md,
//! "Scale"). A partial sync that only changes elements of our maps and sets, and creates,
//! rewrites or empties `svc-…` chains (plain or ClientIP affinity), is encoded here instead, and
//! so is the bulk of a full sync into a node without our tables ([`crate::diff::Stepwise`]);
//! everything else (set declarations, base and filter chains, replacing existing tables) still
//! goes through nft.
//!
//! The encoder understands exactly the element and rule texts the renderer writes for those
//! objects ([`Batch::elements`], [`rule_expressions`]); anything else makes it decline, and the
//! caller runs the nft script. Tests check, through `nft list`, that what is written here reads
//! back as the very text the renderer wrote.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::model::{Family, Protocol as L4};
use crate::nft::NftError;
use crate::render::{
    AFFINITY_ADDRESSES, AFFINITY_ENDPOINTS, AFFINITY_NODEPORTS, SERVICE_ADDRESSES, SERVICE_ADDRESSES_LOCAL,
    SERVICE_NODEPORTS, SERVICE_NODEPORTS_LOCAL, TableId,
};

const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_HANDLE: u16 = 16;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_EXPR: u16 = 17;
const NFTA_SET_EXPRESSIONS: u16 = 18;
/// A set's attributes that nest others.
const NESTED_SET_ATTRIBUTES: [u16; 3] = [NFTA_SET_DESC, NFTA_SET_EXPR, NFTA_SET_EXPRESSIONS];
const NFTA_SET_TYPE: u16 = 19;
const NFTA_SET_COUNT: u16 = 20;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_EVAL: u32 = 0x20;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;

const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_MARK: u32 = 3;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_BITWISE_OP: u16 = 6;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
const NFTA_NG_OFFSET: u16 = 4;
const NFT_NG_RANDOM: u32 = 1;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_DYNSET_SET_NAME: u16 = 1;
const NFTA_DYNSET_OP: u16 = 3;
const NFTA_DYNSET_SREG_KEY: u16 = 4;
const NFTA_DYNSET_TIMEOUT: u16 = 6;
const NFTA_DYNSET_FLAGS: u16 = 9;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_ADDR_MAX: u16 = 4;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_REG_PROTO_MAX: u16 = 6;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

/// Registers as nft numbers them on the wire: `NFT_REG_1`, `NFT_REG_2`, and the second 32-bit
/// word of `NFT_REG_1` (`NFT_REG32_01`).
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_01: u32 = 9;

/// The netfilter protocol family numbers of our tables.
fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => 2,
        Family::V6 => 10,
    }
}

/// Elements per netlink message: keeps each message far below the 64 KiB attribute limit.
const ELEMENTS_PER_MESSAGE: usize = 256;

/// One nfnetlink transaction being built. Each method appends messages; [`Netlink::commit`]
/// frames them (batch begin and end) and writes them. A method returning `false` could not
/// encode its input (nothing was appended for it) and the caller should fall back to nft.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    buf: Vec<u8>,
    messages: u32,
    /// Sets declared, numbering their ids in the transaction.
    sets: u32,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Bytes encoded so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Creates a regular chain (`add chain FAM TABLE NAME`).
    pub fn new_chain(&mut self, table: TableId, name: &str) {
        self.named(NFT_MSG_NEWCHAIN, NLM_F_CREATE, table, (NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME), name);
    }

    /// Deletes every rule of a chain (`flush chain`).
    pub fn flush_chain(&mut self, table: TableId, name: &str) {
        self.named(NFT_MSG_DELRULE, 0, table, (NFTA_RULE_TABLE, NFTA_RULE_CHAIN), name);
    }

    /// Deletes an empty, unreferenced chain.
    pub fn delete_chain(&mut self, table: TableId, name: &str) {
        self.named(NFT_MSG_DELCHAIN, 0, table, (NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME), name);
    }

    /// Declares set or map `name` with the declaration `decl` another set was listed with
    /// (see [`listed_set`]).
    pub fn new_set(&mut self, table: TableId, name: &str, decl: &Attrs) {
        let mut m = Message::new(NFT_MSG_NEWSET, NLM_F_CREATE, table.family);
        m.str(NFTA_SET_TABLE, table.name());
        m.str(NFTA_SET_NAME, name);
        self.sets += 1;
        m.u32(NFTA_SET_ID, self.sets);
        for (kind, value) in decl {
            let kind = if NESTED_SET_ATTRIBUTES.contains(kind) { *kind | NLA_F_NESTED } else { *kind };
            m.attr(kind, value);
        }
        self.push(m);
    }

    /// Deletes table `table` of `family` with everything in it.
    pub fn delete_table(&mut self, family: Family, table: &str) {
        let mut m = Message::new(NFT_MSG_DELTABLE, 0, family);
        m.str(NFTA_TABLE_NAME, table);
        self.push(m);
    }

    /// Deletes an unreferenced set or map.
    pub fn delete_set(&mut self, table: TableId, name: &str) {
        self.named(NFT_MSG_DELSET, 0, table, (NFTA_SET_TABLE, NFTA_SET_NAME), name);
    }

    /// A message naming one object of our table: the table and object attributes of its kind.
    fn named(&mut self, kind: u16, flags: u16, table: TableId, (table_attr, object): (u16, u16), name: &str) {
        let mut m = Message::new(kind, flags, table.family);
        m.str(table_attr, table.name());
        m.str(object, name);
        self.push(m);
    }

    /// Appends the rule `text` (as the renderer writes it) to `chain`; `false` when the text is
    /// not one of the shapes this encoder knows.
    pub fn add_rule(&mut self, table: TableId, chain: &str, text: &str) -> bool {
        let Some(exprs) = rule_expressions(table.family, text) else { return false };
        self.push_rule(table, chain, &exprs);
        true
    }

    fn push_rule(&mut self, table: TableId, chain: &str, exprs: &[Expr]) {
        let mut m = Message::new(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, table.family);
        m.str(NFTA_RULE_TABLE, table.name());
        m.str(NFTA_RULE_CHAIN, chain);
        let list = m.begin(NFTA_RULE_EXPRESSIONS);
        for e in exprs {
            let elem = m.begin(NFTA_LIST_ELEM);
            e.encode(&mut m);
            m.end(elem);
        }
        m.end(list);
        self.push(m);
    }

    /// Creates the regular chain `name` with `rules` (as the renderer writes them); `false`,
    /// with nothing appended, when a rule is not one of the shapes this encoder knows.
    pub fn add_chain(&mut self, table: TableId, name: &str, rules: &[String]) -> bool {
        let Some(encoded) = rules.iter().map(|r| rule_expressions(table.family, r)).collect::<Option<Vec<_>>>() else {
            return false;
        };
        self.new_chain(table, name);
        for exprs in &encoded {
            self.push_rule(table, name, exprs);
        }
        true
    }

    /// Adds (`add == true`) or deletes elements of one of our collections, each given as the
    /// renderer writes it: key, and value (empty for sets; ignored when deleting). `false`
    /// when the collection or an element is not one this encoder knows; nothing is appended
    /// then.
    pub fn elements<'a>(
        &mut self,
        table: TableId,
        collection: &str,
        add: bool,
        elements: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> bool {
        let Some(kind) = CollectionKind::of(collection) else { return false };
        let mut encoded: Vec<(Vec<u8>, Option<Value>)> = Vec::new();
        for (key, value) in elements {
            let Some(k) = kind.key(table.family, key) else { return false };
            let v = if add && kind.has_value() {
                match kind.value(table.family, value) {
                    Some(v) => Some(v),
                    None => return false,
                }
            } else {
                None
            };
            encoded.push((k, v));
        }
        self.push_elements(table, collection, add, &encoded);
        true
    }

    /// Adds elements as [`known_element`] encoded them to one of our collections.
    pub fn known_elements(&mut self, table: TableId, collection: &str, elements: &[KnownElement]) {
        let encoded: Vec<(Vec<u8>, Option<Value>)> = elements.iter().map(|e| (e.key().to_vec(), e.value())).collect();
        self.push_elements(table, collection, true, &encoded);
    }

    fn push_elements(&mut self, table: TableId, collection: &str, add: bool, encoded: &[(Vec<u8>, Option<Value>)]) {
        let kind_msg = if add { NFT_MSG_NEWSETELEM } else { NFT_MSG_DELSETELEM };
        for chunk in encoded.chunks(ELEMENTS_PER_MESSAGE) {
            let mut m = Message::new(kind_msg, if add { NLM_F_CREATE } else { 0 }, table.family);
            m.str(NFTA_SET_ELEM_LIST_TABLE, table.name());
            m.str(NFTA_SET_ELEM_LIST_SET, collection);
            let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for (key, value) in chunk {
                let elem = m.begin(NFTA_LIST_ELEM);
                let k = m.begin(NFTA_SET_ELEM_KEY);
                m.bytes(NFTA_DATA_VALUE, key);
                m.end(k);
                match value {
                    Some(Value::Data(d)) => {
                        let data = m.begin(NFTA_SET_ELEM_DATA);
                        m.bytes(NFTA_DATA_VALUE, d);
                        m.end(data);
                    }
                    Some(Value::Verdict(code, chain)) => {
                        let data = m.begin(NFTA_SET_ELEM_DATA);
                        let verdict = m.begin(NFTA_DATA_VERDICT);
                        m.u32(NFTA_VERDICT_CODE, code.cast_unsigned());
                        m.str(NFTA_VERDICT_CHAIN, chain);
                        m.end(verdict);
                        m.end(data);
                    }
                    None => {}
                }
                m.end(elem);
            }
            m.end(list);
            self.push(m);
        }
    }

    /// Deletes the elements with these keys (as [`Netlink::each_element`] gives them) from
    /// set or map `set`.
    pub fn delete_raw_elements<'a>(&mut self, table: TableId, set: &str, keys: impl Iterator<Item = &'a [u8]>) {
        let keys: Vec<&[u8]> = keys.collect();
        for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
            let mut m = Message::new(NFT_MSG_DELSETELEM, 0, table.family);
            m.str(NFTA_SET_ELEM_LIST_TABLE, table.name());
            m.str(NFTA_SET_ELEM_LIST_SET, set);
            let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
            for key in chunk {
                let elem = m.begin(NFTA_LIST_ELEM);
                let k = m.begin(NFTA_SET_ELEM_KEY);
                m.bytes(NFTA_DATA_VALUE, key);
                m.end(k);
                m.end(elem);
            }
            m.end(list);
            self.push(m);
        }
    }

    fn push(&mut self, m: Message) {
        self.messages += 1;
        let seq = self.messages + 1;
        self.buf.extend_from_slice(&m.finish(seq));
    }

    /// The whole transaction: batch begin, the messages (the last one asking for an
    /// acknowledgement, which the kernel sends once the batch is committed), batch end.
    fn wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 40);
        out.extend_from_slice(&batch_marker(NFNL_MSG_BATCH_BEGIN, 1));
        out.extend_from_slice(&self.buf);
        out.extend_from_slice(&batch_marker(NFNL_MSG_BATCH_END, self.messages + 2));
        out
    }
}

fn batch_marker(kind: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&20u32.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    out
}

/// One nfnetlink message under construction: header, `nfgenmsg`, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, family: Family) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(&[nfproto(family), 0, 0, 0]);
        Self { buf }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn str(&mut self, kind: u16, s: &str) {
        let mut payload = Vec::with_capacity(s.len() + 1);
        payload.extend_from_slice(s.as_bytes());
        payload.push(0);
        self.attr(kind, &payload);
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn bytes(&mut self, kind: u16, b: &[u8]) {
        self.attr(kind, b);
    }

    /// Opens a nested attribute; returns where its header is.
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A map element's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Data: an endpoint's `address . port`.
    Data(Vec<u8>),
    /// A verdict (`NFT_GOTO`, `NFT_JUMP`) to a chain.
    Verdict(i32, String),
}

/// The collections the renderer fills, by the shape of their elements.
#[derive(Debug, Clone, Copy)]
enum CollectionKind {
    /// `ADDR . PROTO . PORT : goto CHAIN`
    Addresses,
    /// `PROTO . PORT : goto CHAIN`
    NodePorts,
    /// `ADDR . ADDR`
    Hairpin,
    /// `ADDR . PROTO . PORT` (a set: the endpoints of ClientIP affinity ports)
    AffinityEndpoints,
    /// `KEY : ADDR . PORT`
    Endpoints,
}

impl CollectionKind {
    fn of(name: &str) -> Option<Self> {
        match name {
            "filter-addresses" | SERVICE_ADDRESSES | SERVICE_ADDRESSES_LOCAL | AFFINITY_ADDRESSES => {
                Some(Self::Addresses)
            }
            "filter-nodeports" | SERVICE_NODEPORTS | SERVICE_NODEPORTS_LOCAL | AFFINITY_NODEPORTS => {
                Some(Self::NodePorts)
            }
            "hairpin" => Some(Self::Hairpin),
            AFFINITY_ENDPOINTS => Some(Self::AffinityEndpoints),
            _ if name.starts_with("endpoints-") => Some(Self::Endpoints),
            _ => None,
        }
    }

    fn has_value(self) -> bool {
        !matches!(self, Self::Hairpin | Self::AffinityEndpoints)
    }

    fn key(self, family: Family, text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(40);
        let mut parts = text.split(" . ");
        match self {
            Self::Addresses | Self::AffinityEndpoints => {
                push_addr(&mut out, family, parts.next()?)?;
                push_proto(&mut out, parts.next()?)?;
                push_port(&mut out, parts.next()?)?;
            }
            Self::NodePorts => {
                push_proto(&mut out, parts.next()?)?;
                push_port(&mut out, parts.next()?)?;
            }
            Self::Hairpin => {
                push_addr(&mut out, family, parts.next()?)?;
                push_addr(&mut out, family, parts.next()?)?;
            }
            // `numgen` yields a host-order integer.
            Self::Endpoints => out.extend_from_slice(&parts.next()?.parse::<u32>().ok()?.to_ne_bytes()),
        }
        parts.next().is_none().then_some(out)
    }

    fn value(self, family: Family, text: &str) -> Option<Value> {
        match self {
            Self::Addresses | Self::NodePorts => {
                let (verb, chain) = text.split_once(' ')?;
                let code = match verb {
                    "goto" => NFT_GOTO,
                    "jump" => NFT_JUMP,
                    _ => return None,
                };
                (!chain.is_empty() && !chain.contains(' ')).then(|| Value::Verdict(code, chain.to_string()))
            }
            Self::Hairpin | Self::AffinityEndpoints => None,
            Self::Endpoints => {
                let (addr, port) = text.split_once(" . ")?;
                let mut out = Vec::with_capacity(20);
                push_addr(&mut out, family, addr)?;
                push_port(&mut out, port)?;
                Some(Value::Data(out))
            }
        }
    }
}

fn push_addr(out: &mut Vec<u8>, family: Family, text: &str) -> Option<()> {
    match (family, text.parse::<IpAddr>().ok()?) {
        (Family::V4, IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
        (Family::V6, IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
        _ => return None,
    }
    Some(())
}

/// An `inet_proto` field: one byte, padded to a 32-bit register.
fn push_proto(out: &mut Vec<u8>, text: &str) -> Option<()> {
    out.extend_from_slice(&[proto_number(text)?, 0, 0, 0]);
    Some(())
}

/// An `inet_service` field: two bytes in network order, padded to a 32-bit register.
fn push_port(out: &mut Vec<u8>, text: &str) -> Option<()> {
    let port: u16 = text.parse().ok()?;
    let [a, b] = port.to_be_bytes();
    out.extend_from_slice(&[a, b, 0, 0]);
    Some(())
}

fn proto_number(text: &str) -> Option<u8> {
    L4::from_nft_name(text).map(L4::number)
}

/// One nftables expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta load KEY => reg`
    MetaLoad {
        /// `NFT_META_*`.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `reg = (reg & mask) ^ xor`, over as many bytes as the mask has.
    Bitwise {
        /// Register.
        reg: u32,
        /// Mask.
        mask: Vec<u8>,
        /// Xor, as long as the mask.
        xor: Vec<u8>,
    },
    /// `payload load LEN @ BASE + OFFSET => reg`
    Payload {
        /// `NFT_PAYLOAD_*_HEADER`.
        base: u32,
        /// Offset in that header.
        offset: u32,
        /// Bytes loaded.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// `dynset update reg_key REG set NAME timeout MS`
    DynsetUpdate {
        /// Set name.
        set: String,
        /// Register where the key starts.
        sreg: u32,
        /// Timeout of the entry, in milliseconds.
        timeout_ms: u64,
    },
    /// `cmp eq reg DATA`
    CmpEq {
        /// Register.
        reg: u32,
        /// Data compared.
        data: Vec<u8>,
    },
    /// `numgen reg = random mod M offset O`
    NumgenRandom {
        /// Destination register.
        dreg: u32,
        /// Modulus.
        modulus: u32,
        /// Offset.
        offset: u32,
    },
    /// `lookup reg set NAME [dreg reg]`: a map lookup, or a set membership test.
    Lookup {
        /// Source register.
        sreg: u32,
        /// Set or map name.
        set: String,
        /// Destination register, for a map.
        dreg: Option<u32>,
    },
    /// `immediate reg DATA`
    Immediate {
        /// Register.
        dreg: u32,
        /// Value.
        data: Vec<u8>,
    },
    /// `nat dnat FAMILY addr_min reg proto_min reg [flags]`
    Dnat {
        /// Table family.
        family: Family,
        /// Register holding the address.
        addr: u32,
        /// Register holding the port.
        proto: u32,
        /// `NFTA_NAT_FLAGS`, if sent.
        flags: Option<u32>,
    },
}

impl Expr {
    fn encode(&self, m: &mut Message) {
        let name = match self {
            Self::MetaLoad { .. } => "meta",
            Self::Bitwise { .. } => "bitwise",
            Self::Payload { .. } => "payload",
            Self::DynsetUpdate { .. } => "dynset",
            Self::CmpEq { .. } => "cmp",
            Self::NumgenRandom { .. } => "numgen",
            Self::Lookup { .. } => "lookup",
            Self::Immediate { .. } => "immediate",
            Self::Dnat { .. } => "nat",
        };
        m.str(NFTA_EXPR_NAME, name);
        let data = m.begin(NFTA_EXPR_DATA);
        match self {
            Self::MetaLoad { key, dreg } => {
                m.u32(NFTA_META_KEY, *key);
                m.u32(NFTA_META_DREG, *dreg);
            }
            Self::Bitwise { reg, mask, xor } => {
                m.u32(NFTA_BITWISE_SREG, *reg);
                m.u32(NFTA_BITWISE_DREG, *reg);
                m.u32(NFTA_BITWISE_LEN, u32::try_from(mask.len()).unwrap_or(u32::MAX));
                let a = m.begin(NFTA_BITWISE_MASK);
                m.bytes(NFTA_DATA_VALUE, mask);
                m.end(a);
                let b = m.begin(NFTA_BITWISE_XOR);
                m.bytes(NFTA_DATA_VALUE, xor);
                m.end(b);
            }
            Self::Payload { base, offset, len, dreg } => {
                m.u32(NFTA_PAYLOAD_DREG, *dreg);
                m.u32(NFTA_PAYLOAD_BASE, *base);
                m.u32(NFTA_PAYLOAD_OFFSET, *offset);
                m.u32(NFTA_PAYLOAD_LEN, *len);
            }
            Self::DynsetUpdate { set, sreg, timeout_ms } => {
                m.str(NFTA_DYNSET_SET_NAME, set);
                m.u32(NFTA_DYNSET_OP, NFT_DYNSET_OP_UPDATE);
                m.u32(NFTA_DYNSET_SREG_KEY, *sreg);
                m.bytes(NFTA_DYNSET_TIMEOUT, &timeout_ms.to_be_bytes());
            }
            Self::CmpEq { reg, data } => {
                m.u32(NFTA_CMP_SREG, *reg);
                m.u32(NFTA_CMP_OP, NFT_CMP_EQ);
                let d = m.begin(NFTA_CMP_DATA);
                m.bytes(NFTA_DATA_VALUE, data);
                m.end(d);
            }
            Self::NumgenRandom { dreg, modulus, offset } => {
                m.u32(NFTA_NG_DREG, *dreg);
                m.u32(NFTA_NG_MODULUS, *modulus);
                m.u32(NFTA_NG_TYPE, NFT_NG_RANDOM);
                m.u32(NFTA_NG_OFFSET, *offset);
            }
            Self::Lookup { sreg, set, dreg } => {
                m.str(NFTA_LOOKUP_SET, set);
                m.u32(NFTA_LOOKUP_SREG, *sreg);
                if let Some(dreg) = dreg {
                    m.u32(NFTA_LOOKUP_DREG, *dreg);
                }
            }
            Self::Immediate { dreg, data } => {
                m.u32(NFTA_IMMEDIATE_DREG, *dreg);
                let d = m.begin(NFTA_IMMEDIATE_DATA);
                m.bytes(NFTA_DATA_VALUE, data);
                m.end(d);
            }
            Self::Dnat { family, addr, proto, flags } => {
                m.u32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
                m.u32(NFTA_NAT_FAMILY, u32::from(nfproto(*family)));
                m.u32(NFTA_NAT_REG_ADDR_MIN, *addr);
                m.u32(NFTA_NAT_REG_PROTO_MIN, *proto);
                if let Some(f) = flags {
                    m.u32(NFTA_NAT_FLAGS, *f);
                }
            }
        }
        m.end(data);
    }
}

/// The expressions of a `svc-…` rule as the renderer writes it, the same nft generates for
/// that text; `None` for any other rule. Known shapes:
/// - `meta l4proto PROTO dnat to numgen random mod N offset K map @MAP`
/// - `meta l4proto PROTO dnat to ADDR:PORT` (`[ADDR]:PORT` for IPv6)
/// - the IPv6 ClientIP affinity rules (see [`affinity_expressions`])
pub fn rule_expressions(family: Family, text: &str) -> Option<Vec<Expr>> {
    if family == Family::V6
        && let Some(exprs) = affinity_expressions(text)
    {
        return Some(exprs);
    }
    let rest = text.strip_prefix("meta l4proto ")?;
    let (proto, rest) = rest.split_once(' ')?;
    let proto = proto_number(proto)?;
    let target = rest.strip_prefix("dnat to ")?;
    let mut exprs =
        vec![Expr::MetaLoad { key: NFT_META_L4PROTO, dreg: REG_1 }, Expr::CmpEq { reg: REG_1, data: vec![proto] }];
    // The port follows the address in the registers: in the second 32-bit word for IPv4, in
    // the second 128-bit register for IPv6.
    let port_reg = match family {
        Family::V4 => REG32_01,
        Family::V6 => REG_2,
    };
    if let Some(ng) = target.strip_prefix("numgen random mod ") {
        let mut words = ng.split(' ');
        let modulus = words.next()?.parse().ok()?;
        (words.next()? == "offset").then_some(())?;
        let offset = words.next()?.parse().ok()?;
        (words.next()? == "map").then_some(())?;
        let set = words.next()?.strip_prefix('@')?;
        if words.next().is_some() || set.is_empty() {
            return None;
        }
        exprs.push(Expr::NumgenRandom { dreg: REG_1, modulus, offset });
        exprs.push(Expr::Lookup { sreg: REG_1, set: set.to_string(), dreg: Some(REG_1) });
        exprs.push(Expr::Dnat { family, addr: REG_1, proto: port_reg, flags: None });
        return Some(exprs);
    }
    let (addr, port) = target.rsplit_once(':')?;
    let addr = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(addr);
    let mut address = Vec::new();
    push_addr(&mut address, family, addr)?;
    let port: u16 = port.parse().ok()?;
    exprs.push(Expr::Immediate { dreg: REG_1, data: address });
    exprs.push(Expr::Immediate { dreg: REG_2, data: port.to_be_bytes().to_vec() });
    exprs.push(Expr::Dnat { family, addr: REG_1, proto: REG_2, flags: Some(NF_NAT_RANGE_PROTO_SPECIFIED) });
    Some(exprs)
}

/// Where one IPv6 affinity entry's fields sit in the registers: the client address in
/// `NFT_REG_1`, then the endpoint address (`NFT_REG_2`), its port and the port's key in the
/// 32-bit words that follow (`NFT_REG32_12`, and `NFT_REG32_13` numbered 17 on the wire).
struct AffinityLayout {
    addr_len: u32,
    saddr_offset: u32,
    daddr_offset: u32,
    endpoint: u32,
    port: u32,
    key: u32,
}

const AFFINITY_V6: AffinityLayout =
    AffinityLayout { addr_len: 16, saddr_offset: 8, daddr_offset: 24, endpoint: 2, port: 3, key: 17 };

/// The IPv6 ClientIP affinity rules the renderer writes, as nft encodes them; `None` for other
/// text:
/// - `FAM saddr . FAM daddr & ZERO | EP . th dport & 0 | PORT . meta mark & 0 | KEY @SET RECORD`
///   (a client recorded for this endpoint goes back to it);
/// - `numgen random mod N == 0 RECORD` (picks this endpoint);
/// - `RECORD`,
///
/// where `RECORD` is `update @SET { FAM saddr . EP . PORT . KEY timeout Ts } DNAT` and `DNAT`
/// the single-endpoint `meta l4proto PROTO dnat to EP:PORT`.
pub fn affinity_expressions(text: &str) -> Option<Vec<Expr>> {
    let family = Family::V6;
    let fam = "ip6";
    let l = AFFINITY_V6;
    let saddr =
        Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: l.saddr_offset, len: l.addr_len, dreg: REG_1 };
    let mut exprs = Vec::new();
    let record = if let Some(rest) = text.strip_prefix(&format!("{fam} saddr . {fam} daddr & :: | ")) {
        let (ep, rest) = rest.split_once(" . th dport & 0 | ")?;
        let (port, rest) = rest.split_once(" . meta mark & 0 | ")?;
        let (key, rest) = rest.split_once(' ')?;
        let (set, record) = rest.strip_prefix('@')?.split_once(' ')?;
        let (ep, port, key) = (address(family, ep)?, port_bytes(port)?, key_bytes(key)?);
        exprs.push(saddr.clone());
        exprs.push(Expr::Payload {
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset: l.daddr_offset,
            len: l.addr_len,
            dreg: l.endpoint,
        });
        exprs.push(Expr::Bitwise { reg: l.endpoint, mask: vec![0; ep.len()], xor: ep });
        exprs.push(Expr::Payload { base: NFT_PAYLOAD_TRANSPORT_HEADER, offset: 2, len: 2, dreg: l.port });
        exprs.push(Expr::Bitwise { reg: l.port, mask: vec![0; 2], xor: port });
        exprs.push(Expr::MetaLoad { key: NFT_META_MARK, dreg: l.key });
        exprs.push(Expr::Bitwise { reg: l.key, mask: vec![0; 4], xor: key });
        exprs.push(Expr::Lookup { sreg: REG_1, set: set.to_string(), dreg: None });
        record
    } else if let Some(rest) = text.strip_prefix("numgen random mod ") {
        let (modulus, record) = rest.split_once(" == 0 ")?;
        exprs.push(Expr::NumgenRandom { dreg: REG_1, modulus: modulus.parse().ok()?, offset: 0 });
        exprs.push(Expr::CmpEq { reg: REG_1, data: vec![0; 4] });
        record
    } else {
        text
    };
    let rest = record.strip_prefix("update @")?;
    let (set, rest) = rest.split_once(" { ")?;
    let rest = rest.strip_prefix(&format!("{fam} saddr . "))?;
    let (entry, rest) = rest.split_once(" timeout ")?;
    let (seconds, dnat) = rest.split_once("s } ")?;
    let mut fields = entry.split(" . ");
    let (ep, port, key) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() || set.contains(' ') {
        return None;
    }
    let seconds: u64 = seconds.parse().ok()?;
    let tail = rule_expressions(family, dnat)?;
    // Only the single-endpoint DNAT may follow.
    if !matches!(tail.last(), Some(Expr::Dnat { flags: Some(_), .. })) {
        return None;
    }
    exprs.push(saddr);
    exprs.push(Expr::Immediate { dreg: l.endpoint, data: address(family, ep)? });
    exprs.push(Expr::Immediate { dreg: l.port, data: port_bytes(port)? });
    exprs.push(Expr::Immediate { dreg: l.key, data: key_bytes(key)? });
    exprs.push(Expr::DynsetUpdate { set: set.to_string(), sreg: REG_1, timeout_ms: seconds.checked_mul(1000)? });
    exprs.extend(tail);
    Some(exprs)
}

fn address(family: Family, text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(16);
    push_addr(&mut out, family, text)?;
    Some(out)
}

fn port_bytes(text: &str) -> Option<Vec<u8>> {
    Some(text.parse::<u16>().ok()?.to_be_bytes().to_vec())
}

/// A mark value (`0x…`), host order like `meta mark`.
fn key_bytes(text: &str) -> Option<Vec<u8>> {
    Some(hex_u32(text)?.to_ne_bytes().to_vec())
}

/// `0x…` as the renderer writes marks.
fn hex_u32(text: &str) -> Option<u32> {
    u32::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

/// An element of a collection the encoder knows, as one byte string: the key's length, the
/// key, then the value (none for a set; an endpoint's `address . port`, or a verdict and its
/// chain). Two elements are the same element when their keys are, and equal when their
/// values are too.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KnownElement(Vec<u8>);

impl KnownElement {
    fn new(key: &[u8], value: Option<&Value>) -> Option<Self> {
        let mut out = Vec::with_capacity(1 + key.len() + 24);
        out.push(u8::try_from(key.len()).ok()?);
        out.extend_from_slice(key);
        match value {
            None => {}
            Some(Value::Data(data)) => {
                out.push(1);
                out.extend_from_slice(data);
            }
            Some(Value::Verdict(code, chain)) => {
                out.push(2);
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(chain.as_bytes());
            }
        }
        Some(Self(out))
    }

    /// The key, as the kernel takes it to delete the element.
    pub fn key(&self) -> &[u8] {
        let len = usize::from(self.0.first().copied().unwrap_or_default());
        self.0.get(1..1 + len).unwrap_or_default()
    }

    /// The value, as [`Batch::known_elements`] writes it.
    fn value(&self) -> Option<Value> {
        let rest = self.0.get(1 + self.key().len()..)?;
        let (tag, value) = rest.split_first()?;
        match tag {
            1 => Some(Value::Data(value.to_vec())),
            2 => {
                let (code, chain) = value.split_at_checked(4)?;
                let code = i32::from_be_bytes(code.try_into().ok()?);
                Some(Value::Verdict(code, String::from_utf8_lossy(chain).into_owned()))
            }
            _ => None,
        }
    }
}

/// The element `key : value` of `collection` (as the renderer writes it) as
/// [`Netlink::list_known_elements`] lists it; `None` when the encoder does not know it.
pub fn known_element(family: Family, collection: &str, key: &str, value: &str) -> Option<KnownElement> {
    let kind = CollectionKind::of(collection)?;
    let value = if kind.has_value() { Some(kind.value(family, value)?) } else { None };
    KnownElement::new(&kind.key(family, key)?, value.as_ref())
}

fn decode_value(data: &[u8]) -> Option<Value> {
    let (t, payload) = attributes(data).next()?;
    match t {
        NFTA_DATA_VALUE => Some(Value::Data(payload.to_vec())),
        NFTA_DATA_VERDICT => {
            let code = attributes(payload).find(|(t, _)| *t == NFTA_VERDICT_CODE).and_then(|(_, c)| be_u32(c))?;
            let chain = attributes(payload).find(|(t, _)| *t == NFTA_VERDICT_CHAIN).map(|(_, c)| c_str(c))?;
            Some(Value::Verdict(code.cast_signed(), chain))
        }
        _ => None,
    }
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated string attribute.
fn c_str(bytes: &[u8]) -> String {
    String::from_utf8_lossy(c_bytes(bytes)).into_owned()
}

/// A NUL-terminated string attribute's bytes, without the NUL.
fn c_bytes(bytes: &[u8]) -> &[u8] {
    bytes.split(|b| *b == 0).next().unwrap_or_default()
}

/// A rule as the kernel lists it, in one byte string that two rules compare by: for each
/// expression its name, then its attributes in type order (type, length, payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule(Vec<u8>);

impl KernelRule {
    /// The expressions of `list` (a rule's `NFTA_RULE_EXPRESSIONS`). With `expected`, the
    /// rule is one we encoded, and gets what the kernel adds when it lists one (see
    /// [`as_listed`]). A lookup's or a dynamic update's set named in `renamed` is written
    /// as its value there instead (anonymous sets, by their content).
    fn new(list: &[u8], expected: bool, renamed: &HashMap<String, Vec<u8>>) -> Self {
        let mut out = Vec::with_capacity(list.len() + 32);
        let mut attrs: Vec<(u16, Cow<'_, [u8]>)> = Vec::with_capacity(8);
        for (_, expr) in attributes(list) {
            let name =
                attributes(expr).find(|(t, _)| *t == NFTA_EXPR_NAME).map(|(_, n)| c_bytes(n)).unwrap_or_default();
            let set_attr = match name {
                b"lookup" => Some(NFTA_LOOKUP_SET),
                b"dynset" => Some(NFTA_DYNSET_SET_NAME),
                _ => None,
            };
            attrs.clear();
            let data = attributes(expr).find(|(t, _)| *t == NFTA_EXPR_DATA).map(|(_, d)| d).unwrap_or_default();
            for (kind, value) in attributes(data) {
                let content = (Some(kind) == set_attr)
                    .then(|| std::str::from_utf8(c_bytes(value)).ok().and_then(|name| renamed.get(name)))
                    .flatten();
                let value = content.map_or(Cow::Borrowed(value), |c| Cow::Owned(c.clone()));
                attrs.push((kind, value));
            }
            if expected {
                as_listed(name, &mut attrs);
            }
            attrs.sort_by_key(|(kind, _)| *kind);
            out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(name);
            out.push(u8::try_from(attrs.len()).unwrap_or(u8::MAX));
            for (kind, value) in &attrs {
                out.extend_from_slice(&kind.to_ne_bytes());
                out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_ne_bytes());
                out.extend_from_slice(value);
            }
        }
        Self(out)
    }

    /// The expressions: name, and attributes in type order.
    fn expressions(&self) -> impl Iterator<Item = (&[u8], Vec<(u16, &[u8])>)> {
        let mut at = 0;
        let buf = &self.0;
        std::iter::from_fn(move || {
            let len = usize::from(*buf.get(at)?);
            let name = buf.get(at + 1..at + 1 + len)?;
            at += 1 + len;
            let count = *buf.get(at)?;
            at += 1;
            let mut attrs = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let kind = u16::from_ne_bytes([*buf.get(at)?, *buf.get(at + 1)?]);
                let len = usize::from(u16::from_ne_bytes([*buf.get(at + 2)?, *buf.get(at + 3)?]));
                attrs.push((kind, buf.get(at + 4..at + 4 + len)?));
                at += 4 + len;
            }
            Some((name, attrs))
        })
    }
}

/// The expressions of rule `text` (one the encoder knows) as the kernel lists them.
pub fn expected_rule(family: Family, text: &str) -> Option<KernelRule> {
    let exprs = rule_expressions(family, text)?;
    let mut m = Message::new(0, 0, family);
    for e in &exprs {
        let at = m.begin(NFTA_LIST_ELEM);
        e.encode(&mut m);
        m.end(at);
    }
    // After the message header and the nfgenmsg.
    Some(KernelRule::new(m.buf.get(20..).unwrap_or_default(), true, &HashMap::new()))
}

/// What the kernel adds when it lists an expression we encoded: the attributes it lists
/// even at their default (a bitwise's operation, a lookup's and a dynamic update's flags),
/// and a DNAT's register ranges and flags, which it derives from the registers given.
fn as_listed(name: &[u8], attrs: &mut Vec<(u16, Cow<'_, [u8]>)>) {
    let zero = || Cow::Owned(0u32.to_be_bytes().to_vec());
    let get =
        |attrs: &[(u16, Cow<'_, [u8]>)], kind: u16| attrs.iter().find(|(t, _)| *t == kind).map(|(_, v)| v.to_vec());
    let mut defaults: Vec<(u16, Cow<'_, [u8]>)> = Vec::new();
    match name {
        b"bitwise" => defaults.push((NFTA_BITWISE_OP, zero())),
        b"lookup" => defaults.push((NFTA_LOOKUP_FLAGS, zero())),
        b"dynset" => defaults.push((NFTA_DYNSET_FLAGS, zero())),
        b"nat" => {
            let mut flags = get(attrs, NFTA_NAT_FLAGS).and_then(|f| be_u32(&f)).unwrap_or_default();
            if let Some(addr) = get(attrs, NFTA_NAT_REG_ADDR_MIN) {
                flags |= NF_NAT_RANGE_MAP_IPS;
                defaults.push((NFTA_NAT_REG_ADDR_MAX, Cow::Owned(addr)));
            }
            if let Some(proto) = get(attrs, NFTA_NAT_REG_PROTO_MIN) {
                flags |= NF_NAT_RANGE_PROTO_SPECIFIED;
                defaults.push((NFTA_NAT_REG_PROTO_MAX, Cow::Owned(proto)));
            }
            attrs.retain(|(t, _)| *t != NFTA_NAT_FLAGS);
            defaults.push((NFTA_NAT_FLAGS, Cow::Owned(flags.to_be_bytes().to_vec())));
        }
        _ => {}
    }
    for (kind, value) in defaults {
        if !attrs.iter().any(|(t, _)| *t == kind) {
            attrs.push((kind, value));
        }
    }
}

/// A listed rule: its chain and expressions, anonymous sets named by their content (see
/// [`KernelRule::new`]).
pub fn listed_rule(rule: &Attrs, anonymous: &HashMap<String, Vec<u8>>) -> Option<(String, KernelRule)> {
    let chain = rule.iter().find(|(t, _)| *t == NFTA_RULE_CHAIN).map(|(_, c)| c_str(c))?;
    let exprs = rule.iter().find(|(t, _)| *t == NFTA_RULE_EXPRESSIONS).map(|(_, e)| e)?;
    Some((chain, KernelRule::new(exprs, false, anonymous)))
}

/// A base chain's hook as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    /// `NF_INET_*` hook number.
    pub hook: u32,
    /// Priority.
    pub priority: i32,
    /// `NF_ACCEPT` (1) or `NF_DROP` (0).
    pub policy: u32,
}

/// A listed chain: its name, and its hook if it is a base chain.
pub fn listed_chain(chain: &Attrs) -> Option<(String, Option<Hook>)> {
    let find = |kind: u16| chain.iter().find(|(t, _)| *t == kind).map(|(_, v)| v.as_slice());
    let name = c_str(find(NFTA_CHAIN_NAME)?);
    let hook = find(NFTA_CHAIN_HOOK).map(|hook| {
        let field = |kind: u16| attributes(hook).find(|(t, _)| *t == kind).and_then(|(_, v)| be_u32(v));
        Hook {
            kind: find(NFTA_CHAIN_TYPE).map(c_str).unwrap_or_default(),
            hook: field(NFTA_HOOK_HOOKNUM).unwrap_or(u32::MAX),
            priority: field(NFTA_HOOK_PRIORITY).unwrap_or_default().cast_signed(),
            policy: find(NFTA_CHAIN_POLICY).and_then(be_u32).unwrap_or(u32::MAX),
        }
    });
    Some((name, hook))
}

/// A listed set or map: its name, whether it is anonymous or dynamic (filled by the packet
/// path), and its declaration: every attribute but its table, name, handle and id, and what
/// recent kernels add about its state (the backend they chose, the element count).
pub fn listed_set(set: &Attrs) -> Option<ListedSet> {
    let name = set.iter().find(|(t, _)| *t == NFTA_SET_NAME).map(|(_, n)| c_str(n))?;
    let flags = set.iter().find(|(t, _)| *t == NFTA_SET_FLAGS).and_then(|(_, f)| be_u32(f)).unwrap_or_default();
    let decl = set
        .iter()
        .filter(|(t, _)| {
            ![NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_HANDLE, NFTA_SET_ID, NFTA_SET_TYPE, NFTA_SET_COUNT].contains(t)
        })
        .cloned()
        .collect();
    Some(ListedSet { name, anonymous: flags & NFT_SET_ANONYMOUS != 0, dynamic: flags & NFT_SET_EVAL != 0, decl })
}

/// See [`listed_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedSet {
    /// Name (`__set%d` for an anonymous set).
    pub name: String,
    /// Anonymous (a rule's inline `{ … }`).
    pub anonymous: bool,
    /// Dynamic: the packet path adds its elements.
    pub dynamic: bool,
    /// The declaration's attributes.
    pub decl: Attrs,
}

/// The endpoint-map slot a `svc-…` rule uses: the map, and its `numgen`'s modulus and
/// offset; `None` for a rule without one.
pub fn endpoint_slot(rule: &KernelRule) -> Option<(String, u32, u32)> {
    let (mut modulus, mut offset, mut map) = (None, None, None);
    for (name, attrs) in rule.expressions() {
        let attr = |kind: u16| attrs.iter().find(|(t, _)| *t == kind).map(|(_, v)| *v);
        match name {
            b"numgen" => {
                modulus = attr(NFTA_NG_MODULUS).and_then(be_u32);
                offset = attr(NFTA_NG_OFFSET).and_then(be_u32);
            }
            b"lookup" => map = attr(NFTA_LOOKUP_SET).map(c_str),
            _ => {}
        }
    }
    Some((map?, modulus?, offset?))
}

/// A netlink socket to the kernel's nftables, in the network namespace it was opened in.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    /// Largest batch the socket's send buffer takes now; grown (as nft does) for a bigger one.
    capacity: std::sync::atomic::AtomicUsize,
}

/// How long to wait for the kernel's answer to a batch.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> std::io::Result<Self> {
        let socket = Socket::new(Domain::from(AF_NETLINK), Type::RAW, Some(Protocol::from(NETLINK_NETFILTER)))?;
        socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let _ = socket.set_send_buffer_size(1 << 20);
        let _ = socket.set_recv_buffer_size(1 << 20);
        let capacity = usable(socket.send_buffer_size()?);
        Ok(Self { socket, capacity: capacity.into() })
    }

    /// Makes the send buffer take `len` bytes in one message: the kernel reads a batch from a
    /// single message. Beyond `net.core.wmem_max` this needs `CAP_NET_ADMIN`, which writing
    /// nftables needs anyway.
    fn reserve(&self, len: usize) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if len <= self.capacity.load(Ordering::Relaxed) {
            return Ok(());
        }
        let wanted = (len + 64 * 1024).next_power_of_two();
        if rustix::net::sockopt::set_socket_send_buffer_size_force(&self.socket, wanted).is_err() {
            self.socket.set_send_buffer_size(wanted)?;
        }
        let capacity = usable(self.socket.send_buffer_size()?);
        self.capacity.store(capacity, Ordering::Relaxed);
        if len <= capacity {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "a batch of {len} bytes does not fit the socket's send buffer ({capacity} bytes usable)"
            )))
        }
    }

    /// Sends `batch` as one transaction and waits for the kernel to commit it. On an error the
    /// kernel applied nothing of it.
    pub fn commit(&self, batch: &Batch) -> Result<(), NftError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut wire = batch.wire();
        // The last message asks for the acknowledgement that ends the exchange.
        let last = batch.messages + 1;
        mark_ack(&mut wire, last);
        let io = |e: std::io::Error| NftError::Spawn { program: "nfnetlink".into(), source: e };
        self.reserve(wire.len()).map_err(io)?;
        // Answers to an earlier batch that failed part-way are stale: drop them.
        self.drain();
        (&self.socket).write_all(&wire).map_err(io)?;
        match self.answer(last) {
            Ok(_) => Ok(()),
            Err(Answer::Io(e)) => Err(io(e)),
            Err(Answer::Refused { seq, errno }) => Err(NftError::Rejected {
                status: format!("errno {errno}"),
                stderr: format!(
                    "the kernel refused message {seq} of the batch: {}",
                    std::io::Error::from_raw_os_error(errno)
                ),
            }),
        }
    }

    /// Whether our table `table` exists (`nft list table FAMILY NAME` succeeding).
    pub fn table_exists(&self, table: TableId) -> Result<bool, NftError> {
        self.has_table(table.family, table.name())
    }

    /// Whether table `table` of `family` exists.
    pub fn has_table(&self, family: Family, table: &str) -> Result<bool, NftError> {
        let mut m = Message::new(NFT_MSG_GETTABLE, NLM_F_ACK, family);
        m.str(NFTA_TABLE_NAME, table);
        let io = |e: std::io::Error| NftError::Spawn { program: "nfnetlink".into(), source: e };
        self.drain();
        (&self.socket).write_all(&m.finish(1)).map_err(io)?;
        match self.answer(1) {
            Ok(data) => Ok(data),
            Err(Answer::Refused { errno: ENOENT, .. }) => Ok(false),
            Err(Answer::Io(e)) => Err(io(e)),
            Err(Answer::Refused { errno, .. }) => Err(io(std::io::Error::from_raw_os_error(errno))),
        }
    }

    /// Calls `each` with the key and data (empty for a set) of every element of set or map
    /// `set` of our table `table`, as the kernel lays them out in registers; nothing is
    /// copied.
    pub fn each_element(&self, table: TableId, set: &str, mut each: impl FnMut(&[u8], &[u8])) -> Result<(), NftError> {
        self.list_elements_with(table.family, table.name(), set, |elem| {
            if let Some(key) = nested_value(elem, NFTA_SET_ELEM_KEY) {
                each(key, nested_value(elem, NFTA_SET_ELEM_DATA).unwrap_or_default());
            }
        })
    }

    /// Every element of set or map `set` of table `table` as the kernel lists it: its
    /// attributes (key, data, flags, …).
    pub fn list_elements(&self, family: Family, table: &str, set: &str) -> Result<Vec<Attrs>, NftError> {
        let mut elements = Vec::new();
        self.list_elements_with(family, table, set, |elem| elements.push(owned(elem)))?;
        Ok(elements)
    }

    /// Every element of one of our maps the encoder knows, as key and value, to compare with
    /// [`expected_elements`]. `None` when the collection is not one the encoder knows.
    pub fn list_known_elements(&self, table: TableId, set: &str) -> Result<Option<Vec<KnownElement>>, NftError> {
        let Some(kind) = CollectionKind::of(set) else { return Ok(None) };
        let mut elements = Vec::new();
        self.list_elements_with(table.family, table.name(), set, |elem| {
            let Some(key) = nested_value(elem, NFTA_SET_ELEM_KEY) else { return };
            let value = if kind.has_value() {
                attributes(elem).find(|(t, _)| *t == NFTA_SET_ELEM_DATA).and_then(|(_, data)| decode_value(data))
            } else {
                None
            };
            elements.extend(KnownElement::new(key, value.as_ref()));
        })?;
        Ok(Some(elements))
    }

    fn list_elements_with(
        &self,
        family: Family,
        table: &str,
        set: &str,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), NftError> {
        let request = [(NFTA_SET_ELEM_LIST_TABLE, table), (NFTA_SET_ELEM_LIST_SET, set)];
        self.dump(NFT_MSG_GETSETELEM, family, &request, |body| {
            for (t, list) in attributes(body) {
                if t == NFTA_SET_ELEM_LIST_ELEMENTS {
                    attributes(list).for_each(|(_, elem)| each(elem));
                }
            }
        })
        .map_err(|e| e.listing(set))
    }

    /// Table `table` of `family` as the kernel lists it: its rules and sets, and of its chains
    /// those named in `chains` (the base chains, for their hooks), each as its attributes;
    /// `None` when there is no such table. The kernel lists chains only all together, every
    /// table's (another proxy's table may hold 100k), so chains are asked for by name: the
    /// others are known by their rules.
    pub fn list_table(&self, family: Family, table: &str, chains: &[&str]) -> Result<Option<Listed>, NftError> {
        if !self.has_table(family, table)? {
            return Ok(None);
        }
        let mut listed = Listed::default();
        for chain in chains {
            let mut m = Message::new(NFT_MSG_GETCHAIN, NLM_F_ACK, family);
            m.str(NFTA_CHAIN_TABLE, table);
            m.str(NFTA_CHAIN_NAME, chain);
            listed.chains.extend(self.get(m).map_err(|e| e.listing(table))?);
        }
        let objects =
            [(NFT_MSG_GETRULE, NFTA_RULE_TABLE, &mut listed.rules), (NFT_MSG_GETSET, NFTA_SET_TABLE, &mut listed.sets)];
        let name = [table.as_bytes(), &[0]].concat();
        for (kind, table_attr, out) in objects {
            // Filtered by the kernel too; a table of another name is never ours.
            let ours = |attrs: &Attrs| attrs.iter().any(|(t, v)| *t == table_attr && c_bytes(v) == c_bytes(&name));
            let each = |body: &[u8]| {
                let attrs = owned(body);
                if ours(&attrs) {
                    out.push(attrs);
                }
            };
            // Counted within the table: other tables' changes while it is listed in parts do
            // not make a part skip or repeat any of its objects.
            match self.dump(kind, family, &[(table_attr, table)], each) {
                Ok(()) => {}
                // Deleted meanwhile.
                Err(Dump::Refused(ENOENT)) => return Ok(None),
                Err(e) => return Err(e.listing(table)),
            }
        }
        Ok(Some(listed))
    }

    /// Set or map `set` of our table `table` as the kernel lists it (see [`listed_set`]);
    /// `None` when there is no such set.
    pub fn get_set(&self, table: TableId, set: &str) -> Result<Option<ListedSet>, NftError> {
        let mut m = Message::new(NFT_MSG_GETSET, NLM_F_ACK, table.family);
        m.str(NFTA_SET_TABLE, table.name());
        m.str(NFTA_SET_NAME, set);
        Ok(self.get(m).map_err(|e| e.listing(set))?.as_ref().and_then(listed_set))
    }

    /// The one object a `GET…` request `m` asks for, as its attributes; `None` when there is
    /// no such object.
    fn get(&self, m: Message) -> Result<Option<Attrs>, Dump> {
        let seq = 1;
        self.drain();
        (&self.socket).write_all(&m.finish(seq)).map_err(Dump::Io)?;
        let mut buf = vec![0u8; 1 << 16];
        let mut object = None;
        loop {
            let n = (&self.socket).read(&mut buf).map_err(Dump::Io)?;
            for (kind, got, body) in messages(&buf[..n]) {
                match kind {
                    NLMSG_ERROR if got == seq => {
                        return match error_code(body) {
                            0 => Ok(object),
                            code if -code == ENOENT => Ok(None),
                            code => Err(Dump::Refused(-code)),
                        };
                    }
                    NLMSG_ERROR => {}
                    _ => object = Some(owned(body.get(4..).unwrap_or_default())),
                }
            }
        }
    }

    /// Sends one `NLM_F_DUMP` request of `kind` with string attributes `request` and calls
    /// `each` with the attributes (after the `nfgenmsg`) of every message of the answer.
    fn dump(
        &self,
        kind: u16,
        family: Family,
        request: &[(u16, &str)],
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), Dump> {
        let mut m = Message::new(kind, NLM_F_DUMP, family);
        for (t, value) in request {
            m.str(*t, value);
        }
        self.drain();
        (&self.socket).write_all(&m.finish(1)).map_err(Dump::Io)?;
        let mut buf = vec![0u8; 1 << 17];
        loop {
            let n = (&self.socket).read(&mut buf).map_err(Dump::Io)?;
            for (kind, _, body) in messages(&buf[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => match error_code(body) {
                        0 => {}
                        code => return Err(Dump::Refused(-code)),
                    },
                    _ => each(body.get(4..).unwrap_or_default()),
                }
            }
        }
    }

    /// Reads the kernel's answers up to the acknowledgement of message `last`: whether other
    /// messages (data) came before it, or the first error.
    fn answer(&self, last: u32) -> Result<bool, Answer> {
        let mut buf = vec![0u8; 1 << 16];
        let mut data = false;
        loop {
            let n = (&self.socket).read(&mut buf).map_err(Answer::Io)?;
            for (kind, seq, body) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR && body.len() >= 4 {
                    let code = error_code(body);
                    if code != 0 {
                        return Err(Answer::Refused { seq, errno: -code });
                    }
                    if seq == last {
                        return Ok(data);
                    }
                } else {
                    data = true;
                }
            }
        }
    }

    fn drain(&self) {
        let _ = self.socket.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        while (&self.socket).read(&mut buf).is_ok_and(|n| n > 0) {}
        let _ = self.socket.set_nonblocking(false);
    }
}

/// The netlink messages in one read: type, sequence number and body (after the header).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + 16)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let seq = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        let body = buf.get(at + 16..at + len.max(16))?;
        at += len.max(16).next_multiple_of(4);
        Some((kind, seq, body))
    })
}

/// The error code of an `NLMSG_ERROR` body (0: an acknowledgement).
fn error_code(body: &[u8]) -> i32 {
    body.get(..4).map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
}

/// The attributes in `buf`: type (without the nested and byte-order flags) and payload.
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + 4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & 0x3fff;
        let payload = buf.get(at + 4..at + len.max(4))?;
        at += len.max(4).next_multiple_of(4);
        Some((kind, payload))
    })
}

/// Why an exchange with the kernel ended without its acknowledgement.
enum Answer {
    Io(std::io::Error),
    Refused { seq: u32, errno: i32 },
}

const ENOENT: i32 = 2;

/// Why a listing ended without its last message.
enum Dump {
    Io(std::io::Error),
    Refused(i32),
}

impl Dump {
    fn listing(self, what: &str) -> NftError {
        match self {
            Self::Io(e) => NftError::Spawn { program: "nfnetlink".into(), source: e },
            Self::Refused(errno) => NftError::Rejected {
                status: format!("errno {errno}"),
                stderr: format!("listing {what}: {}", std::io::Error::from_raw_os_error(errno)),
            },
        }
    }
}

/// The objects of one table as the kernel lists them, each as its attributes.
#[derive(Debug, Clone, Default)]
pub struct Listed {
    /// Chains.
    pub chains: Vec<Attrs>,
    /// Rules, of every chain, in order.
    pub rules: Vec<Attrs>,
    /// Sets and maps, anonymous ones included.
    pub sets: Vec<Attrs>,
}

/// An object's attributes as the kernel lists them: type (flags cleared) and payload.
pub type Attrs = Vec<(u16, Vec<u8>)>;

fn owned(buf: &[u8]) -> Attrs {
    attributes(buf).map(|(t, v)| (t, v.to_vec())).collect()
}

/// The `NFTA_DATA_VALUE` inside the nested attribute `kind` of `buf`.
fn nested_value(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buf)
        .find(|(t, _)| *t == kind)
        .and_then(|(_, nested)| attributes(nested).find(|(t, _)| *t == NFTA_DATA_VALUE))
        .map(|(_, v)| v)
}

/// Bytes of one message a send buffer of `size` (as `SO_SNDBUF` reports it) takes: the
/// kernel refuses a message longer than the buffer less a little of its own accounting.
fn usable(size: usize) -> usize {
    size.saturating_sub(4096)
}

/// Sets `NLM_F_ACK` on the message with sequence number `seq`.
fn mark_ack(wire: &mut [u8], seq: u32) {
    let mut at = 0;
    while at + 16 <= wire.len() {
        let len = u32::from_ne_bytes([wire[at], wire[at + 1], wire[at + 2], wire[at + 3]]) as usize;
        let s = u32::from_ne_bytes([wire[at + 8], wire[at + 9], wire[at + 10], wire[at + 11]]);
        if s == seq {
            let flags = u16::from_ne_bytes([wire[at + 6], wire[at + 7]]) | NLM_F_ACK;
            wire[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
            return;
        }
        if len < 16 {
            return;
        }
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_compared_as_the_kernel_lists_them_and_name_their_endpoint_slot() {
        let text = "meta l4proto tcp dnat to numgen random mod 3 offset 32 map @endpoints-tcp-1a";
        let rule = expected_rule(Family::V4, text).unwrap_or_else(|| panic!("{text}"));
        assert_eq!(endpoint_slot(&rule), Some(("endpoints-tcp-1a".into(), 3, 32)));
        let names: Vec<&[u8]> = rule.expressions().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"meta"[..], b"cmp", b"numgen", b"lookup", b"nat"]);
        let single = expected_rule(Family::V4, "meta l4proto tcp dnat to 10.0.0.3:8443").unwrap_or_else(|| panic!());
        assert_eq!(endpoint_slot(&single), None);
        // What the kernel adds when it lists a DNAT: the register ranges and both flags.
        let (_, nat) = single.expressions().find(|(n, _)| *n == b"nat").unwrap_or_else(|| panic!());
        let flags = 3u32.to_be_bytes();
        assert!(nat.contains(&(NFTA_NAT_FLAGS, &flags[..])), "{nat:?}");
        assert!(nat.iter().any(|(t, _)| *t == NFTA_NAT_REG_PROTO_MAX), "{nat:?}");
        assert_ne!(rule, single);
    }

    #[test]
    fn rule_shapes_the_renderer_writes_are_encoded() {
        let map = rule_expressions(
            Family::V6,
            "meta l4proto udp dnat to numgen random mod 10 offset 16 map @endpoints-udp-1b",
        )
        .unwrap_or_default();
        assert_eq!(map[1], Expr::CmpEq { reg: REG_1, data: vec![17] });
        assert_eq!(map[2], Expr::NumgenRandom { dreg: REG_1, modulus: 10, offset: 16 });
        assert_eq!(map[4], Expr::Dnat { family: Family::V6, addr: REG_1, proto: REG_2, flags: None });
        let one = rule_expressions(Family::V6, "meta l4proto tcp dnat to [fd00::5]:8080").unwrap_or_default();
        assert_eq!(one[3], Expr::Immediate { dreg: REG_2, data: vec![0x1f, 0x90] });
        assert_eq!(one.len(), 5);
    }

    #[test]
    fn ipv6_affinity_rules_are_encoded_as_nft_does() {
        let lookup = affinity_expressions(
            "ip6 saddr . ip6 daddr & :: | fd00:1::2 . th dport & 0 | 8080 . meta mark & 0 | 0x12345678 @affinity \
             update @affinity { ip6 saddr . fd00:1::2 . 8080 . 0x12345678 timeout 600s } meta l4proto tcp dnat to [fd00:1::2]:8080",
        )
        .unwrap_or_default();
        // As `nft --debug=netlink` shows it: the key in registers 1, 2, 3 and 17.
        assert_eq!(lookup[0], Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 8, len: 16, dreg: REG_1 });
        assert_eq!(lookup[1], Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 24, len: 16, dreg: REG_2 });
        assert_eq!(lookup[4], Expr::Bitwise { reg: 3, mask: vec![0, 0], xor: vec![0x1f, 0x90] });
        assert_eq!(lookup[5], Expr::MetaLoad { key: NFT_META_MARK, dreg: 17 });
        assert_eq!(lookup[7], Expr::Lookup { sreg: REG_1, set: "affinity".into(), dreg: None });
        assert_eq!(lookup[11], Expr::Immediate { dreg: 17, data: 0x1234_5678u32.to_ne_bytes().to_vec() });
        assert_eq!(lookup[12], Expr::DynsetUpdate { set: "affinity".into(), sreg: REG_1, timeout_ms: 600_000 });
        assert_eq!(lookup.len(), 18);
        let pick = affinity_expressions(
            "numgen random mod 3 == 0 update @affinity { ip6 saddr . fd00:1::2 . 8080 . 0x12345678 timeout 60s } \
             meta l4proto udp dnat to [fd00:1::2]:8080",
        )
        .unwrap_or_default();
        assert_eq!(pick[0], Expr::NumgenRandom { dreg: REG_1, modulus: 3, offset: 0 });
        assert_eq!(
            pick[3],
            Expr::Immediate { dreg: REG_2, data: address(Family::V6, "fd00:1::2").unwrap_or_default() }
        );
        assert_eq!(pick[7], Expr::MetaLoad { key: NFT_META_L4PROTO, dreg: REG_1 });
        // Anything but a single-endpoint DNAT after the record is declined, and IPv4 has no
        // such rules.
        assert_eq!(
            affinity_expressions(
                "update @affinity { ip6 saddr . fd00:1::2 . 8080 . 0x1 timeout 60s } meta l4proto tcp dnat to numgen random mod 2 offset 0 map @m",
            ),
            None
        );
        assert_eq!(
            rule_expressions(
                Family::V4,
                "update @affinity { ip saddr . 10.0.1.2 . 8080 . 0x1 timeout 60s } meta l4proto tcp dnat to 10.0.1.2:8080"
            ),
            None
        );
    }

    #[test]
    fn other_rules_and_collections_are_declined() {
        for rule in [
            "ct state new goto reject-chain",
            "meta l4proto tcp dnat to numgen random mod 10 map { 0 : 10.0.0.1 . 80 }",
            "meta l4proto tcp dnat to 10.0.0.1:80 extra",
            "meta l4proto icmp dnat to 10.0.0.1:80",
            // The masquerade mark is set in `services`, never in a `svc-…` chain.
            "meta mark set meta mark | 0x00400000 meta l4proto tcp dnat to 10.0.0.1:80",
        ] {
            assert_eq!(rule_expressions(Family::V4, rule), None, "{rule}");
        }
        // An IPv6 address in the IPv4 table is declined, not truncated.
        assert_eq!(rule_expressions(Family::V4, "meta l4proto tcp dnat to [fd00::5]:80"), None);
        let mut b = Batch::new();
        let v4 = crate::render::TableId::frame(Family::V4);
        // The dynamic affinity maps are the kernel's to fill.
        assert!(!b.elements(v4, "affinity-cluster", true, [("10.0.0.1 . 10.0.0.2 . tcp . 80", "")].into_iter()));
        assert!(!b.elements(v4, "affinity-addresses", true, [("10.0.0.1 . tcp . 80", "return")].into_iter()));
        assert!(!b.elements(v4, "service-addresses", true, [("10.0.0.1 . tcp . 80", "accept")].into_iter()));
        assert!(!b.elements(v4, "hairpin", true, [("fd00::1 . fd00::1", "")].into_iter()));
        assert!(b.is_empty());
    }

    #[test]
    fn every_collection_the_renderer_fills_is_written_over_netlink() {
        use crate::render::{RenderConfig, TableId, base_table, declared_endpoint_map};
        for id in TableId::all() {
            let (family, table) = (id.family, base_table(id, &RenderConfig::default()));
            let endpoints = [declared_endpoint_map(family, "tcp", 1), declared_endpoint_map(family, "sctp", 255)];
            let collections = table.collections.iter().map(|(n, c)| (n.clone(), c.clone())).chain(endpoints);
            for (name, collection) in collections {
                // The dynamic affinity maps are the kernel's to fill.
                let written = CollectionKind::of(&name).is_some();
                assert_eq!(written, !collection.decl.contains("dynamic"), "{family:?} {name}");
            }
        }
    }

    #[test]
    fn element_keys_are_laid_out_in_registers() {
        let k = CollectionKind::Addresses.key(Family::V4, "198.18.0.1 . tcp . 80").unwrap_or_default();
        assert_eq!(k, vec![198, 18, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        let k = CollectionKind::NodePorts.key(Family::V6, "udp . 30000").unwrap_or_default();
        assert_eq!(k, vec![17, 0, 0, 0, 0x75, 0x30, 0, 0]);
        let k = CollectionKind::Endpoints.key(Family::V4, "16").unwrap_or_default();
        assert_eq!(k, 16u32.to_ne_bytes().to_vec());
        match CollectionKind::Endpoints.value(Family::V4, "10.100.1.10 . 8080") {
            Some(Value::Data(d)) => assert_eq!(d, vec![10, 100, 1, 10, 0x1f, 0x90, 0, 0]),
            _ => panic!("endpoint value not encoded"),
        }
        let k = CollectionKind::of("affinity-endpoints").and_then(|c| c.key(Family::V6, "fd00::1 . sctp . 9"));
        let mut want = "fd00::1".parse::<std::net::Ipv6Addr>().map(|a| a.octets().to_vec()).unwrap_or_default();
        want.extend([132, 0, 0, 0, 0, 9, 0, 0]);
        assert_eq!(k, Some(want));
        match CollectionKind::NodePorts.value(Family::V4, "jump affinity-rec-local-60-tcp") {
            Some(Value::Verdict(code, chain)) => {
                assert_eq!((code, chain.as_str()), (NFT_JUMP, "affinity-rec-local-60-tcp"))
            }
            _ => panic!("jump not encoded"),
        }
    }
}
