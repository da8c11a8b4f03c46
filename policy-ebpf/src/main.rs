//! Palisade's TC classifier, attached to the host side of each pod's veth.
//!
//! `palisade_from_pod` runs on the host veth's ingress (the pod's egress),
//! `palisade_to_pod` on its egress (the pod's ingress). Both run the same path
//! ([`classify`]) with the direction fixed at compile time.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic_xadd: the bpfel target has no atomic types"
)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference so they are not copied again"
)]

mod addr;
mod classify;
mod conntrack;
mod flow_cache;
mod maps;
mod parse;
mod policy;
mod report;

use aya_ebpf::{macros::classifier, programs::TcContext};
use policy_common::Direction;

#[classifier]
pub fn palisade_from_pod(ctx: TcContext) -> i32 {
    classify::classify(&ctx, Direction::Egress)
}

#[classifier]
pub fn palisade_to_pod(ctx: TcContext) -> i32 {
    classify::classify(&ctx, Direction::Ingress)
}

/// Passes everything: the floor the benchmark measures the classifier against.
#[classifier]
pub fn palisade_noop(_ctx: TcContext) -> i32 {
    classify::PASS
}

/// Returns the low 32 bits of `bpf_jiffies64`: run twice with
/// BPF_PROG_TEST_RUN, it lets the agent measure the kernel's HZ.
#[classifier]
pub fn palisade_jiffies(_ctx: TcContext) -> i32 {
    unsafe { aya_ebpf::helpers::bpf_jiffies64() as i32 }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
