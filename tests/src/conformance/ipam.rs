//! Addresses for pods that the scenario gives none: taken in ascending order
//! from an IPv4 pool, skipping every address the scenario writes anywhere (in
//! any step), every address already handed out (a deleted pod's address is
//! not reused), and addresses ending in `.0` or `.255`. The same scenario and
//! pool always give the same addresses.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// An IPv4 CIDR to allocate pod addresses from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPool {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a pool is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Not `a.b.c.d/len`.
    #[error("{0:?} is not an IPv4 CIDR")]
    Syntax(String),
    /// A prefix longer than /30 leaves no room, one over 32 is not a prefix.
    #[error("prefix length {0} leaves no addresses to allocate (at most /30)")]
    TooSmall(u8),
    /// Host bits set.
    #[error("{0} has host bits set")]
    HostBits(String),
}

impl IpPool {
    /// The pool `network/prefix_len`.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, PoolError> {
        if prefix_len > 30 {
            return Err(PoolError::TooSmall(prefix_len));
        }
        let mask = u32::MAX << (32 - prefix_len);
        if u32::from(network) & !mask != 0 {
            return Err(PoolError::HostBits(format!("{network}/{prefix_len}")));
        }
        Ok(Self {
            network,
            prefix_len,
        })
    }

    /// Whether `ip` is in the pool.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.network)
    }

    /// The candidate addresses, in allocation order: the pool's hosts
    /// without the network and broadcast addresses and without `x.y.z.0`
    /// and `x.y.z.255`.
    fn candidates(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network);
        let size = 1u64 << (32 - self.prefix_len);
        (1..size - 1)
            .map(move |offset| Ipv4Addr::from(first + offset as u32))
            .filter(|ip| !matches!(ip.octets()[3], 0 | 255))
    }
}

impl Default for IpPool {
    /// `10.244.0.0/16`, the usual pod range; its first address is 10.244.0.1.
    fn default() -> Self {
        Self {
            network: Ipv4Addr::new(10, 244, 0, 0),
            prefix_len: 16,
        }
    }
}

impl fmt::Display for IpPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for IpPool {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let syntax = || PoolError::Syntax(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(syntax)?;
        let network = addr.parse().map_err(|_| syntax())?;
        let prefix_len = len.parse().map_err(|_| syntax())?;
        Self::new(network, prefix_len)
    }
}

/// Hands out addresses of a pool (see the module docs).
#[derive(Clone, Debug)]
pub struct Allocator {
    pool: IpPool,
    taken: BTreeSet<IpAddr>,
    cursor: u64,
}

impl Allocator {
    /// An allocator that never hands out an address of `reserved`.
    pub fn new(pool: IpPool, reserved: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            pool,
            taken: reserved.into_iter().collect(),
            cursor: 0,
        }
    }

    /// Marks `ip` as taken.
    pub fn reserve(&mut self, ip: IpAddr) {
        self.taken.insert(ip);
    }

    /// The next free address; `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let skip = usize::try_from(self.cursor).ok()?;
        for (i, ip) in self.pool.candidates().enumerate().skip(skip) {
            if self.taken.insert(IpAddr::V4(ip)) {
                self.cursor = i as u64 + 1;
                return Some(ip);
            }
        }
        None
    }

    /// The pool.
    pub fn pool(&self) -> IpPool {
        self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_order_around_reserved_and_edge_addresses() {
        let pool: IpPool = "10.1.0.0/23".parse().unwrap();
        let reserved = [IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2))];
        let mut alloc = Allocator::new(pool, reserved);
        assert_eq!(alloc.allocate(), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(alloc.allocate(), Some(Ipv4Addr::new(10, 1, 0, 3)));
        alloc.reserve(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 4)));
        assert_eq!(alloc.allocate(), Some(Ipv4Addr::new(10, 1, 0, 5)));
        // x.y.z.255 and x.y.z.0 are skipped
        let mut alloc = Allocator::new(pool, []);
        let all: Vec<_> = std::iter::from_fn(|| alloc.allocate()).collect();
        assert_eq!(all.len(), 254 * 2);
        assert!(!all.contains(&Ipv4Addr::new(10, 1, 0, 255)));
        assert!(!all.contains(&Ipv4Addr::new(10, 1, 1, 0)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 1, 1, 254)));
    }

    #[test]
    fn pool_syntax() {
        assert_eq!("10.244.0.0/16".parse::<IpPool>(), Ok(IpPool::default()));
        assert!(matches!(
            "10.244.0.1/16".parse::<IpPool>(),
            Err(PoolError::HostBits(_))
        ));
        assert!(matches!(
            "10.244.0.0/31".parse::<IpPool>(),
            Err(PoolError::TooSmall(31))
        ));
        assert!(matches!(
            "10.244.0.0".parse::<IpPool>(),
            Err(PoolError::Syntax(_))
        ));
        assert!(IpPool::default().contains(Ipv4Addr::new(10, 244, 3, 4)));
        assert!(!IpPool::default().contains(Ipv4Addr::new(10, 245, 0, 1)));
    }
}
