//! Reading flow events from the ring buffer.

use aya::maps::{MapData, PerCpuArray, RingBuf};
use policy_common::{
    FlowEvent,
    event::{DecodeError, DecodedCodes},
    names,
};

use super::{Datapath, DatapathError};

/// One record read from the ring buffer.
pub type ReadEvent = Result<(FlowEvent, DecodedCodes), DecodeError>;

/// Owns the flow ring buffer; drains it without blocking.
pub struct FlowReader {
    ring: RingBuf<MapData>,
}

impl FlowReader {
    /// Takes the ring buffer out of `datapath`; there is one reader per datapath.
    pub fn take(datapath: &mut Datapath) -> Result<Self, DatapathError> {
        let name = names::FLOW_EVENTS;
        let map = datapath
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let ring = RingBuf::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { ring })
    }

    /// Decodes every record available now, calling `f` on each.
    pub fn drain(&mut self, mut f: impl FnMut(ReadEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            f(FlowEvent::decode(&item));
            n += 1;
        }
        n
    }

    /// Every record available now.
    pub fn drain_all(&mut self) -> Vec<ReadEvent> {
        let mut out = Vec::new();
        self.drain(|e| out.push(e));
        out
    }

    /// The file descriptor to poll for readability.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }
}

/// The classifier's count of records it could not put into the ring buffer.
pub struct LostCounter {
    map: PerCpuArray<MapData, u64>,
}

impl LostCounter {
    /// Takes the counter out of `datapath` (whose `events_lost` then fails).
    pub fn take(datapath: &mut Datapath) -> Result<Self, DatapathError> {
        let name = names::EVENTS_LOST;
        let map = datapath
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let map =
            PerCpuArray::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { map })
    }

    /// Records lost so far, summed over CPUs.
    pub fn read(&self) -> Result<u64, DatapathError> {
        let per_cpu = self.map.get(&0, 0).map_err(|source| DatapathError::Map {
            name: names::EVENTS_LOST,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }
}
