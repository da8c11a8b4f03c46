//! `palisade-cni install`: what the DaemonSet's init container does on
//! every node. Copies the plugin into the CNI binary directory, then adds
//! Palisade as the last plugin of the network configuration the runtime
//! uses (the first file of the configuration directory by name):
//!
//! * idempotent: a configuration that already ends with the same Palisade
//!   entry is left alone; an older entry is updated or moved to the end;
//! * the file as it was before Palisade is kept as `<file>.palisade-backup`
//!   (an extension no runtime loads);
//! * a single-plugin `.conf` becomes a `.conflist` of that plugin and
//!   Palisade (the `.conf` goes; its backup keeps it);
//! * no configuration, an unparseable one, or a conflist without plugins
//!   is an error: the init container fails and the pod does not start.

mod conflist;
mod files;

use std::fs;
use std::path::{Path, PathBuf};

pub use conflist::{Chained, ConflistError, chain, entry, is_palisade};
pub use files::{CONFIG_EXTENSIONS, configs, install_binary, write_atomic};

/// The suffix of the backup of a configuration.
pub const BACKUP_SUFFIX: &str = ".palisade-backup";

/// What to install where.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The runtime's network configuration directory (/etc/cni/net.d).
    pub conf_dir: PathBuf,
    /// The runtime's CNI binary directory (/opt/cni/bin).
    pub bin_dir: PathBuf,
    /// The plugin binary to copy (normally the running executable).
    pub binary: PathBuf,
    /// `socket` of the entry.
    pub socket: String,
    /// `timeoutSeconds` of the entry.
    pub timeout_seconds: f64,
}

/// What an install did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// Whether the binary was written (false: it was there already).
    pub binary_written: bool,
    /// The configuration now in use.
    pub config: PathBuf,
    /// Whether the configuration was written (false: already chained).
    pub config_written: bool,
    /// The backup written now, if any.
    pub backup: Option<PathBuf>,
    /// A `.conf` replaced by `config`, if any.
    pub replaced: Option<PathBuf>,
}

/// Why an install failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no CNI network configuration in {0} (*.conf, *.conflist, *.json): install the \
         cluster's network plugin first, Palisade chains onto it"
    )]
    NoConfig(PathBuf),
    #[error("{path}: {source}; fix or remove the file")]
    Config {
        path: PathBuf,
        source: ConflistError,
    },
    #[error("{0} exists beside the .conf it would replace; remove one of them")]
    Clash(PathBuf),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io { what, path, source }
}

