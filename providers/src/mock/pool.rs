//! Address allocation from the mock cloud's CIDR pools.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::IpFamily;

/// The CIDRs the mock cloud hands addresses out of, at most one per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPools {
    pools: Vec<IpNet>,
}

impl AddressPools {
    /// Pools from CIDRs; at most one per IP family.
    pub fn new(pools: Vec<IpNet>) -> Result<Self, String> {
        let mut seen = BTreeSet::new();
        for pool in &pools {
            if !seen.insert(family_of(pool)) {
                return Err(format!("more than one {:?} address pool given: {pools:?}", family_of(pool)));
            }
        }
        if pools.is_empty() {
            return Err("at least one address pool is needed".to_owned());
        }
        Ok(Self { pools })
    }

    /// The pool for `family`, if any.
    pub fn for_family(&self, family: IpFamily) -> Option<&IpNet> {
        self.pools.iter().find(|p| family_of(p) == family)
    }

    /// The pools as the user wrote them, for messages.
    pub fn describe(&self) -> String {
        self.pools.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }

    /// The next free host address of `family` after `after` (from the pool's start when `None`),
    /// wrapping round the pool: next-fit, so that each allocation costs about one step however
    /// many addresses are taken, like a cloud's IPAM.
    pub fn allocate(
        &self,
        family: IpFamily,
        after: Option<IpAddr>,
        used_count: usize,
        is_used: impl Fn(&IpAddr) -> bool,
    ) -> Option<IpAddr> {
        let pool = self.for_family(family)?;
        let (base, bits) = match pool {
            IpNet::V4(n) => (u128::from(u32::from(n.network())), 32 - u32::from(n.prefix_len())),
            IpNet::V6(n) => (u128::from(n.network()), 128 - u32::from(n.prefix_len())),
        };
        let size = if bits >= 128 { u128::MAX } else { 1u128 << bits };
        let start =
            after.filter(|a| pool.contains(a)).map_or(0, |a| (to_u128(&a).wrapping_sub(base).wrapping_add(1)) % size);
        // Every taken address can block one step, plus the two unassignable ones: past that the
        // pool is full. Bounded, so a nearly full /64 is not walked address by address.
        let steps = size.min(u128::try_from(used_count).unwrap_or(u128::MAX).saturating_add(3));
        (0..steps).map(|i| from_u128(base + (start + i) % size, family)).find(|a| self.contains(a) && !is_used(a))
    }

    /// Whether `addr` may be handed out (inside a pool, and a host address there).
    pub fn contains(&self, addr: &IpAddr) -> bool {
        // IPv4 network and broadcast addresses, and the IPv6 subnet-router anycast address (the
        // all-zero host), are not assignable, as on real clouds.
        self.for_family(IpFamily::of(addr)).is_some_and(|p| {
            p.contains(addr)
                && match addr {
                    IpAddr::V4(_) => p.prefix_len() >= 31 || (*addr != p.network() && *addr != p.broadcast()),
                    IpAddr::V6(_) => *addr != p.network(),
                }
        })
    }
}

fn to_u128(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn from_u128(n: u128, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::IPv4 => IpAddr::V4(std::net::Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        IpFamily::IPv6 => IpAddr::V6(std::net::Ipv6Addr::from(n)),
    }
}

fn family_of(net: &IpNet) -> IpFamily {
    match net {
        IpNet::V4(_) => IpFamily::IPv4,
        IpNet::V6(_) => IpFamily::IPv6,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pools(cidrs: &[&str]) -> AddressPools {
        AddressPools::new(cidrs.iter().map(|c| c.parse().unwrap()).collect()).unwrap()
    }

    #[test]
    fn allocates_next_free_host_and_skips_network_address() {
        let p = pools(&["203.0.113.0/30"]);
        let mut used = BTreeSet::new();
        let alloc =
            |used: &BTreeSet<IpAddr>, after| p.allocate(IpFamily::IPv4, after, used.len(), |a| used.contains(a));
        let a = alloc(&used, None).unwrap();
        assert_eq!(a.to_string(), "203.0.113.1");
        used.insert(a);
        let b = alloc(&used, Some(a)).unwrap();
        assert_eq!(b.to_string(), "203.0.113.2");
        used.insert(b);
        assert_eq!(alloc(&used, Some(b)), None, "a /30 has two hosts");
        used.remove(&a);
        assert_eq!(alloc(&used, Some(b)), Some(a), "wraps round to a freed address");
    }

    #[test]
    fn allocation_steps_past_taken_addresses_to_the_next_free_one() {
        let p = pools(&["198.18.0.0/15"]);
        let used: BTreeSet<IpAddr> =
            ["198.18.0.1", "198.18.0.2", "198.18.0.4"].iter().map(|a| a.parse().unwrap()).collect();
        let next = p.allocate(IpFamily::IPv4, Some("198.18.0.1".parse().unwrap()), used.len(), |a| used.contains(a));
        assert_eq!(next.unwrap().to_string(), "198.18.0.3");
    }

    #[test]
    fn family_without_pool_allocates_nothing() {
        let p = pools(&["203.0.113.0/24"]);
        assert_eq!(p.allocate(IpFamily::IPv6, None, 0, |_| false), None);
    }

    #[test]
    fn dual_stack_pools_and_membership() {
        let p = pools(&["203.0.113.0/24", "2001:db8::/120"]);
        assert!(p.contains(&"203.0.113.9".parse().unwrap()));
        assert!(!p.contains(&"203.0.113.0".parse().unwrap()), "network address");
        assert!(!p.contains(&"203.0.113.255".parse().unwrap()), "broadcast address");
        assert!(!p.contains(&"198.51.100.1".parse().unwrap()));
        assert!(p.contains(&"2001:db8::5".parse().unwrap()));
        assert_eq!(p.allocate(IpFamily::IPv6, None, 0, |_| false).unwrap().to_string(), "2001:db8::1");
    }

    #[test]
    fn two_pools_of_one_family_are_refused() {
        let err = AddressPools::new(vec!["10.0.0.0/24".parse().unwrap(), "10.1.0.0/24".parse().unwrap()]).unwrap_err();
        assert!(err.contains("more than one IPv4"), "{err}");
    }
}
