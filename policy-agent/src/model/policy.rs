//! A validated NetworkPolicy (`networking.k8s.io/v1`) and its parts.
//!
//! The types mirror the API but hold only what passed validation, with the
//! API's defaults applied: `policyTypes` is resolved into two booleans, an
//! absent protocol is TCP, CIDRs are parsed and masked. "Empty" lists that
//! mean "everything" in the API are explicit ([`Peers::All`], [`Ports::All`]),
//! so that a list emptied by dropping invalid entries allows nothing.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};
use policy_common::{Direction, proto};

use super::error::ConvertError;
use super::objects::{ObjectRef, Pod};
use super::selector::LabelSelector;

/// A transport protocol a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP, the default.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Every protocol, in IP protocol number order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number, as used in policy map keys.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
        }
    }

    /// The API's spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the API's spelling (case-sensitive, as the API server checks it).
    pub fn parse(value: &str) -> Result<Self, ConvertError> {
        match value {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(ConvertError::UnknownProtocol(other.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `port` of a NetworkPolicy port: a number or a container port name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortRef {
    /// A port number, 1..=65535.
    Number(u16),
    /// A container port name, resolved on each destination pod.
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyPort {
    /// The protocol (TCP when the API object omits it).
    pub protocol: Protocol,
    /// The port; `None` means every port of `protocol`.
    pub port: Option<PortRef>,
    /// The last port of a range starting at a numeric `port`.
    pub end_port: Option<u16>,
}

impl PolicyPort {
    /// Checks the API's rules: a valid port number or name, `endPort` only
    /// with a numeric `port` and not below it.
    pub fn new(
        protocol: Protocol,
        port: Option<PortRef>,
        end_port: Option<i64>,
    ) -> Result<Self, ConvertError> {
        match &port {
            Some(PortRef::Number(0)) => return Err(ConvertError::InvalidPortNumber(0)),
            Some(PortRef::Named(name)) => validate_port_name(name)?,
            _ => {}
        }
        let end_port = match (end_port, &port) {
            (None, _) => None,
            (Some(end), None) => return Err(ConvertError::EndPortWithoutPort(end)),
            (Some(end), Some(PortRef::Named(name))) => {
                return Err(ConvertError::EndPortWithNamedPort {
                    name: name.clone(),
                    end_port: end,
                });
            }
            (Some(end), Some(PortRef::Number(first))) => {
                let end16 = port_number(end)?;
                if end16 < *first {
                    return Err(ConvertError::EndPortBeforePort {
                        port: *first,
                        end_port: end,
                    });
                }
                Some(end16)
            }
        };
        Ok(Self {
            protocol,
            port,
            end_port,
        })
    }

    /// Every port of `protocol`.
    pub fn any(protocol: Protocol) -> Self {
        Self {
            protocol,
            port: None,
            end_port: None,
        }
    }

    /// One numeric port.
    pub fn number(protocol: Protocol, port: u16) -> Self {
        Self {
            protocol,
            port: Some(PortRef::Number(port)),
            end_port: None,
        }
    }
}

/// Checks a numeric port: 1..=65535.
pub fn port_number(value: i64) -> Result<u16, ConvertError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ConvertError::InvalidPortNumber(value)),
    }
}

/// Checks a port name as the API server does (`IsValidPortName`): 1 to 15
/// characters of `a-z`, `0-9` and `-`, at least one letter, no `-` at either
/// end and no `--`.
pub fn validate_port_name(name: &str) -> Result<(), ConvertError> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 15
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if valid {
        Ok(())
    } else {
        Err(ConvertError::InvalidPortName(name.to_owned()))
    }
}

/// The region of IPv6 that IPv4-mapped addresses occupy, where the datapath
/// stores IPv4: IPv6 blocks may not overlap it from inside.
fn v4_mapped_region() -> IpNet {
    IpNet::V6(Ipv6Net::new_assert(
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
        96,
    ))
}

/// Parses a CIDR: returns it with host bits cleared, and whether any were set.
pub fn parse_cidr(value: &str) -> Result<(IpNet, bool), ConvertError> {
    let net: IpNet =
        value
            .parse()
            .map_err(|e: ipnet::AddrParseError| ConvertError::InvalidCidr {
                value: value.to_owned(),
                reason: e.to_string(),
            })?;
    let masked = net.trunc();
    if v4_mapped_region().contains(&masked) {
        return Err(ConvertError::Ipv4MappedCidr(value.to_owned()));
    }
    Ok((masked, masked != net))
}

/// An `ipBlock` peer: the addresses in `cidr` but in none of `except`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpBlock {
    cidr: IpNet,
    except: Vec<IpNet>,
}

impl IpBlock {
    /// A block; every `except` must be a strict subset of `cidr` (same family,
    /// inside, longer prefix), as the API server requires. Host bits are
    /// cleared.
    pub fn new(cidr: IpNet, except: Vec<IpNet>) -> Result<Self, ConvertError> {
        let cidr = cidr.trunc();
        let except: Vec<IpNet> = except.into_iter().map(|e| e.trunc()).collect();
        for e in &except {
            if !cidr.contains(e) || e.prefix_len() <= cidr.prefix_len() {
                return Err(ConvertError::ExceptNotInCidr {
                    except: e.to_string(),
                    cidr: cidr.to_string(),
                });
            }
        }
        Ok(Self { cidr, except })
    }

    /// The block's prefix.
    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// The prefixes cut out of it.
    pub fn except(&self) -> &[IpNet] {
        &self.except
    }

