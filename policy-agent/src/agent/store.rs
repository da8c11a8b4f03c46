//! The state directory (`--state-dir`, default `/var/lib/palisade`): what
//! must survive a restart of the agent besides the pinned maps.
//!
//! * `identities.json`: the identity allocator's assignments, so a restarted
//!   agent gives every label set and prefix the number the maps already use;
//! * `endpoints.json`: the endpoint registry (container id → endpoint id,
//!   interface, pod), so endpoints keep their ids and their pinned links are
//!   adopted;
//! * `agent.lock`: held (flock) while an agent runs, so two agents never
//!   share one state directory.
//!
//! Files are written atomically: a temporary file in the same directory,
//! fsync'd, renamed over the old one, then the directory fsync'd.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::endpoints::EndpointRecord;
use crate::compile::{IdentityAllocator, IdentityKey};

/// Version of the files' format.
const FORMAT_VERSION: u32 = 1;
const IDENTITIES: &str = "identities.json";
const ENDPOINTS: &str = "endpoints.json";
const LOCK: &str = "agent.lock";

/// A failure reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: format version {found}, this agent reads {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("another agent holds {0} (one agent per state directory)")]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct IdentitiesFile {
    version: u32,
    identities: Vec<IdentityEntry>,
}

#[derive(Serialize, Deserialize)]
struct IdentityEntry {
    id: u32,
    key: IdentityKey,
}

/// [`IdentitiesFile`] as written: borrowed, nothing cloned.
#[derive(Serialize)]
struct IdentitiesOut<'a> {
    version: u32,
    identities: Vec<IdentityEntryOut<'a>>,
}

#[derive(Serialize)]
struct IdentityEntryOut<'a> {
    id: u32,
    key: &'a IdentityKey,
}

#[derive(Serialize, Deserialize)]
struct EndpointsFile {
    version: u32,
    endpoints: Vec<EndpointRecord>,
}

/// The state directory, locked for this agent.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    _lock: File,
}

impl StateStore {
    /// Creates the directory (mode 0700) if needed and takes its lock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.kind() == ErrorKind::WouldBlock {
                StoreError::Locked(lock_path)
            } else {
                StoreError::Io {
                    path: lock_path,
                    source: err,
                }
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved identity assignments; none if never saved.
    pub fn load_identities(&self) -> Result<Vec<(u32, IdentityKey)>, StoreError> {
        let Some(file) = self.read::<IdentitiesFile>(IDENTITIES)? else {
            return Ok(Vec::new());
        };
        self.check_version(IDENTITIES, file.version)?;
        Ok(file.identities.into_iter().map(|e| (e.id, e.key)).collect())
    }

    /// Saves the allocator's assignments.
    pub fn save_identities(&self, ids: &IdentityAllocator) -> Result<(), StoreError> {
        let file = IdentitiesOut {
            version: FORMAT_VERSION,
            identities: ids
                .assignments()
                .map(|(id, key)| IdentityEntryOut { id, key })
                .collect(),
        };
        self.write(IDENTITIES, &file)
    }

    /// The saved endpoint registry; empty if never saved.
    pub fn load_endpoints(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        let Some(file) = self.read::<EndpointsFile>(ENDPOINTS)? else {
            return Ok(Vec::new());
        };
        self.check_version(ENDPOINTS, file.version)?;
        Ok(file.endpoints)
    }

    /// Saves the endpoint registry.
    pub fn save_endpoints<'a>(
        &self,
        records: impl IntoIterator<Item = &'a EndpointRecord>,
    ) -> Result<(), StoreError> {
        let file = EndpointsFile {
            version: FORMAT_VERSION,
            endpoints: records.into_iter().cloned().collect(),
        };
        self.write(ENDPOINTS, &file)
    }

    fn check_version(&self, name: &str, found: u32) -> Result<(), StoreError> {
        if found == FORMAT_VERSION {
            Ok(())
        } else {
            Err(StoreError::Version {
                path: self.dir.join(name),
                found,
            })
        }
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.dir.join(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Format { path, source })
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Format {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes)
    }
}

/// Writes `bytes` to `path` so that a reader (or a crash) sees either the old
/// contents or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "palisade-store-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn identities_and_endpoints_round_trip() {
        let dir = temp_dir("rt");
        let store = StateStore::open(&dir).unwrap();
        assert!(store.load_identities().unwrap().is_empty());
        assert!(store.load_endpoints().unwrap().is_empty());

        let key = IdentityKey::Labels {
            namespace: Labels::from([("kubernetes.io/metadata.name".into(), "a".into())]),
            pod: Labels::from([("app".into(), "web".into())]),
            named_ports: Vec::new(),
        };
        let cidr = IdentityKey::Cidr("10.0.0.0/8".parse().unwrap());
        let ids =
            IdentityAllocator::from_assignments([(300, key.clone()), (301, cidr.clone())]).unwrap();
        store.save_identities(&ids).unwrap();
        assert_eq!(
            store.load_identities().unwrap(),
            vec![(300, key), (301, cidr)]
        );

        let record = EndpointRecord {
            container_id: "c1".into(),
            namespace: "a".into(),
            pod_name: "web".into(),
            netns_path: "/run/netns/x".into(),
            host_interface: "veth1".into(),
            ifindex: 7,
            endpoint_id: 1,
            ips: vec!["10.1.0.2".parse().unwrap()],
            sequence: 1,
        };
        store.save_endpoints([&record]).unwrap();
        assert_eq!(store.load_endpoints().unwrap(), vec![record]);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
        drop(store);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_agent_per_directory() {
        let dir = temp_dir("lock");
        let first = StateStore::open(&dir).unwrap();
        assert!(matches!(StateStore::open(&dir), Err(StoreError::Locked(_))));
        drop(first);
        StateStore::open(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error() {
        let dir = temp_dir("corrupt");
        let store = StateStore::open(&dir).unwrap();
        fs::write(dir.join(ENDPOINTS), b"{ not json").unwrap();
        assert!(matches!(
            store.load_endpoints(),
            Err(StoreError::Format { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
