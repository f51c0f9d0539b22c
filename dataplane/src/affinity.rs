//! ClientIP affinity entries as the kernel keeps them, read back so that a sync can delete the
//! ones it made invalid.
//!
//! The kernel fills the dynamic maps `affinity-cluster` and `affinity-local`, and their
//! `…-nodeports` twins for NodePort clients (see [`crate::render`]):
//! `client . frontend address . protocol . frontend port : endpoint . port`.
//! An entry must not outlive its endpoint's place behind the frontend: the sync that removes
//! an endpoint from an affinity port, or a frontend's affinity, or changes its traffic policy,
//! then deletes the entries that no longer hold ([`crate::sync`]). No new entry can name such an
//! endpoint once that sync is committed, so one pass after the commit suffices.

use std::net::IpAddr;

use crate::model::{Family, Protocol};

/// One recorded client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityEntry {
    /// The client's address.
    pub client: IpAddr,
    /// The address it connected to (load-balancer address, or this node's for a NodePort).
    pub frontend: IpAddr,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    /// The port it connected to (the Service port or the NodePort).
    pub port: u16,
    /// The endpoint it was sent to.
    pub endpoint: IpAddr,
    /// The endpoint's port.
    pub endpoint_port: u16,
}

fn addr_len(family: Family) -> usize {
    match family {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

fn addr(family: Family, bytes: &[u8]) -> Option<IpAddr> {
    match family {
        Family::V4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        Family::V6 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
    }
}

impl AffinityEntry {
    /// An entry from its key and data as the kernel stores them: each field in its own
    /// 32-bit-aligned register words, ports in network order.
    pub fn from_registers(family: Family, key: &[u8], data: &[u8]) -> Option<Self> {
        let a = addr_len(family);
        if key.len() != 2 * a + 8 || data.len() != a + 4 {
            return None;
        }
        Some(Self {
            client: addr(family, &key[..a])?,
            frontend: addr(family, &key[a..2 * a])?,
            protocol: Protocol::from_number(key[2 * a])?.nft_name(),
            port: u16::from_be_bytes([key[2 * a + 4], key[2 * a + 5]]),
            endpoint: addr(family, &data[..a])?,
            endpoint_port: u16::from_be_bytes([data[a], data[a + 1]]),
        })
    }

    /// The entry's key as nft writes it (`client . frontend . protocol . port`).
    pub fn key_text(&self) -> String {
        format!("{} . {} . {} . {}", self.client, self.frontend, self.protocol, self.port)
    }
}

/// The entries in `nft list map` output: `elements = { KEY [timeout T] [expires E] : DATA, … }`.
pub fn parse_listing(text: &str) -> Vec<AffinityEntry> {
    let Some(start) = text.find("elements = {") else { return Vec::new() };
    let body = &text[start + "elements = {".len()..];
    let body = body.split('}').next().unwrap_or_default();
    body.split(',')
        .filter_map(|element| {
            let (key, data) = element.split_once(" : ")?;
            let mut fields = key.split_whitespace().filter(|f| *f != ".");
            let client = fields.next()?.parse().ok()?;
            let frontend = fields.next()?.parse().ok()?;
            let protocol = Protocol::from_nft_name(fields.next()?)?.nft_name();
            let port = fields.next()?.parse().ok()?;
            let mut data = data.split_whitespace().filter(|f| *f != ".");
            let endpoint = data.next()?.parse().ok()?;
            let endpoint_port = data.next()?.parse().ok()?;
            Some(AffinityEntry { client, frontend, protocol, port, endpoint, endpoint_port })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_read_from_registers_and_from_nft_listings() {
        let key = [10, 0, 0, 9, 203, 0, 113, 10, 6, 0, 0, 0, 0, 80, 0, 0];
        let data = [10, 1, 0, 5, 0x1f, 0x90, 0, 0];
        let e = AffinityEntry::from_registers(Family::V4, &key, &data);
        let want = AffinityEntry {
            client: IpAddr::from([10, 0, 0, 9]),
            frontend: IpAddr::from([203, 0, 113, 10]),
            protocol: "tcp",
            port: 80,
            endpoint: IpAddr::from([10, 1, 0, 5]),
            endpoint_port: 8080,
        };
        assert_eq!(e.as_ref(), Some(&want));
        assert_eq!(want.key_text(), "10.0.0.9 . 203.0.113.10 . tcp . 80");
        assert_eq!(AffinityEntry::from_registers(Family::V6, &key, &data), None, "wrong family's lengths");
        let listing = "table ip hawser {\n\tmap affinity-cluster {\n\t\ttype ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n\t\tsize 1048576\n\t\tflags dynamic,timeout\n\t\telements = { 10.0.0.9 . 203.0.113.10 . tcp . 80 timeout 10m expires 9m58s : 10.1.0.5 . 8080,\n\t\t\t     fd00::1 . fd00::2 . udp . 30053 timeout 1h expires 59m : fd00::3 . 53 }\n\t}\n}\n";
        let entries = parse_listing(listing);
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(entries[0], want);
        assert_eq!(entries[1].protocol, "udp");
        assert_eq!((entries[1].port, entries[1].endpoint_port), (30053, 53));
        assert!(parse_listing("table ip hawser {\n\tmap affinity-cluster {\n\t}\n}").is_empty());
    }
}
