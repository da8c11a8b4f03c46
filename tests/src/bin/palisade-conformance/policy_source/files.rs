//! `--source files`: one manifest file per object in the agent's manifest
//! directory, written atomically. Pod manifests carry their addresses from
//! the start (the plan knows them), so nothing changes when a pod runs.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Result;
use palisade_tests::agent::{self, AgentSource};
use palisade_tests::conformance::{NamespacedName, ObjectKey, SourceEdit};
use palisade_tests::netns::{Netns, TcpForwarder};

use super::PolicySource;

/// The agent's manifest directory.
pub struct ManifestDir {
    dir: PathBuf,
}

impl ManifestDir {
    /// The directory the agent watches (`AgentDirs::manifests`).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

/// The file name of an object: `<kind>--<namespace>--<name>.yaml`.
fn file_name(key: &ObjectKey) -> String {
    format!(
        "{}--{}--{}.yaml",
        key.kind.to_ascii_lowercase(),
        key.namespace.as_deref().unwrap_or("_cluster"),
        key.name
    )
}

impl PolicySource for ManifestDir {
    fn agent_source(&self) -> AgentSource<'_> {
        AgentSource::Files
    }

    /// Nothing: the directory is on the machine's file system.
    fn reach_from(&self, _node: &Netns) -> Result<Option<TcpForwarder>> {
        Ok(None)
    }

    fn apply(&mut self, edit: SourceEdit<'_>) -> Result<()> {
        match edit {
            SourceEdit::Upsert(object) => {
                let text = serde_yaml_ng::to_string(&object.value)?;
                agent::write_manifest(&self.dir, &file_name(&object.key), &text)
            }
            SourceEdit::Delete(key) => match agent::remove_manifest(&self.dir, &file_name(key)) {
                Err(e)
                    if e.root_cause()
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
                {
                    Ok(())
                }
                other => other,
            },
        }
    }

    fn pod_running(&mut self, _pod: &NamespacedName, _ips: &[IpAddr]) -> Result<()> {
        Ok(())
    }

    /// Nothing: the directory goes with the agent's directories.
    fn clear(&mut self) -> Result<()> {
        Ok(())
    }
}
