//! What Kubernetes (and the runner) accepts as names, labels, ports and
//! addresses.

use std::net::IpAddr;

use super::error::Problem;
use super::scenario::{Labels, Server};

/// The label Kubernetes puts on every namespace.
pub const METADATA_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Whether a pod, host or service can have `ip`.
pub fn usable_ip(ip: IpAddr) -> Result<(), Problem> {
    let reason = match ip {
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_loopback() => Some("loopback"),
        _ if ip.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("link-local (the runner's gateways live there)")
        }
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some("IPv4-mapped: write it as IPv4"),
        _ => None,
    };
    reason.map_or(Ok(()), |reason| Err(Problem::UnusableIp { ip, reason }))
}

/// Whether `server` can join `servers`: not port 0, not a port and protocol
/// listed twice, a valid port name used once.
pub fn check_server(servers: &[Server], server: &Server) -> Result<(), Problem> {
    if server.port == 0 {
        return Err(Problem::PortZero);
    }
    if servers
        .iter()
        .any(|s| s.port == server.port && s.protocol == server.protocol)
    {
        return Err(Problem::DuplicatePort {
            port: server.port,
            protocol: server.protocol,
        });
    }
    if let Some(name) = &server.name {
        port_name(name).map_err(|rule| Problem::InvalidName {
            what: "port name",
            name: name.clone(),
            rule,
        })?;
        if servers.iter().any(|s| s.name.as_ref() == Some(name)) {
            return Err(Problem::Duplicate {
                what: "port name",
                name: name.clone(),
            });
        }
    }
    Ok(())
}

/// A namespace's labels with `kubernetes.io/metadata.name` added.
pub fn namespace_labels(name: &str, labels: &Labels) -> Result<Labels, Problem> {
    check_labels(labels)?;
    if let Some(value) = labels.get(METADATA_NAME_LABEL)
        && value != name
    {
        return Err(Problem::MetadataNameLabel {
            namespace: name.into(),
            value: value.clone(),
        });
    }
    let mut labels = labels.clone();
    labels.insert(METADATA_NAME_LABEL.into(), name.into());
    Ok(labels)
}

/// Whether Kubernetes would accept these labels.
pub fn check_labels(labels: &Labels) -> Result<(), Problem> {
    for (key, value) in labels {
        let bad = |reason| Problem::InvalidLabel {
            key: key.clone(),
            value: value.clone(),
            reason,
        };
        let (prefix, name) = match key.rsplit_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        if let Some(prefix) = prefix
            && dns_subdomain(prefix).is_err()
        {
            return Err(bad("the key's prefix is not a DNS subdomain"));
        }
        if !label_value(name) || name.is_empty() {
            return Err(bad(
                "the key's name must be 1-63 of [A-Za-z0-9._-], alphanumeric at both ends",
            ));
        }
        if !label_value(value) {
            return Err(bad(
                "a value must be at most 63 of [A-Za-z0-9._-], alphanumeric at both ends",
            ));
        }
    }
    Ok(())
}

fn label_value(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.is_empty()
        || (s.len() <= 63
            && alnum(s.chars().next())
            && alnum(s.chars().last())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn dns_label(s: &str) -> Result<(), &'static str> {
    const RULE: &str = "must be 1-63 of [a-z0-9-], starting and ending alphanumeric";
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = s.len() <= 63
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok { Ok(()) } else { Err(RULE) }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    const RULE: &str = "must be dot-separated [a-z0-9-] labels, at most 253 characters";
    if s.len() <= 253 && s.split('.').all(|label| dns_label(label).is_ok()) {
        Ok(())
    } else {
        Err(RULE)
    }
}

/// Kubernetes port name (IANA_SVC_NAME): 1-15 of `[a-z0-9-]`, at least one
/// letter, no `-` at either end, no `--`.
pub fn port_name(s: &str) -> Result<(), &'static str> {
    const RULE: &str =
        "must be 1-15 of [a-z0-9-] with at least one letter, no '-' at either end, no '--'";
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok { Ok(()) } else { Err(RULE) }
}

/// Scenario names: kebab-case, `[a-z0-9-]`, alphanumeric at both ends.
pub fn kebab_case(s: &str) -> Result<(), &'static str> {
    const RULE: &str = "must be kebab-case: [a-z0-9-], starting and ending alphanumeric";
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.contains("--");
    if ok { Ok(()) } else { Err(RULE) }
}
