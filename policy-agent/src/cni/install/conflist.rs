//! Adding Palisade to a network configuration, as JSON: pure functions, no
//! files. The result is a conflist whose last plugin is Palisade's entry;
//! the other plugins stay as they are, in their order.

use serde_json::{Map, Value};

use crate::cni::config::PLUGIN_TYPE;
use crate::cni::spec::{SUPPORTED_VERSIONS, Version};

/// Why a configuration cannot take Palisade.
#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("not JSON: {0}")]
    Parse(serde_json::Error),
    #[error("not a JSON object")]
    NotObject,
    #[error("neither a conflist (no \"plugins\") nor a plugin configuration (no \"type\")")]
    Neither,
    #[error("\"plugins\" is not a list")]
    PluginsNotList,
    #[error("the conflist has no plugins: there is no interface plugin to chain Palisade after")]
    NoPlugins,
    #[error("plugin {0} of the conflist has no \"type\"")]
    PluginWithoutType(usize),
    #[error("the configuration has no cniVersion")]
    NoVersion,
    #[error(
        "cniVersion {0:?} cannot chain palisade-cni (it speaks {versions})",
        versions = SUPPORTED_VERSIONS.join(", ")
    )]
    Unsupported(String),
}

/// Palisade's conflist entry.
pub fn entry(socket: &str, timeout_seconds: f64) -> Value {
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    entry.insert("socket".into(), socket.into());
    entry.insert("timeoutSeconds".into(), timeout_seconds.into());
    Value::Object(entry)
}

/// Whether a plugin entry is Palisade's.
pub fn is_palisade(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// A configuration with Palisade chained.
#[derive(Clone, Debug, PartialEq)]
pub struct Chained {
    /// The conflist to write.
    pub doc: Value,
    /// Whether it differs from the input.
    pub changed: bool,
    /// Whether the input already had a Palisade entry (its backup, if any,
    /// is from before).
    pub had_palisade: bool,
    /// Whether the input was a single-plugin `.conf`, now a conflist.
    pub converted: bool,
}

/// Parses `text` and chains `entry` as the last plugin: a conflist keeps
/// its other plugins in order (an older Palisade entry anywhere is
/// replaced); a single plugin configuration becomes a conflist of that
/// plugin and Palisade.
pub fn chain(text: &str, entry: &Value) -> Result<Chained, ConflistError> {
    let doc: Value = serde_json::from_str(text).map_err(ConflistError::Parse)?;
    let Value::Object(mut fields) = doc else {
        return Err(ConflistError::NotObject);
    };
    check_version(&fields)?;
    let converted = !fields.contains_key("plugins");
    let plugins = if converted {
        if !fields.contains_key("type") {
            return Err(ConflistError::Neither);
        }
        // A .conf: the list's fields stay on top, the rest is the plugin.
        let mut list = Map::new();
        for key in [
            "cniVersion",
            "cniVersions",
            "name",
            "disableCheck",
            "disableGC",
        ] {
            if let Some(value) = fields.remove(key) {
                list.insert(key.to_owned(), value);
            }
        }
        let plugin = Value::Object(std::mem::replace(&mut fields, list));
        vec![plugin]
    } else {
        match fields.remove("plugins") {
            Some(Value::Array(plugins)) => plugins,
            _ => return Err(ConflistError::PluginsNotList),
        }
    };
    if let Some(index) = plugins
        .iter()
        .position(|p| p.get("type").and_then(Value::as_str).is_none())
    {
        return Err(ConflistError::PluginWithoutType(index));
    }
    let had_palisade = plugins.iter().any(is_palisade);
    let mut chained: Vec<Value> = plugins
        .iter()
        .filter(|p| !is_palisade(p))
        .cloned()
        .collect();
    if chained.is_empty() {
        return Err(ConflistError::NoPlugins);
    }
    chained.push(entry.clone());
    let changed = converted || chained != plugins;
    fields.insert("plugins".to_owned(), Value::Array(chained));
    Ok(Chained {
        doc: Value::Object(fields),
        changed,
        had_palisade,
        converted,
    })
}

fn check_version(fields: &Map<String, Value>) -> Result<(), ConflistError> {
    let text = fields
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or(ConflistError::NoVersion)?;
    match Version::parse(text) {
        Some(v) if v.is_supported() => Ok(()),
        _ => Err(ConflistError::Unsupported(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn palisade() -> Value {
        entry("/run/palisade/agent.sock", 10.0)
    }

    const FLANNEL: &str = r#"{
        "name": "cbr0", "cniVersion": "0.3.1",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }"#;

    #[test]
    fn appends_last_and_keeps_the_rest() {
        let out = chain(FLANNEL, &palisade()).unwrap();
        assert!(out.changed && !out.had_palisade && !out.converted);
        let plugins = out.doc["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[0]["delegate"]["hairpinMode"], true);
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[2], palisade());
        assert_eq!(out.doc["name"], "cbr0");
        assert_eq!(out.doc["cniVersion"], "0.3.1");
    }

    #[test]
    fn idempotent() {
        let once = chain(FLANNEL, &palisade()).unwrap();
        let twice = chain(&once.doc.to_string(), &palisade()).unwrap();
        assert!(!twice.changed && twice.had_palisade);
        assert_eq!(twice.doc, once.doc);
    }

    #[test]
    fn moves_to_the_end_and_updates_settings() {
        let misplaced = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "palisade-cni", "socket": "/old.sock"},
            {"type": "bridge", "bridge": "cni0"},
        ]});
        let out = chain(&misplaced.to_string(), &palisade()).unwrap();
        assert!(out.changed && out.had_palisade);
        let plugins = out.doc["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[1], palisade());
        let other_timeout = entry("/run/palisade/agent.sock", 20.0);
        let again = chain(&out.doc.to_string(), &other_timeout).unwrap();
        assert!(again.changed);
        assert_eq!(again.doc["plugins"][1]["timeoutSeconds"], 20.0);
    }

    #[test]
    fn converts_a_single_plugin_conf() {
        let conf = r#"{"cniVersion": "0.4.0", "name": "mynet", "type": "bridge",
                       "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"}}"#;
        let out = chain(conf, &palisade()).unwrap();
        assert!(out.changed && out.converted);
        assert_eq!(out.doc["name"], "mynet");
        assert_eq!(out.doc["cniVersion"], "0.4.0");
        let plugins = out.doc["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[0]["ipam"]["subnet"], "10.1.0.0/16");
        assert!(plugins[0].get("name").is_none() && plugins[0].get("cniVersion").is_none());
        assert_eq!(plugins[1], palisade());
    }

    #[test]
    fn refuses_what_it_cannot_chain_onto() {
        let cases = [
            ("{not json", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, "neither"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "no plugins",
            ),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"palisade-cni"}]}"#,
                "no plugins",
            ),
            (
                r#"{"cniVersion":"1.0.0","plugins":{"type":"bridge"}}"#,
                "not a list",
            ),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"bridge":"x"}]}"#,
                "no \"type\"",
            ),
            (
                r#"{"name":"n","plugins":[{"type":"bridge"}]}"#,
                "no cniVersion",
            ),
            (r#"{"cniVersion":"0.2.0","type":"bridge"}"#, "cannot chain"),
        ];
        for (text, expected) in cases {
            let e = chain(text, &palisade()).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }
}
