//! Forgetting an endpoint's tracked connections when it is unregistered, so
//! that a later pod on the same interface index or endpoint id inherits
//! nothing.

use crate::datapath::{Datapath, DatapathError};
use policy_common::names;

/// Removes the conntrack entries of interface `ifindex` (and, through
/// `Config::ct_flushes`, every flow cache slot) and the fragment entries of
/// `endpoint_id`; returns how many conntrack entries went.
pub fn flush_endpoint(
    dp: &mut Datapath,
    ifindex: u32,
    endpoint_id: u32,
) -> Result<usize, DatapathError> {
    let map_err = |name: &'static str| move |source| DatapathError::Map { name, source };

    let mut conntrack = dp.conntrack()?;
    // Collect first: removing while iterating a hash map skips entries.
    let keys: Vec<_> = conntrack
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.ifindex == ifindex)
        .collect();
    let mut flushed = 0;
    for key in &keys {
        match conntrack.remove(key) {
            Ok(()) => flushed += 1,
            // Evicted meanwhile (LRU).
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err(names::CONNTRACK)(e)),
        }
    }
    if flushed > 0 {
        dp.count_ct_flush()?;
    }

    let mut fragments = dp.fragments()?;
    let keys: Vec<_> = fragments
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.endpoint_id == endpoint_id)
        .collect();
    for key in &keys {
        match fragments.remove(key) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err(names::FRAGMENTS)(e)),
        }
    }
    Ok(flushed)
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
