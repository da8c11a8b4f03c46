//! The record the classifier writes to the flow ring buffer.

use core::mem::size_of;

use crate::{
    codes::{Direction, Reason, UnknownCode, Verdict},
    maps::Addr,
};

/// One new-connection verdict or one drop.
///
/// Ports are the packet's own (source, destination); for ICMP echo they hold the
/// identifier on the request side. For a later fragment they are those of the
/// first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (monotonic since boot).
    pub timestamp_ns: u64,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub endpoint_id: u32,
    /// Identity of the other side (pod identity, HOST or WORLD).
    pub peer_identity: u32,
    /// Identity of the ipBlock prefix the peer fell in, 0 when none.
    pub peer_cidr_identity: u32,
    /// Rule that decided an allow by policy, 0 otherwise.
    pub rule_id: u32,
    /// Host-side interface the packet crossed.
    pub ifindex: u32,
    /// Length of the packet as seen by the classifier.
    pub packet_len: u32,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    /// 4 or 6.
    pub family: u8,
    /// TCP flags byte, or the ICMP type for ICMP and ICMPv6.
    pub tcp_flags_or_icmp_type: u8,
    pub _pad: [u16; 3],
}

const _: () = assert!(size_of::<FlowEvent>() == 80);

/// A [`FlowEvent`] whose codes were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedCodes {
    pub direction: Direction,
    pub verdict: Verdict,
    pub reason: Reason,
}

/// Why a ring-buffer record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is not `size_of::<FlowEvent>()` bytes.
    Length {
        got: usize,
    },
    Code(UnknownCode),
    /// Verdict and reason disagree.
    Inconsistent {
        verdict: u8,
        reason: u8,
    },
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Length { got } => {
                write!(
                    f,
                    "flow record of {got} bytes, expected {}",
                    size_of::<FlowEvent>()
                )
            }
            DecodeError::Code(c) => write!(f, "{c}"),
            DecodeError::Inconsistent { verdict, reason } => {
                write!(f, "verdict {verdict} contradicts reason {reason}")
            }
        }
    }
}

impl From<UnknownCode> for DecodeError {
    fn from(c: UnknownCode) -> Self {
        DecodeError::Code(c)
    }
}

impl FlowEvent {
    /// Reads a record from ring-buffer bytes, checking its length and codes.
    pub fn decode(bytes: &[u8]) -> Result<(FlowEvent, DecodedCodes), DecodeError> {
        if bytes.len() != size_of::<FlowEvent>() {
            return Err(DecodeError::Length { got: bytes.len() });
        }
        // SAFETY: length checked above; FlowEvent is repr(C) plain data valid for
        // any bit pattern, and read_unaligned copes with the buffer's alignment.
        let event = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) };
        let codes = event.codes()?;
        Ok((event, codes))
    }

    pub fn codes(&self) -> Result<DecodedCodes, DecodeError> {
        let direction = Direction::try_from(self.direction)?;
        let verdict = Verdict::try_from(self.verdict)?;
        let reason = Reason::try_from(self.reason)?;
        if reason.verdict() != verdict {
            return Err(DecodeError::Inconsistent {
                verdict: self.verdict,
                reason: self.reason,
            });
        }
        Ok(DecodedCodes {
            direction,
            verdict,
            reason,
        })
    }
}
