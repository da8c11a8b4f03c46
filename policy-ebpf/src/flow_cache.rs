//! A per-CPU, direct-mapped cache of established flows in front of conntrack.
//!
//! A conntrack lookup is a hash lookup (tens of ns on the development VM); a
//! slot of this cache is an array lookup. A slot records that conntrack passed
//! a packet of the flow without changing anything but its refresh time, and
//! is trusted only while everything that made that so still holds:
//!
//! - the key is equal (full compare: colliding flows evict each other);
//! - `EPOCHS[endpoint]` is still the epoch the entry was judged under, so a
//!   policy change or the endpoint's removal stops the flow as before;
//! - the index's shared version is unchanged: every conntrack write that
//!   replaces an entry (a new connection) or makes it one the cache may not
//!   stand in for (its first FIN, an RST before any FIN) bumps it, for all
//!   CPUs (later FINs and the removal of a closed entry need not: no slot can
//!   be filled from an entry once it has seen a FIN);
//! - `Config::ct_flushes` is unchanged (the agent removed entries);
//! - conntrack passed the flow less than a second ago: then the packet goes
//!   through conntrack again, which checks expiry and refreshes `last_seen`
//!   exactly as it would without the cache (it refreshes at most once a
//!   second anyway, and no timeout is shorter than ten).
//!
//! Packets with SYN, FIN or RST never use the cache, and a slot is filled only
//! from an entry that such packets have not touched (open, no FIN seen).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use policy_common::{Config, CtEntry, CtKey, Direction, ct_flags, ct_state, ct_timeout, proto};

use crate::{
    conntrack::{Clock, current_epoch},
    maps::{FLOW_CACHE, FLOW_VERSIONS},
    parse::{TCP_FIN, TCP_RST, TCP_SYN},
};

/// Where a key lives in the cache, and the version its slot must carry. Read
/// before the conntrack lookup, so a write that races with filling the slot
/// leaves it stale-versioned rather than stale and trusted.
pub struct Probe {
    index: u32,
    version: u16,
    ct_flushes: u16,
}

impl Probe {
    #[inline(always)]
    pub fn new(key: &CtKey, config: Option<&Config>) -> Self {
        let index = key.cache_index();
        Probe {
            index,
            version: match FLOW_VERSIONS.get(index) {
                Some(version) => *version as u16,
                None => 0,
            },
            ct_flushes: match config {
                Some(config) => config.ct_flushes as u16,
                None => 0,
            },
        }
    }

    /// Whether the cache vouches for a packet of `key` in `direction`.
    #[inline(always)]
    pub fn hit(&self, key: &CtKey, direction: Direction, clock: &Clock) -> bool {
        let Some(slot) = FLOW_CACHE.get(self.index) else {
            return false;
        };
        slot.version == self.version
            && slot.ct_flushes == self.ct_flushes
            && slot.passes & pass_bit(direction) != 0
            && !clock.older_than32(slot.checked_at, ct_timeout::REFRESH)
            && key_eq(&slot.key, key)
            && slot.epoch == current_epoch(slot.endpoint_id)
    }

    /// Records that conntrack just passed a packet of `key` in `direction`
    /// with `entry` as it now stands, if the entry is one the cache may
    /// stand in for.
    #[inline(always)]
    pub fn fill(&self, key: &CtKey, entry: &CtEntry, direction: Direction, clock: &Clock) {
        if !may_vouch_for(entry) {
            return;
        }
        let passes = if entry.flags & ct_flags::SEEN_REPLY != 0 {
            pass_bit(Direction::Ingress) | pass_bit(Direction::Egress)
        } else {
            // A reply would set SEEN_REPLY: it must go through conntrack.
            pass_bit(direction)
        };
        let Some(slot) = FLOW_CACHE.get_ptr_mut(self.index) else {
            return;
        };
        // SAFETY: a per-CPU slot; a classifier run never nests on one CPU.
        let slot = unsafe { &mut *slot };
        slot.key = *key;
        slot.endpoint_id = entry.endpoint_id;
        slot.epoch = entry.epoch;
        slot.checked_at = clock.now as u32;
        slot.version = self.version;
        slot.ct_flushes = self.ct_flushes;
        slot.passes = passes;
    }
}

/// Whether a slot may stand in for `entry`: open, no FIN seen. Once this
/// turns false for an entry it stays false until the entry is replaced (by a
/// SYN, which bumps the version itself).
#[inline(always)]
pub fn may_vouch_for(entry: &CtEntry) -> bool {
    entry.state == ct_state::OPEN && entry.flags & !ct_flags::SEEN_REPLY == 0
}

/// Makes every CPU's slot for `key` stale. Called after the conntrack write.
#[inline(always)]
pub fn invalidate(key: &CtKey) {
    if let Some(version) = FLOW_VERSIONS.get_ptr_mut(key.cache_index()) {
        // SAFETY: an element of an array map, 4-aligned, shared by all CPUs.
        // (The bpfel target has no `AtomicU32`; this is a BPF atomic add.)
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(version, 1) };
    }
}

/// Packets with these flags change their conntrack entry: never cached.
#[inline(always)]
pub fn bypasses(protocol: u8, tcp_flags: u8) -> bool {
    protocol == proto::TCP && tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
}

#[inline(always)]
const fn pass_bit(direction: Direction) -> u8 {
    1 << direction as u8
}

#[inline(always)]
fn key_eq(a: &CtKey, b: &CtKey) -> bool {
    let (a, b) = (a.words(), b.words());
    let mut diff = 0;
    let mut i = 0;
    while i < a.len() {
        diff |= a[i] ^ b[i];
        i += 1;
    }
    diff == 0
}
