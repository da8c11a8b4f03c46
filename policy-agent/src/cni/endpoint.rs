//! Which interfaces of `prevResult` are the pod's: its interface inside the
//! container (CNI_IFNAME, with a sandbox), the host side of its veth (the
//! host interface whose index is the pod interface's veth peer: for
//! `bridge` that rules out the bridge itself, for `ptp` it is the only
//! host interface), and the pod's addresses.

use std::net::IpAddr;

use super::link::PodLink;
use super::spec::PrevResult;

/// The pod's endpoint as `prevResult` and the kernel agree on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The host side of the pod's veth.
    pub host_interface: String,
    /// Its index in the host namespace.
    pub host_ifindex: u32,
    /// The pod's addresses (without prefix length).
    pub ips: Vec<IpAddr>,
}

/// Why `prevResult` does not describe a veth-attached pod.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LocateError {
    #[error(
        "prevResult has no interface {ifname} inside the container (its interfaces: {found}); \
         palisade-cni must come after the plugin that creates {ifname}"
    )]
    NoPodInterface { ifname: String, found: String },
    #[error(
        "none of prevResult's host interfaces ({candidates}) is the veth peer of {ifname} \
         (peer ifindex {peer_ifindex}); is palisade-cni run in the host's network namespace?"
    )]
    NoHostPeer {
        ifname: String,
        peer_ifindex: u32,
        candidates: String,
    },
}

/// Finds the pod's interfaces in `result`: `ifname` inside the container
/// and, among the host interfaces, the one whose index (`host_ifindex`,
/// looked up in the host namespace) is `pod.peer_ifindex`.
pub fn locate(
    result: &PrevResult,
    ifname: &str,
    pod: PodLink,
    host_ifindex: impl Fn(&str) -> Option<u32>,
) -> Result<Located, LocateError> {
    let pod_index = result
        .interfaces
        .iter()
        .position(|i| i.name == ifname && !i.on_host())
        .ok_or_else(|| LocateError::NoPodInterface {
            ifname: ifname.to_owned(),
            found: describe(result.interfaces.iter().map(|i| match &i.sandbox {
                Some(s) if !s.is_empty() => format!("{} in {s}", i.name),
                _ => format!("{} on the host", i.name),
            })),
        })?;
    let hosts: Vec<(&str, Option<u32>)> = result
        .interfaces
        .iter()
        .filter(|i| i.on_host())
        .map(|i| (i.name.as_str(), host_ifindex(&i.name)))
        .collect();
    let (host_interface, host_index) = hosts
        .iter()
        .find(|(_, index)| *index == Some(pod.peer_ifindex))
        .map(|(name, index)| ((*name).to_owned(), index.unwrap_or_default()))
        .ok_or_else(|| LocateError::NoHostPeer {
            ifname: ifname.to_owned(),
            peer_ifindex: pod.peer_ifindex,
            candidates: describe(hosts.iter().map(|(name, index)| match index {
                Some(i) => format!("{name} ifindex {i}"),
                None => format!("{name} not found"),
            })),
        })?;
    Ok(Located {
        host_interface,
        host_ifindex: host_index,
        ips: pod_ips(result, pod_index),
    })
}

/// The addresses of interface `pod_index`; when no address names its
/// interface (older results), all of them.
fn pod_ips(result: &PrevResult, pod_index: usize) -> Vec<IpAddr> {
    let any_named = result.ips.iter().any(|ip| ip.interface.is_some());
    let mut ips: Vec<IpAddr> = result
        .ips
        .iter()
        .filter(|ip| !any_named || ip.interface == Some(pod_index))
        .map(|ip| ip.address.addr())
        .collect();
    ips.dedup();
    ips
}

fn describe(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(json: &str) -> PrevResult {
        serde_json::from_str(json).unwrap()
    }

    const BRIDGE: &str = r#"{"interfaces":[
            {"name":"cni0"},{"name":"veth1a"},{"name":"eth0","sandbox":"/run/netns/p"}],
        "ips":[{"interface":2,"address":"10.1.0.5/24"},{"interface":0,"address":"10.1.0.1/24"},
               {"interface":2,"address":"fd00::5/64"}]}"#;
    const PTP: &str = r#"{"interfaces":[{"name":"veth9"},{"name":"eth0","sandbox":"/run/netns/p"}],
        "ips":[{"interface":1,"address":"10.2.0.7/24","gateway":"10.2.0.1"}]}"#;

    fn host(name: &str) -> Option<u32> {
        match name {
            "cni0" => Some(3),
            "veth1a" => Some(7),
            "veth9" => Some(12),
            _ => None,
        }
    }

    #[test]
    fn bridge_picks_the_veth_not_the_bridge() {
        let pod = PodLink {
            ifindex: 2,
            peer_ifindex: 7,
        };
        let found = locate(&result(BRIDGE), "eth0", pod, host).unwrap();
        assert_eq!(found.host_interface, "veth1a");
        assert_eq!(found.host_ifindex, 7);
        assert_eq!(
            found.ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn ptp_has_one_host_interface() {
        let pod = PodLink {
            ifindex: 2,
            peer_ifindex: 12,
        };
        let found = locate(&result(PTP), "eth0", pod, host).unwrap();
        assert_eq!(found.host_interface, "veth9");
        assert_eq!(found.ips, vec!["10.2.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn errors_name_what_was_found() {
        let pod = PodLink {
            ifindex: 2,
            peer_ifindex: 99,
        };
        let e = locate(&result(BRIDGE), "eth0", pod, host).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("cni0 ifindex 3, veth1a ifindex 7"), "{text}");
        let e = locate(&result(BRIDGE), "net1", pod, host).unwrap_err();
        assert!(matches!(e, LocateError::NoPodInterface { .. }));
        assert!(e.to_string().contains("eth0 in /run/netns/p"), "{e}");
        let e = locate(&result("{}"), "eth0", pod, host).unwrap_err();
        assert!(e.to_string().contains("(its interfaces: none)"), "{e}");
    }

    #[test]
    fn unnamed_addresses_all_belong_to_the_pod() {
        let r = result(
            r#"{"interfaces":[{"name":"v"},{"name":"eth0","sandbox":"/x"}],
                "ips":[{"address":"10.3.0.2/24"}]}"#,
        );
        let pod = PodLink {
            ifindex: 2,
            peer_ifindex: 4,
        };
        let found = locate(&r, "eth0", pod, |_| Some(4)).unwrap();
        assert_eq!(found.ips, vec!["10.3.0.2".parse::<IpAddr>().unwrap()]);
    }
}
