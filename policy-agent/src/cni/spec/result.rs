//! The ADD result (spec section 5), as far as a chained plugin reads it
//! from `prevResult`: the interfaces and the addresses on them. Routes and
//! DNS are not read (ADD passes the whole `prevResult` on as JSON).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The previous plugin's result.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct PrevResult {
    /// Every interface the attachment created, host side included.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// The addresses the attachment assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

/// An interface of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The container's netns path for an interface inside it; absent or
    /// empty for a host interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

impl Interface {
    /// Whether the interface lives on the host (no sandbox).
    pub fn on_host(&self) -> bool {
        self.sandbox.as_deref().is_none_or(str::is_empty)
    }
}

/// An address of a result.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct IpConfig {
    /// Address and prefix length, e.g. `10.22.0.5/24`.
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` of the interface that has the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the reference `bridge` plugin (1.1.1) returns.
    const BRIDGE: &str = r#"{
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "ee:85:4d:1c:57:a0"},
            {"name": "vethf50d36f7", "mac": "9e:cd:e4:1e:ca:3d"},
            {"name": "eth0", "mac": "82:8a:4d:d6:56:d8", "sandbox": "/run/netns/p"}
        ],
        "ips": [{"interface": 2, "address": "10.99.0.7/24", "gateway": "10.99.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    }"#;

    #[test]
    fn reads_a_bridge_result() {
        let r: PrevResult = serde_json::from_str(BRIDGE).unwrap();
        assert_eq!(r.interfaces.len(), 3);
        assert!(r.interfaces[0].on_host() && r.interfaces[1].on_host());
        assert!(!r.interfaces[2].on_host());
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(r.ips[0].address.addr().to_string(), "10.99.0.7");
        assert_eq!(r.ips[0].gateway, Some("10.99.0.1".parse().unwrap()));
    }

    #[test]
    fn older_results_and_empty_sandboxes() {
        // 0.4.0 results carry "version"; an empty sandbox means the host.
        let r: PrevResult = serde_json::from_str(
            r#"{"interfaces":[{"name":"veth1","sandbox":""}],
                "ips":[{"version":"6","address":"fd00::5/64"}]}"#,
        )
        .unwrap();
        assert!(r.interfaces[0].on_host());
        assert_eq!(r.ips[0].interface, None);
    }

    #[test]
    fn rejects_a_bad_address() {
        let bad = r#"{"ips":[{"address":"10.0.0.300/24"}]}"#;
        assert!(serde_json::from_str::<PrevResult>(bad).is_err());
    }
}
