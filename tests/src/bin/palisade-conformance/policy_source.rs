//! The policy source the agent reads: with `--source files`, one manifest
//! file per object in the agent's manifest directory (written atomically).

use anyhow::Result;
use palisade_tests::agent::AgentDirs;
use palisade_tests::conformance::{ObjectKey, SourceEdit};

/// The file name of an object: `<kind>--<namespace>--<name>.yaml`.
fn file_name(key: &ObjectKey) -> String {
    format!(
        "{}--{}--{}.yaml",
        key.kind.to_ascii_lowercase(),
        key.namespace.as_deref().unwrap_or("_cluster"),
        key.name
    )
}

/// Carries out `edit` in the manifest directory of `dirs`.
pub fn apply(dirs: &AgentDirs, edit: SourceEdit<'_>) -> Result<()> {
    match edit {
        SourceEdit::Upsert(object) => {
            let text = serde_yaml_ng::to_string(&object.value)?;
            dirs.write_manifest(&file_name(&object.key), &text)
        }
        SourceEdit::Delete(key) => match dirs.remove_manifest(&file_name(key)) {
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
