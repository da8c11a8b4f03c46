//! A connection to explain, from text: the API's `ExplainRequest` and the
//! `policy-agent explain` command line parse it the same way.

use std::net::IpAddr;
use std::str::FromStr;

use thiserror::Error;

use super::{Party, Query};
use crate::model::{ObjectRef, Protocol};

/// Why a connection to explain does not parse.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("{field} {value:?} is not a pod (\"namespace/name\"), \"node\" or an IP address")]
    Party { field: &'static str, value: String },
    #[error("protocol {0:?} is not TCP, UDP or SCTP")]
    Protocol(String),
    #[error("port {0} is outside 1-65535")]
    Port(u32),
}

/// Why a party does not parse.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("not a pod (\"namespace/name\"), \"node\" or an IP address")]
pub struct PartyError;

impl FromStr for Party {
    type Err = PartyError;

    /// `namespace/name` (a pod), `node` (the pod's node), or an IP address.
    fn from_str(text: &str) -> Result<Self, PartyError> {
        if text == "node" {
            return Ok(Party::Node);
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Party::Address(ip));
        }
        let (namespace, name) = text.split_once('/').ok_or(PartyError)?;
        // A namespace is a DNS label (so "10.0.0.0/8" is not a pod); the
        // name is only checked for what cannot be in any object name.
        let label = |s: &str| {
            (1..=63).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && !s.contains('/')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        };
        if label(namespace) && name_ok(name) {
            Ok(Party::Pod(ObjectRef::new(namespace, name)))
        } else {
            Err(PartyError)
        }
    }
}

/// A protocol as a person types it: TCP, UDP or SCTP in any case; empty
/// means TCP.
pub fn parse_protocol(text: &str) -> Result<Protocol, QueryError> {
    if text.is_empty() {
        return Ok(Protocol::Tcp);
    }
    Protocol::parse(&text.to_ascii_uppercase()).map_err(|_| QueryError::Protocol(text.to_owned()))
}

/// The connection `from` → `to` on `port`/`protocol`.
pub fn parse_query(from: &str, to: &str, protocol: &str, port: u32) -> Result<Query, QueryError> {
    let party = |field: &'static str, value: &str| {
        value
            .trim()
            .parse::<Party>()
            .map_err(|_| QueryError::Party {
                field,
                value: value.to_owned(),
            })
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(QueryError::Port(port))?;
    Ok(Query {
        from: party("from", from)?,
        to: party("to", to)?,
        protocol: parse_protocol(protocol.trim())?,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parties() {
        assert_eq!("node".parse(), Ok(Party::Node));
        assert_eq!(
            "shop/front-end".parse(),
            Ok(Party::Pod(ObjectRef::new("shop", "front-end")))
        );
        assert_eq!(
            "10.0.0.5".parse(),
            Ok(Party::Address("10.0.0.5".parse().unwrap()))
        );
        assert_eq!(
            "fd00::5".parse(),
            Ok(Party::Address("fd00::5".parse().unwrap()))
        );
        for bad in [
            "",
            "web",
            "/web",
            "shop/",
            "a/b/c",
            "10.0.0.0/8",
            "shop/fr ont",
            "Node",
            "10.0.0.256",
            "Shop/web",
            "-a/web",
        ] {
            assert_eq!(bad.parse::<Party>(), Err(PartyError), "{bad:?}");
        }
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_protocol(""), Ok(Protocol::Tcp));
        assert_eq!(parse_protocol("udp"), Ok(Protocol::Udp));
        assert_eq!(parse_protocol("SCTP"), Ok(Protocol::Sctp));
        assert_eq!(
            parse_protocol("ICMP"),
            Err(QueryError::Protocol("ICMP".into()))
        );
    }

    #[test]
    fn queries() {
        let q = parse_query("a/b", " node ", "", 80).unwrap();
        assert_eq!(q.from, Party::Pod(ObjectRef::new("a", "b")));
        assert_eq!((q.to, q.protocol, q.port), (Party::Node, Protocol::Tcp, 80));
        assert_eq!(parse_query("a/b", "node", "", 0), Err(QueryError::Port(0)));
        assert_eq!(
            parse_query("a/b", "node", "", 65_536),
            Err(QueryError::Port(65_536))
        );
        let err = parse_query("a/b", "web", "TCP", 80).unwrap_err();
        assert_eq!(
            err.to_string(),
            "to \"web\" is not a pod (\"namespace/name\"), \"node\" or an IP address"
        );
        assert!(matches!(
            parse_query("x", "a/b", "TCP", 80),
            Err(QueryError::Party { field: "from", .. })
        ));
        assert!(matches!(
            parse_query("a/b", "a/c", "icmp", 80),
            Err(QueryError::Protocol(_))
        ));
    }
}
