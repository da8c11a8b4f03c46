//! Attaching the classifier to a pod's host-side interface.
//!
//! Two ways:
//!
//! * [`Datapath::attach`]: links owned by the [`Datapath`] (detached when it
//!   is dropped): tests and the demo.
//! * [`Datapath::attach_pinned`]: TCX links pinned under
//!   `<pin-dir>/links/<name>-from-pod` and `…-to-pod`, so the programs stay
//!   attached while the agent is down. A restarted agent calls
//!   [`Datapath::adopt_pinned`], which swaps its freshly loaded programs into
//!   the same links with `bpf_link_update` (atomic: no packet goes
//!   unfiltered). [`Datapath::detach_pinned`] removes the pins, which
//!   detaches the links.
//!
//! Pinned links need TCX (Linux ≥ 6.6); the agent refuses to attach
//! otherwise rather than leave an interface that a restart would expose.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, TcAttachType, tc};
use policy_common::names;

use super::{Datapath, DatapathError, classifier};

/// The two hooks on a host-side veth: program, hook, pin suffix.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (names::PROG_FROM_POD, TcAttachType::Ingress, "from-pod"),
    (names::PROG_TO_POD, TcAttachType::Egress, "to-pod"),
];

/// Sub-directory of the pin directory holding the links.
pub const LINKS_DIR: &str = "links";

/// What [`Datapath::adopt_pinned`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// Both links were there and now run this datapath's programs.
    Both,
    /// No pinned link (or only one): nothing was adopted, the stale pin (if
    /// any) was removed; attach afresh.
    Missing,
}

fn link_err(interface: &str) -> impl Fn(LinkError) -> DatapathError + '_ {
    move |e| DatapathError::Link {
        interface: interface.to_owned(),
        message: e.to_string(),
    }
}

fn pin_io(path: &Path) -> impl Fn(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::PinDir {
        path: path.to_owned(),
        source,
    }
}

impl Datapath {
    /// Attaches both directions to the host side of a pod's veth, by name in
    /// the calling thread's network namespace. TCX where the kernel has it
    /// (6.6+), a clsact qdisc otherwise. The links live as long as this
    /// `Datapath`.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        // Only needed on the netlink path; harmless when it exists already.
        let _ = tc::qdisc_add_clsact(interface);
        for (name, attach_type, _) in HOOKS {
            classifier(&mut self.ebpf, name)?
                .attach(interface, attach_type)
                .map_err(|source| DatapathError::Attach {
                    interface: interface.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The directory of pinned links.
    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join(LINKS_DIR)
    }

    fn link_pin(&self, pin_name: &str, suffix: &str) -> PathBuf {
        self.links_dir().join(format!("{pin_name}-{suffix}"))
    }

    /// Attaches both directions to `interface` with TCX links pinned as
    /// `links/<pin_name>-from-pod` and `-to-pod`: they stay attached after
    /// this process exits, until [`Datapath::detach_pinned`]. Links pinned
    /// under that name before are detached first.
    pub fn attach_pinned(&mut self, interface: &str, pin_name: &str) -> Result<(), DatapathError> {
        let dir = self.links_dir();
        std::fs::create_dir_all(&dir).map_err(pin_io(&dir))?;
        self.detach_pinned(pin_name)?;
        for (name, attach_type, suffix) in HOOKS {
            let pin = self.link_pin(pin_name, suffix);
            let program = classifier(&mut self.ebpf, name)?;
            let id = program
                .attach_with_options(
                    interface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|source| DatapathError::Attach {
                    interface: interface.to_owned(),
                    source,
                })?;
            let link = program
                .take_link(id)
                .map_err(|source| DatapathError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(link_err(interface))?;
            link.pin(&pin).map_err(|e| DatapathError::Link {
                interface: interface.to_owned(),
                message: format!("pinning {}: {e}", pin.display()),
            })?;
            // Dropping the PinnedLink closes our descriptor; the pin keeps
            // the link (and the program) attached.
        }
        Ok(())
    }

    /// Swaps this datapath's programs into the links pinned under
    /// `pin_name` (left by an earlier agent): the interface is never
    /// without a classifier. A link whose interface is gone cannot be
    /// updated: that is an error, and the caller drops the endpoint.
    pub fn adopt_pinned(&mut self, pin_name: &str) -> Result<Adopted, DatapathError> {
        let pins: Vec<PathBuf> = HOOKS
            .iter()
            .map(|(_, _, suffix)| self.link_pin(pin_name, suffix))
            .collect();
        if !pins.iter().all(|p| p.exists()) {
            self.detach_pinned(pin_name)?;
            return Ok(Adopted::Missing);
        }
        for ((name, _, _), pin) in HOOKS.iter().zip(&pins) {
            let what = pin.display().to_string();
            let pinned = PinnedLink::from_pin(pin).map_err(link_err(&what))?;
            let link =
                SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err(&what))?;
            let program = classifier(&mut self.ebpf, name)?;
            let id = program
                .attach_to_link(link)
                .map_err(|source| DatapathError::Attach {
                    interface: what.clone(),
                    source,
                })?;
            // Forget our handle without detaching: the pin holds the link.
            let link = program
                .take_link(id)
                .map_err(|source| DatapathError::Program { name, source })?;
            drop(FdLink::try_from(link).map_err(link_err(&what))?);
        }
        Ok(Adopted::Both)
    }

    /// Removes the links pinned under `pin_name`, which detaches them.
    /// Returns whether there was any.
    pub fn detach_pinned(&mut self, pin_name: &str) -> Result<bool, DatapathError> {
        let mut found = false;
        for (_, _, suffix) in HOOKS {
            let pin = self.link_pin(pin_name, suffix);
            match std::fs::remove_file(&pin) {
                Ok(()) => found = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(pin_io(&pin)(e)),
            }
        }
        Ok(found)
    }

    /// The names under which links are pinned now (`<name>-from-pod` →
    /// `<name>`).
    pub fn pinned_link_names(&self) -> Result<Vec<String>, DatapathError> {
        let dir = self.links_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(pin_io(&dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let file = entry.map_err(pin_io(&dir))?.file_name();
            let file = file.to_string_lossy();
            if let Some(name) = HOOKS
                .iter()
                .find_map(|(_, _, suffix)| file.strip_suffix(&format!("-{suffix}")))
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }
}