/// Installs (see the module docs).
pub fn install(options: &InstallOptions) -> Result<InstallReport, InstallError> {
    // The binary first: a configuration must never name a missing plugin.
    let binary_written = install_binary(&options.binary, &options.bin_dir)
        .map_err(io_error("installing the plugin into", &options.bin_dir))?;
    let config = configs(&options.conf_dir)
        .map_err(io_error("reading", &options.conf_dir))?
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig(options.conf_dir.clone()))?;
    let text = fs::read_to_string(&config).map_err(io_error("reading", &config))?;
    let entry = entry(&options.socket, options.timeout_seconds);
    let chained = chain(&text, &entry).map_err(|source| InstallError::Config {
        path: config.clone(),
        source,
    })?;
    let mut report = InstallReport {
        binary_written,
        config: config.clone(),
        config_written: false,
        backup: None,
        replaced: None,
    };
    if !chained.changed {
        return Ok(report);
    }
    if !chained.had_palisade {
        let mut name = config.clone().into_os_string();
        name.push(BACKUP_SUFFIX);
        let backup = PathBuf::from(name);
        write_atomic(&backup, text.as_bytes(), 0o644).map_err(io_error("writing", &backup))?;
        report.backup = Some(backup);
    }
    let target = if chained.converted {
        let target = config.with_extension("conflist");
        if target.exists() {
            return Err(InstallError::Clash(target));
        }
        target
    } else {
        config.clone()
    };
    let mut json = serde_json::to_string_pretty(&chained.doc).unwrap_or_default();
    json.push('\n');
    write_atomic(&target, json.as_bytes(), 0o644).map_err(io_error("writing", &target))?;
    if target != config {
        fs::remove_file(&config).map_err(io_error("removing", &config))?;
        report.replaced = Some(config);
    }
    report.config = target;
    report.config_written = true;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use serde_json::Value;

    use super::*;

    struct Dirs {
        root: PathBuf,
        conf: PathBuf,
        bin: PathBuf,
        binary: PathBuf,
    }

    impl Dirs {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "palisade-cni-install-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            let conf = root.join("net.d");
            fs::create_dir_all(&conf).unwrap();
            let binary = root.join("palisade-cni-src");
            fs::write(&binary, b"#!/bin/true\n").unwrap();
            Self {
                bin: root.join("bin"),
                conf,
                binary,
                root,
            }
        }

        fn options(&self) -> InstallOptions {
            InstallOptions {
                conf_dir: self.conf.clone(),
                bin_dir: self.bin.clone(),
                binary: self.binary.clone(),
                socket: "/run/palisade/agent.sock".into(),
                timeout_seconds: 10.0,
            }
        }

        fn read(&self, name: &str) -> Value {
            serde_json::from_str(&fs::read_to_string(self.conf.join(name)).unwrap()).unwrap()
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/24"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn installs_once_and_keeps_a_backup() {
        let dirs = Dirs::new();
        fs::write(dirs.conf.join("10-bridge.conflist"), BRIDGE).unwrap();
        fs::write(dirs.conf.join("99-other.conflist"), "not even json").unwrap();
        fs::write(dirs.conf.join("README"), "ignored").unwrap();
        let first = install(&dirs.options()).unwrap();
        assert!(first.binary_written && first.config_written);
        assert_eq!(first.config, dirs.conf.join("10-bridge.conflist"));
        let backup = dirs.conf.join("10-bridge.conflist.palisade-backup");
        assert_eq!(first.backup.as_deref(), Some(backup.as_path()));
        assert_eq!(fs::read_to_string(&backup).unwrap(), BRIDGE);
        let plugins = dirs.read("10-bridge.conflist")["plugins"].clone();
        let types: Vec<&str> = plugins
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "palisade-cni"]);
        let binary = dirs.bin.join("palisade-cni");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
            0o755
        );

        let second = install(&dirs.options()).unwrap();
        assert!(!second.binary_written && !second.config_written && second.backup.is_none());
        // The backup still holds the original, not the chained version.
        assert_eq!(fs::read_to_string(&backup).unwrap(), BRIDGE);
        // No temporary files left behind.
        let names: Vec<String> = fs::read_dir(&dirs.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.contains("palisade-tmp")),
            "{names:?}"
        );
    }

    #[test]
    fn a_rewritten_config_is_chained_again() {
        let dirs = Dirs::new();
        let path = dirs.conf.join("10-bridge.conflist");
        fs::write(&path, BRIDGE).unwrap();
        install(&dirs.options()).unwrap();
        // The cluster's network plugin rewrites its file, without Palisade.
        fs::write(&path, BRIDGE.replace("cni0", "cni1")).unwrap();
        let again = install(&dirs.options()).unwrap();
        assert!(again.config_written);
        assert!(
            fs::read_to_string(dirs.conf.join("10-bridge.conflist.palisade-backup"))
                .unwrap()
                .contains("cni1")
        );
        assert_eq!(
            dirs.read("10-bridge.conflist")["plugins"][2]["type"],
            "palisade-cni"
        );
    }

    #[test]
    fn a_conf_becomes_a_conflist() {
        let dirs = Dirs::new();
        let conf = r#"{"cniVersion":"0.4.0","name":"n","type":"ptp","ipam":{"type":"host-local"}}"#;
        fs::write(dirs.conf.join("10-ptp.conf"), conf).unwrap();
        let report = install(&dirs.options()).unwrap();
        assert_eq!(report.config, dirs.conf.join("10-ptp.conflist"));
        assert_eq!(report.replaced, Some(dirs.conf.join("10-ptp.conf")));
        assert!(!dirs.conf.join("10-ptp.conf").exists());
        assert_eq!(
            fs::read_to_string(dirs.conf.join("10-ptp.conf.palisade-backup")).unwrap(),
            conf
        );
        assert_eq!(
            dirs.read("10-ptp.conflist")["plugins"][1]["type"],
            "palisade-cni"
        );
        assert!(!install(&dirs.options()).unwrap().config_written);
    }

    #[test]
    fn errors_stop_the_install() {
        let dirs = Dirs::new();
        let e = install(&dirs.options()).unwrap_err();
        assert!(matches!(e, InstallError::NoConfig(_)), "{e}");
        fs::write(
            dirs.conf.join("10-x.conflist"),
            r#"{"cniVersion":"1.0.0","plugins":[]}"#,
        )
        .unwrap();
        let e = install(&dirs.options()).unwrap_err().to_string();
        assert!(
            e.contains("10-x.conflist") && e.contains("no plugins"),
            "{e}"
        );
        fs::write(dirs.conf.join("05-broken.conf"), "{").unwrap();
        let e = install(&dirs.options()).unwrap_err().to_string();
        assert!(
            e.contains("05-broken.conf") && e.contains("not JSON"),
            "{e}"
        );
        // Nothing was changed.
        assert_eq!(
            fs::read_to_string(dirs.conf.join("05-broken.conf")).unwrap(),
            "{"
        );
        assert!(!dirs.conf.join("05-broken.conf.palisade-backup").exists());
    }
}
