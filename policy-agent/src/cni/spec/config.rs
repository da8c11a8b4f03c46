//! The plugin configuration object a runtime writes on stdin (spec section
//! 1 and 3: one plugin of a conflist, with `cniVersion` and `name` of the
//! list, and `prevResult` or `cni.dev/valid-attachments` where the command
//! has them). Only the spec's own fields are typed here; plugin-specific
//! fields are read from the same document by the plugin.

use serde::{Deserialize, Serialize};

/// The spec's fields of the configuration on stdin. Every field is optional
/// here so that a missing one gives the plugin's own, precise error.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct NetConf {
    /// The protocol version the runtime chose.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: Option<String>,
    /// The network's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The plugin's executable name.
    #[serde(rename = "type", default)]
    pub plugin_type: Option<String>,
    /// The result of the previous plugin of the chain (ADD, CHECK, DEL);
    /// kept as JSON so that ADD passes it on unchanged.
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments that are still valid.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ValidAttachment {
    /// CNI_CONTAINERID of the ADD.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// CNI_IFNAME of the ADD.
    #[serde(default)]
    pub ifname: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_spec_fields_and_ignores_the_rest() {
        let conf: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.1.0","name":"k8s","type":"palisade-cni","socket":"/x",
                "prevResult":{"interfaces":[]},
                "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.cni_version.as_deref(), Some("1.1.0"));
        assert_eq!(conf.name.as_deref(), Some("k8s"));
        assert_eq!(conf.plugin_type.as_deref(), Some("palisade-cni"));
        assert!(conf.prev_result.is_some());
        let valid = conf.valid_attachments.unwrap();
        assert_eq!(valid[1].container_id, "b");
        assert_eq!(valid[1].ifname, "");
    }

    #[test]
    fn null_prev_result_is_absent() {
        let conf: NetConf = serde_json::from_str(r#"{"prevResult":null}"#).unwrap();
        assert_eq!(conf.prev_result, None);
    }
}
