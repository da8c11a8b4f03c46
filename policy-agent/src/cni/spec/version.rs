//! Spec versions: which ones the plugin speaks and what each allows.

use std::fmt;

/// Every spec version the plugin accepts, oldest first. 0.1.0 and 0.2.0
/// have no chaining (`prevResult`), so a chained plugin cannot serve them.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A spec version, `major.minor.patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// CHECK appeared in 0.4.0.
    pub const V0_4_0: Version = Version::new(0, 4, 0);
    /// STATUS and GC appeared in 1.1.0.
    pub const V1_1_0: Version = Version::new(1, 1, 0);
    /// The newest version the plugin speaks.
    pub const LATEST: Version = Version::V1_1_0;

    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `"x.y.z"`; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.').map(|p| {
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u32>().ok())
                .flatten()
        });
        let version = Self::new(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(version)
    }

    /// Whether the plugin speaks this version.
    pub fn is_supported(self) -> bool {
        SUPPORTED_VERSIONS
            .iter()
            .any(|v| Self::parse(v) == Some(self))
    }

    /// Whether this version has the CHECK command.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// Whether this version has the STATUS and GC commands.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        assert_eq!(Version::parse("1.0.0"), Some(Version::new(1, 0, 0)));
        assert_eq!(Version::parse("0.3.1"), Some(Version::new(0, 3, 1)));
        for bad in [
            "", "1", "1.0", "1.0.0.0", "v1.0.0", "1.x.0", "1..0", "-1.0.0", "1.0.0 ",
        ] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
        assert!(Version::parse("0.4.0").unwrap() < Version::parse("1.0.0").unwrap());
        assert!(Version::parse("0.10.0").unwrap() > Version::parse("0.4.0").unwrap());
    }

    #[test]
    fn what_each_version_allows() {
        for v in SUPPORTED_VERSIONS {
            assert!(Version::parse(v).unwrap().is_supported(), "{v}");
        }
        for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0"] {
            assert!(!Version::parse(v).unwrap().is_supported(), "{v}");
        }
        assert!(!Version::parse("0.3.1").unwrap().has_check());
        assert!(Version::parse("0.4.0").unwrap().has_check());
        assert!(!Version::parse("1.0.0").unwrap().has_status_and_gc());
        assert!(Version::parse("1.1.0").unwrap().has_status_and_gc());
        assert_eq!(Version::LATEST.to_string(), "1.1.0");
    }
}
