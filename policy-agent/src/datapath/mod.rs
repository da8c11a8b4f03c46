//! Loading the classifier, attaching it to interfaces, and typed access to its maps.

mod attach;
mod clock;
mod events;
mod maps;
mod object;
pub mod writer;

use std::path::{Path, PathBuf};

pub use attach::{Adopted, LINKS_DIR};
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
};
pub use events::{FlowReader, LostCounter, ReadEvent};
pub use maps::{PeerCidrKey, cidr_key};
use policy_common::{Config, Direction, names};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this agent was built without the eBPF object (run `cargo xtask build-ebpf` before building it)"
    )]
    NoObject,
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("attaching to {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
    #[error("link {interface}: {message}")]
    Link { interface: String, message: String },
}

/// The loaded classifier and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the embedded classifier. Maps are pinned in `pin_dir`; maps already
    /// pinned there are reused, which is how a restarted agent adopts the state
    /// its predecessor left.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        let object = object::CLASSIFIER;
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object)?;
        for name in [
            names::PROG_FROM_POD,
            names::PROG_TO_POD,
            names::PROG_NOOP,
            names::PROG_JIFFIES,
        ] {
            let program = classifier(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        };
        let hz = clock::kernel_hz(&mut datapath)?;
        let map_error = |source| DatapathError::Map {
            name: names::CONFIG,
            source,
        };
        let mut config = datapath.config()?;
        // Keep the generation an earlier agent left in the pinned map.
        let current = config.get(&0, 0).map_err(map_error)?;
        config
            .set(0, Config { hz, ..current }, 0)
            .map_err(map_error)?;
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Runs the program of `direction` once per `repeat` on `frame` with
    /// BPF_PROG_TEST_RUN, as if it crossed interface `ifindex`. Returns the
    /// program's return value and the mean run time.
    pub fn test_run(
        &mut self,
        direction: Direction,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DatapathError> {
        let name = match direction {
            Direction::Egress => names::PROG_FROM_POD,
            Direction::Ingress => names::PROG_TO_POD,
        };
        self.test_run_program(name, frame, ifindex, repeat)
    }

    /// Like [`Datapath::test_run`], for any program of the object (e.g. the no-op floor).
    pub fn test_run_program(
        &mut self,
        name: &'static str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DatapathError> {
        let ctx = skb_ctx_with_ifindex(ifindex);
        let program = classifier(&mut self.ebpf, name)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let result = program
            .test_run(opts)
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok((result.return_value as i32, result.duration))
    }
}

/// The start of a `struct __sk_buff` with only `ifindex` (offset 40) set: the
/// kernel accepts a short context and requires the fields before it be zero.
fn skb_ctx_with_ifindex(ifindex: u32) -> [u8; 44] {
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program = ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Return values of the classifier.
pub mod action {
    /// Pass and let the next program or the stack have the packet (TC_ACT_UNSPEC / TCX_NEXT).
    pub const PASS: i32 = -1;
    /// TC_ACT_SHOT.
    pub const DROP: i32 = 2;
}
