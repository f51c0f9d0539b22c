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

    /// The lowest free host address of `family` not in `used`.
    pub fn allocate(&self, family: IpFamily, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        let pool = self.for_family(family)?;
        // Bounded so that a /64 pool does not make us walk 2^64 addresses when nearly full.
        pool.hosts().filter(|a| self.contains(a)).take(used.len() + 1).find(|a| !used.contains(a))
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
    fn allocates_lowest_free_host_and_skips_network_address() {
        let p = pools(&["203.0.113.0/30"]);
        let mut used = BTreeSet::new();
        let a = p.allocate(IpFamily::IPv4, &used).unwrap();
        assert_eq!(a.to_string(), "203.0.113.1");
        used.insert(a);
        assert_eq!(p.allocate(IpFamily::IPv4, &used).unwrap().to_string(), "203.0.113.2");
        used.insert("203.0.113.2".parse().unwrap());
        assert_eq!(p.allocate(IpFamily::IPv4, &used), None, "a /30 has two hosts");
    }

    #[test]
    fn family_without_pool_allocates_nothing() {
        let p = pools(&["203.0.113.0/24"]);
        assert_eq!(p.allocate(IpFamily::IPv6, &BTreeSet::new()), None);
    }

    #[test]
    fn dual_stack_pools_and_membership() {
        let p = pools(&["203.0.113.0/24", "2001:db8::/120"]);
        assert!(p.contains(&"203.0.113.9".parse().unwrap()));
        assert!(!p.contains(&"203.0.113.0".parse().unwrap()), "network address");
        assert!(!p.contains(&"203.0.113.255".parse().unwrap()), "broadcast address");
        assert!(!p.contains(&"198.51.100.1".parse().unwrap()));
        assert!(p.contains(&"2001:db8::5".parse().unwrap()));
        assert_eq!(p.allocate(IpFamily::IPv6, &BTreeSet::new()).unwrap().to_string(), "2001:db8::1");
    }

    #[test]
    fn two_pools_of_one_family_are_refused() {
        let err = AddressPools::new(vec!["10.0.0.0/24".parse().unwrap(), "10.1.0.0/24".parse().unwrap()]).unwrap_err();
        assert!(err.contains("more than one IPv4"), "{err}");
    }
}
