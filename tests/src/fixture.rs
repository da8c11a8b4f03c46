//! A classifier loaded in the kernel with private maps, for BPF_PROG_TEST_RUN.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use aya::maps::PerCpuValues;
use policy_agent::datapath::{Datapath, FlowReader, ReadEvent, action, cidr_key};
use policy_common::{
    Addr, CtKey, Direction, EndpointInfo, EndpointKey, FlowEvent, FlowSlot, PeerInfo, PeerIpKey,
    PolicyKey, PolicyValue, PortRule, Reason, event::DecodedCodes, flow_cache, v4_mapped,
};

/// The interface test runs pretend to cross: the loopback device, which
/// BPF_PROG_TEST_RUN uses when no other is named.
pub const TEST_IFINDEX: u32 = 1;

const ENDPOINT_KEY: EndpointKey = EndpointKey {
    ifindex: TEST_IFINDEX,
    generation: 0,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The 16-byte map form of an address.
pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What one test run did.
#[derive(Debug)]
pub struct Run {
    pub action: i32,
    pub events: Vec<(FlowEvent, DecodedCodes)>,
}

impl Run {
    pub fn passed(&self) -> bool {
        self.action == action::PASS
    }
    pub fn dropped(&self) -> bool {
        self.action == action::DROP
    }
    /// The reason of the single event this run produced, if exactly one.
    pub fn reason(&self) -> Option<Reason> {
        match self.events.as_slice() {
            [(_, codes)] => Some(codes.reason),
            _ => None,
        }
    }
}

/// A loaded classifier with maps pinned in a private directory removed on drop.
pub struct Classifier {
    pub datapath: Datapath,
    pub events: FlowReader,
    pin_dir: PathBuf,
}

impl Classifier {
    pub fn load() -> Result<Self> {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let mut datapath = Datapath::load(&pin_dir).context("loading the classifier")?;
        let events = FlowReader::take(&mut datapath)?;
        Ok(Self {
            datapath,
            events,
            pin_dir,
        })
    }

    /// Where its maps are pinned: a second [`Datapath::load`] there shares them.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Registers the endpoint behind [`TEST_IFINDEX`], at epoch 1 unless it has one.
    ///
    /// The fixture writes generation 0, which the classifier reads until a map
    /// writer switches it.
    pub fn set_endpoint(&mut self, info: EndpointInfo) -> Result<()> {
        let mut epochs = self.datapath.epochs()?;
        if epochs.get(&info.endpoint_id, 0)? == 0 {
            epochs.set(info.endpoint_id, 1, 0)?;
        }
        self.datapath.endpoints()?.insert(ENDPOINT_KEY, info, 0)?;
        Ok(())
    }

    pub fn set_peer(&mut self, ip: IpAddr, identity: u32, cidr_identity: u32) -> Result<()> {
        let key = PeerIpKey {
            addr: addr(ip),
            generation: 0,
        };
        self.datapath.peer_ips()?.insert(
            key,
            PeerInfo {
                identity,
                cidr_identity,
            },
            0,
        )?;
        Ok(())
    }

    pub fn set_cidr(&mut self, ip: IpAddr, prefix_len: u8, cidr_identity: u32) -> Result<()> {
        let info = PeerInfo {
            identity: policy_common::identity::WORLD,
            cidr_identity,
        };
        self.datapath
            .peer_cidrs()?
            .insert(&cidr_key(ip, prefix_len, 0), info, 0)?;
        Ok(())
    }

    pub fn set_policy(&mut self, key: PolicyKey, value: PolicyValue) -> Result<()> {
        self.datapath.policy()?.insert(key, value, 0)?;
        Ok(())
    }

    pub fn remove_policy(&mut self, key: PolicyKey) -> Result<()> {
        self.datapath.policy()?.remove(&key)?;
        Ok(())
    }

    /// Bumps the endpoint's epoch, as the agent does after changing its entries.
    pub fn bump_epoch(&mut self) -> Result<()> {
        let endpoint_id = self
            .datapath
            .endpoints()?
            .get(&ENDPOINT_KEY, 0)?
            .endpoint_id;
        let mut epochs = self.datapath.epochs()?;
        let epoch = epochs.get(&endpoint_id, 0)?;
        epochs.set(endpoint_id, epoch + 1, 0)?;
        Ok(())
    }

    /// The flow cache slot `key` maps to, on every CPU.
    pub fn flow_slots(&mut self, key: &CtKey) -> Result<Vec<FlowSlot>> {
        let slots = self.datapath.flow_cache()?.get(&key.cache_index(), 0)?;
        Ok(slots.iter().copied().collect())
    }

    /// Whether some CPU's flow cache holds `key`.
    pub fn is_cached(&mut self, key: &CtKey) -> Result<bool> {
        Ok(self.flow_slots(key)?.iter().any(|slot| slot.key == *key))
    }

    /// Writes `slot` into its place on every CPU, as if each had cached it.
    pub fn put_flow_slot(&mut self, slot: FlowSlot) -> Result<()> {
        let cpus = self.datapath.flow_cache()?.get(&0, 0)?.len();
        let values = PerCpuValues::try_from(vec![slot; cpus])?;
        self.datapath
            .flow_cache()?
            .set(slot.key.cache_index(), values, 0)?;
        Ok(())
    }

    /// Makes `seconds` pass for every tracked connection and cached flow.
    pub fn age(&mut self, seconds: u64) -> Result<()> {
        let hz = self.datapath.config()?.get(&0, 0)?.hz;
        let mut ct = self.datapath.conntrack()?;
        let entries: Vec<_> = ct.iter().collect::<Result<_, _>>()?;
        for (key, mut entry) in entries {
            entry.last_seen -= seconds * hz;
            ct.insert(key, entry, 0)?;
        }
        let mut cache = self.datapath.flow_cache()?;
        for index in 0..flow_cache::SLOTS {
            let slots: Vec<FlowSlot> = cache.get(&index, 0)?.iter().copied().collect();
            if slots.iter().all(|slot| slot.epoch == 0) {
                continue;
            }
            let aged: Vec<FlowSlot> = slots
                .into_iter()
                .map(|mut slot| {
                    slot.checked_at = slot.checked_at.wrapping_sub((seconds * hz) as u32);
                    slot
                })
                .collect();
            cache.set(
                index,
                PerCpuValues::try_from(aged).map_err(anyhow::Error::from)?,
                0,
            )?;
        }
        Ok(())
    }

    /// Runs one frame through the program of `direction` and collects the events it wrote.
    pub fn run(&mut self, direction: Direction, frame: &[u8]) -> Result<Run> {
        self.events.drain(|_| {});
        let (action, _) = self.datapath.test_run(direction, frame, TEST_IFINDEX, 1)?;
        let events = self
            .events
            .drain_all()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("undecodable flow event: {e}"))?;
        Ok(Run { action, events })
    }

    /// Like [`Classifier::run`], keeping undecodable events as errors.
    pub fn run_raw(&mut self, direction: Direction, frame: &[u8]) -> Result<(i32, Vec<ReadEvent>)> {
        self.events.drain(|_| {});
        let (action, _) = self.datapath.test_run(direction, frame, TEST_IFINDEX, 1)?;
        Ok((action, self.events.drain_all()))
    }
}

impl Drop for Classifier {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A policy value allowing every port of its protocol, by `rule_id`.
pub fn any_port(rule_id: u32) -> PolicyValue {
    PolicyValue {
        any_port_rule: rule_id,
        ..Default::default()
    }
}

/// A policy value allowing the given inclusive ranges, each with its rule.
pub fn port_ranges(ranges: &[(u16, u16, u32)]) -> PolicyValue {
    let mut value = PolicyValue::default();
    for (i, &(first, last, rule_id)) in ranges.iter().enumerate() {
        value.ranges[i] = PortRule {
            first,
            last,
            rule_id,
        };
    }
    value.range_count = ranges.len() as u32;
    value
}