    /// Whether `addr` is in the block: in `cidr` and in no `except`. An
    /// address of the other family is never in it.
    pub fn contains(&self, addr: &IpAddr) -> bool {
        self.cidr.contains(addr) && !self.except.iter().any(|e| e.contains(addr))
    }
}

/// One entry of a rule's `from`/`to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods in the policy's own namespace matching the selector.
    PodSelector(LabelSelector),
    /// All pods in namespaces matching the selector.
    NamespaceSelector(LabelSelector),
    /// Pods matching `pod` in namespaces matching `namespace` (both must hold).
    PodAndNamespaceSelector {
        /// Selects pods.
        pod: LabelSelector,
        /// Selects their namespaces.
        namespace: LabelSelector,
    },
    /// Addresses in a CIDR block.
    IpBlock(IpBlock),
}

/// A rule's peers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peers {
    /// `from`/`to` absent or empty: every source/destination.
    All,
    /// Any of these (possibly none, when every entry was invalid).
    Only(Vec<Peer>),
}

/// A rule's ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ports {
    /// `ports` absent or empty: every port of every protocol.
    All,
    /// Any of these (possibly none, when every entry was invalid).
    Only(Vec<PolicyPort>),
}

/// One ingress or egress rule: traffic with any of `peers` on any of `ports`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Who the traffic comes from (ingress) or goes to (egress).
    pub peers: Peers,
    /// Which destination ports and protocols.
    pub ports: Ports,
}

impl Rule {
    /// The rule `{}`: allows everything.
    pub fn allow_all() -> Self {
        Self {
            peers: Peers::All,
            ports: Ports::All,
        }
    }
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The policy's namespace: it selects pods of this namespace only.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// Which pods of the namespace it applies to.
    pub pod_selector: LabelSelector,
    /// Whether selected pods are isolated for ingress (`Ingress` in the
    /// resolved `policyTypes`).
    pub isolates_ingress: bool,
    /// Whether selected pods are isolated for egress (`Egress` in the resolved
    /// `policyTypes`).
    pub isolates_egress: bool,
    /// Ingress rules, by their index in the object (empty when not isolating
    /// ingress).
    pub ingress: Vec<Rule>,
    /// Egress rules, by their index in the object (empty when not isolating
    /// egress).
    pub egress: Vec<Rule>,
}

impl Policy {
    /// This policy's coordinates.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Whether it isolates selected pods in `direction`.
    pub fn isolates(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.isolates_ingress,
            Direction::Egress => self.isolates_egress,
        }
    }

    /// The rules of `direction`.
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Whether it applies to `pod`: same namespace and the selector matches.
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace && self.pod_selector.matches(&pod.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_iana_svc_name() {
        for ok in ["http", "h2c", "dns-tcp", "a", "abcdefghijklmno"] {
            assert!(validate_port_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "80",
            "HTTP",
            "-http",
            "http-",
            "dns--tcp",
            "abcdefghijklmnop",
            "h_t",
        ] {
            assert!(validate_port_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_are_masked_and_mapped_v6_rejected() {
        let (net, host_bits) = parse_cidr("10.1.2.3/16").expect("valid");
        assert_eq!(net.to_string(), "10.1.0.0/16");
        assert!(host_bits);
        assert!(!parse_cidr("10.1.0.0/16").expect("valid").1);
        assert!(matches!(
            parse_cidr("10.0.0.0"),
            Err(ConvertError::InvalidCidr { .. })
        ));
        assert!(matches!(
            parse_cidr("10.0.0.0/33"),
            Err(ConvertError::InvalidCidr { .. })
        ));
        assert!(matches!(
            parse_cidr("::ffff:10.0.0.0/104"),
            Err(ConvertError::Ipv4MappedCidr(_))
        ));
        assert!(parse_cidr("::/0").is_ok());
    }

    #[test]
    fn except_must_be_strict_subset() {
        let net = |s: &str| s.parse::<IpNet>().expect("valid");
        assert!(IpBlock::new(net("10.0.0.0/8"), vec![net("10.1.0.0/16")]).is_ok());
        for bad in ["10.0.0.0/8", "11.0.0.0/16", "0.0.0.0/0", "fd00::/64"] {
            assert!(
                matches!(
                    IpBlock::new(net("10.0.0.0/8"), vec![net(bad)]),
                    Err(ConvertError::ExceptNotInCidr { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn end_port_rules() {
        let num = |p| Some(PortRef::Number(p));
        assert!(PolicyPort::new(Protocol::Tcp, num(80), Some(90)).is_ok());
        assert!(PolicyPort::new(Protocol::Tcp, num(80), Some(80)).is_ok());
        assert!(matches!(
            PolicyPort::new(Protocol::Tcp, num(80), Some(79)),
            Err(ConvertError::EndPortBeforePort { .. })
        ));
        assert!(matches!(
            PolicyPort::new(Protocol::Tcp, None, Some(79)),
            Err(ConvertError::EndPortWithoutPort(_))
        ));
        assert!(matches!(
            PolicyPort::new(Protocol::Tcp, Some(PortRef::Named("http".into())), Some(90)),
            Err(ConvertError::EndPortWithNamedPort { .. })
        ));
        assert!(matches!(
            PolicyPort::new(Protocol::Tcp, num(80), Some(70000)),
            Err(ConvertError::InvalidPortNumber(70000))
        ));
    }
}
