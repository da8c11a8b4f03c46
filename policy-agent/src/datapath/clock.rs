//! The kernel's HZ, which the classifier needs to keep conntrack time in
//! jiffies. User space cannot read it (`sysconf(_SC_CLK_TCK)` is USER_HZ), so
//! it is measured: the `palisade_jiffies` program returns `bpf_jiffies64`,
//! run twice 60 ms apart. Measured once per process.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use policy_common::names;

use super::{Datapath, DatapathError};

/// The values of CONFIG_HZ Linux offers.
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];

static HZ: OnceLock<u64> = OnceLock::new();

pub(super) fn kernel_hz(datapath: &mut Datapath) -> Result<u64, DatapathError> {
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let frame = [0u8; 14];
    let mut jiffies = || -> Result<u32, DatapathError> {
        let (ret, _) = datapath.test_run_program(names::PROG_JIFFIES, &frame, 1, 1)?;
        Ok(ret as u32)
    };
    let (j0, t0) = (jiffies()?, Instant::now());
    std::thread::sleep(Duration::from_millis(60));
    let (j1, elapsed) = (jiffies()?, t0.elapsed());
    let rate = f64::from(j1.wrapping_sub(j0)) / elapsed.as_secs_f64();
    let hz = nearest_known(rate);
    Ok(*HZ.get_or_init(|| hz))
}

fn nearest_known(rate: f64) -> u64 {
    KNOWN_HZ
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - rate)
                .abs()
                .total_cmp(&(*b as f64 - rate).abs())
        })
        .unwrap_or(policy_common::Config::FALLBACK_HZ)
}

#[cfg(test)]
mod tests {
    use super::nearest_known;

    #[test]
    fn rounds_to_a_real_hz() {
        assert_eq!(nearest_known(98.0), 100);
        assert_eq!(nearest_known(233.0), 250);
        assert_eq!(nearest_known(290.0), 300);
        assert_eq!(nearest_known(960.0), 1000);
    }
}
