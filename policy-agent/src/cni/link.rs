//! The kernel's view of the pod's interfaces: opening and entering the
//! pod's network namespace, interface indexes, and the peer of a veth
//! (from the veth driver's `peer_ifindex` statistic, read with the
//! SIOCETHTOOL ioctl: no netlink library needed).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

/// Why an interface could not be looked at.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the network namespace {0} does not exist (CNI_NETNS)")]
    NetnsMissing(PathBuf),
    #[error("{0} is not a network namespace (CNI_NETNS)")]
    NotNetns(PathBuf),
    #[error("cannot enter the network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("there is no interface {name} in the network namespace {netns}")]
    NoInterface { name: String, netns: String },
    #[error(
        "{name} is a {driver:?} device, not a veth: Palisade enforces on the host side of \
         a veth pair (chain it after bridge, ptp or another veth-based plugin)"
    )]
    NotVeth { name: String, driver: String },
    #[error("reading {what} of {name}: {source}")]
    Ethtool {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("the veth driver does not report the peer of {0}")]
    NoPeer(String),
}

/// The pod's interface as seen inside its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLink {
    /// Its index in the pod's namespace.
    pub ifindex: u32,
    /// The index of its veth peer, in the peer's (the host's) namespace.
    pub peer_ifindex: u32,
}

/// Opens `path`, which must be a network namespace.
pub fn open_netns(path: &Path) -> Result<File, LinkError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => LinkError::NetnsMissing(path.to_owned()),
        _ => LinkError::Netns {
            path: path.to_owned(),
            source,
        },
    })?;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `stat`, which outlives the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(LinkError::Netns {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // f_type's integer type differs between libcs.
    #[allow(clippy::unnecessary_cast)]
    if stat.f_type as i64 != NSFS_MAGIC {
        return Err(LinkError::NotNetns(path.to_owned()));
    }
    Ok(file)
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Runs `f` on a thread that entered the network namespace `netns` (only
/// that thread changes namespace).
pub fn in_netns<T: Send>(
    netns: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, LinkError> {
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LinkError::Netns {
                    path: path.to_owned(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The index of interface `name` in the calling thread's namespace, or
/// `None` if there is no such interface.
pub fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The pod's interface `ifname` in the namespace at `netns_path`: it must
/// exist and be a veth.
pub fn pod_link(netns_path: &Path, ifname: &str) -> Result<PodLink, LinkError> {
    let netns = open_netns(netns_path)?;
    in_netns(&netns, netns_path, || {
        let ifindex = ifindex(ifname).ok_or_else(|| LinkError::NoInterface {
            name: ifname.to_owned(),
            netns: netns_path.display().to_string(),
        })?;
        let ethtool = Ethtool::open(ifname)?;
        let driver = match ethtool.driver() {
            // Devices without ethtool support (lo, tun, …) are no veth.
            Err(LinkError::Ethtool { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                return Err(LinkError::NotVeth {
                    name: ifname.to_owned(),
                    driver: "(no driver information)".to_owned(),
                });
            }
            other => other?,
        };
        if driver.name != "veth" {
            return Err(LinkError::NotVeth {
                name: ifname.to_owned(),
                driver: driver.name,
            });
        }
        let peer_ifindex = ethtool.stat(driver.n_stats, "peer_ifindex")?;
        let peer_ifindex = u32::try_from(peer_ifindex)
            .ok()
            .filter(|i| *i != 0)
            .ok_or_else(|| LinkError::NoPeer(ifname.to_owned()))?;
        Ok(PodLink {
            ifindex,
            peer_ifindex,
        })
    })?
}

// The SIOCETHTOOL ioctl and the structures of <linux/ethtool.h> it uses.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;

/// `struct ifreq` with the `ifr_data` member; padded beyond the kernel's
/// size on every architecture.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u64; 3],
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// What GDRVINFO says.
struct Driver {
    name: String,
    n_stats: u32,
}

/// Ethtool requests on one interface of the calling thread's namespace.
struct Ethtool {
    socket: OwnedFd,
    name: String,
}

impl Ethtool {
    fn open(name: &str) -> Result<Self, LinkError> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(LinkError::Ethtool {
                name: name.to_owned(),
                what: "a socket",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            socket: unsafe { OwnedFd::from_raw_fd(fd) },
            name: name.to_owned(),
        })
    }

    /// SIOCETHTOOL with `data` (whose first u32 is the ethtool command).
    fn ioctl(&self, what: &'static str, data: *mut libc::c_void) -> Result<(), LinkError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data,
            _pad: [0; 3],
        };
        let bytes = self.name.as_bytes();
        let len = bytes.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&bytes[..len]);
        // SAFETY: `req` and the buffer behind `data` are valid for the
        // kernel's reads and writes of this command and outlive the call.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(LinkError::Ethtool {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn driver(&self) -> Result<Driver, LinkError> {
        // SAFETY: all-zero is a valid DrvInfo.
        let mut info: DrvInfo = unsafe { std::mem::zeroed() };
        info.cmd = ETHTOOL_GDRVINFO;
        self.ioctl("the driver", (&raw mut info).cast())?;
        let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
        Ok(Driver {
            name: String::from_utf8_lossy(&info.driver[..end]).into_owned(),
            n_stats: info.n_stats,
        })
    }

    /// The statistic called `key` among the driver's `n_stats`.
    fn stat(&self, n_stats: u32, key: &str) -> Result<u64, LinkError> {
        let n = n_stats as usize;
        // ethtool_gstrings: cmd, string_set, len, then len names of 32 bytes.
        let mut strings = vec![0u32; 3 + n * ETH_GSTRING_LEN / 4];
        strings[0] = ETHTOOL_GSTRINGS;
        strings[1] = ETH_SS_STATS;
        strings[2] = n_stats;
        self.ioctl("the statistics' names", strings.as_mut_ptr().cast())?;
        let names: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        let index = names
            .chunks(ETH_GSTRING_LEN)
            .position(|raw| raw.split(|b| *b == 0).next() == Some(key.as_bytes()))
            .ok_or_else(|| LinkError::NoPeer(self.name.clone()))?;
        // ethtool_stats: cmd, n_stats, then n_stats u64 values.
        let mut stats = vec![0u64; 1 + n];
        let header = stats.as_mut_ptr().cast::<u32>();
        // SAFETY: the first u64 holds the two u32 header fields.
        unsafe {
            header.write(ETHTOOL_GSTATS);
            header.add(1).write(n_stats);
        }
        self.ioctl("the statistics", stats.as_mut_ptr().cast())?;
        Ok(stats[1 + index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_wrong_netns() {
        assert!(matches!(
            open_netns(Path::new("/nonexistent/netns")),
            Err(LinkError::NetnsMissing(_))
        ));
        assert!(matches!(
            open_netns(Path::new("/proc/self/status")),
            Err(LinkError::NotNetns(_))
        ));
    }

    #[test]
    fn loopback_is_not_a_veth() {
        // Our own namespace: lo exists everywhere, its driver is not veth.
        let netns = Path::new("/proc/self/ns/net");
        assert_eq!(ifindex("lo"), Some(1));
        assert_eq!(ifindex("no-such-if0"), None);
        match pod_link(netns, "lo") {
            Err(LinkError::NotVeth { driver, .. }) => assert_ne!(driver, "veth"),
            // Without privileges entering even our own namespace fails.
            Err(LinkError::Netns { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pod_link(netns, "no-such-if0"),
            Err(LinkError::NoInterface { .. } | LinkError::Netns { .. })
        ));
    }
}
