//! The files of an install: which configuration a runtime uses, atomic
//! writes (a runtime never reads half a file), the plugin binary.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The extensions libcni loads network configurations from.
pub const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The configuration files in `dir`, in the order a runtime (libcni, as
/// containerd and CRI-O use it) considers them: by file name. The first
/// is the one in use.
pub fn configs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let is_config = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e));
        if is_config && entry.file_type()?.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `bytes` to `path` through a temporary file in the same
/// directory (a name no runtime loads), synced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.palisade-tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Copies the plugin binary `source` to `bin_dir/palisade-cni` (atomically,
/// mode 0755) unless it is there already with the same contents. Returns
/// whether it was written.
pub fn install_binary(source: &Path, bin_dir: &Path) -> io::Result<bool> {
    let bytes = fs::read(source)?;
    let target = bin_dir.join(crate::cni::config::PLUGIN_TYPE);
    if fs::read(&target).is_ok_and(|existing| existing == bytes) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir)?;
    write_atomic(&target, &bytes, 0o755)?;
    Ok(true)
}
