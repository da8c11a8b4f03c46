//! One invocation of the plugin, from environment and stdin to what goes to
//! stdout and the exit status. Never panics on input: every problem ends
//! as the spec's error object.

use std::io;

use super::command::{self, Context};
use super::config::Request;
use super::env::{Command, Invocation};
use super::error::{ErrorCode, PluginError};
use super::spec::Version;

/// What the invocation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// For stdout: the result, the VERSION answer, the error object, or
    /// nothing.
    pub stdout: String,
    /// Exit status 0 or not.
    pub success: bool,
    /// For stderr: notes for the runtime's log.
    pub notes: Vec<String>,
}

impl Outcome {
    fn ok(stdout: String, notes: Vec<String>) -> Self {
        Self {
            stdout,
            success: true,
            notes,
        }
    }

    fn failed(error: &PluginError, version: Option<Version>, notes: Vec<String>) -> Self {
        let object = error.to_result(version);
        Self {
            stdout: serde_json::to_string(&object).unwrap_or_default(),
            success: false,
            notes,
        }
    }
}

/// Runs the command the environment (`var`) names on the request read
/// from stdin.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: io::Result<Vec<u8>>) -> Outcome {
    let stdin = match stdin {
        Ok(bytes) => bytes,
        Err(e) => {
            let error = PluginError::new(ErrorCode::Io, format!("cannot read stdin: {e}"));
            return Outcome::failed(&error, None, Vec::new());
        }
    };
    let decoded = Request::decode(&stdin);
    let hint = decoded.as_ref().ok().and_then(Request::version_hint);
    let invocation = match Invocation::from_lookup(var) {
        Ok(i) => i,
        Err(e) => return Outcome::failed(&e.into(), hint, Vec::new()),
    };
    if invocation.command == Command::Version {
        return match command::version(decoded.as_ref()) {
            Ok(answer) => Outcome::ok(
                serde_json::to_string(&answer).unwrap_or_default(),
                Vec::new(),
            ),
            Err(e) => Outcome::failed(&e, hint, Vec::new()),
        };
    }
    let request = match decoded {
        Ok(r) => r,
        Err(e) => return Outcome::failed(&e.into(), hint, Vec::new()),
    };
    let checked = request
        .version()
        .and_then(|version| Ok((version, request.settings()?)));
    let (version, settings) = match checked {
        Ok(v) => v,
        Err(e) => return Outcome::failed(&e.into(), hint, Vec::new()),
    };
    let mut ctx = Context {
        invocation: &invocation,
        request: &request,
        version,
        settings,
        notes: Vec::new(),
    };
    let result = match invocation.command {
        Command::Add => {
            command::add(&mut ctx).map(|r| serde_json::to_string(&r).unwrap_or_default())
        }
        Command::Del => command::del(&mut ctx).map(|()| String::new()),
        Command::Check => command::check(&mut ctx).map(|()| String::new()),
        Command::Status => command::status(&mut ctx).map(|()| String::new()),
        Command::Gc => command::gc(&mut ctx).map(|()| String::new()),
        Command::Version => unreachable!("answered above"),
    };
    let notes = std::mem::take(&mut ctx.notes);
    match result {
        Ok(stdout) => Outcome::ok(stdout, notes),
        Err(e) => Outcome::failed(&e, Some(version), notes),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::Value;

    use super::*;

    fn invoke(vars: &[(&str, &str)], stdin: &str) -> Outcome {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        run(|k| map.get(k).cloned(), Ok(stdin.as_bytes().to_vec()))
    }

    fn error(outcome: &Outcome) -> (u64, String) {
        assert!(!outcome.success, "{outcome:?}");
        let v: Value = serde_json::from_str(&outcome.stdout).unwrap();
        (
            v["code"].as_u64().unwrap(),
            v["msg"].as_str().unwrap().to_owned(),
        )
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
    ];
    const PREV: &str = r#"{"cniVersion":"1.0.0","name":"n","type":"palisade-cni",
        "prevResult":{"interfaces":[{"name":"v"},{"name":"eth0","sandbox":"/x"}]}}"#;

    #[test]
    fn version_answers() {
        let out = invoke(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        assert!(out.success);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        let supported: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(supported.contains(&"0.4.0") && supported.contains(&"1.1.0"));
        let out = invoke(&[("CNI_COMMAND", "VERSION")], "");
        assert!(
            out.stdout.contains("\"cniVersion\":\"1.1.0\""),
            "{}",
            out.stdout
        );
        assert_eq!(error(&invoke(&[("CNI_COMMAND", "VERSION")], "{oops")).0, 6);
    }

    #[test]
    fn every_input_problem_is_its_own_error() {
        assert_eq!(error(&invoke(&[], PREV)).0, 4);
        assert_eq!(error(&invoke(&[("CNI_COMMAND", "FROB")], PREV)).0, 4);
        assert_eq!(error(&invoke(ADD, "not json")).0, 6);
        assert_eq!(error(&invoke(ADD, "")).0, 6);
        assert_eq!(error(&invoke(ADD, r#"{"cniVersion":"0.2.0"}"#)).0, 1);
        let (code, msg) = error(&invoke(ADD, r#"{"cniVersion":"1.0.0","name":"n"}"#));
        assert_eq!(code, 7);
        assert!(msg.contains("prevResult"), "{msg}");
        let (code, msg) = error(&invoke(&ADD[..4], PREV));
        assert_eq!(code, 4);
        assert!(msg.contains("K8S_POD_NAMESPACE"), "{msg}");
        let no_netns: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        let (code, msg) = error(&invoke(&no_netns, PREV));
        assert_eq!(code, 4);
        assert!(msg.contains("CNI_NETNS"), "{msg}");
        let (code, msg) = error(&invoke(ADD, PREV));
        assert_eq!(code, 100);
        assert!(msg.contains("/nonexistent/netns"), "{msg}");
    }

    #[test]
    fn commands_need_their_versions() {
        let check = [("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "c1")];
        let (code, msg) = error(&invoke(&check, r#"{"cniVersion":"0.3.1","prevResult":{}}"#));
        assert_eq!(code, 1);
        assert!(msg.contains("0.4.0"), "{msg}");
        for command in ["STATUS", "GC"] {
            let out = invoke(&[("CNI_COMMAND", command)], r#"{"cniVersion":"1.0.0"}"#);
            assert_eq!(error(&out).0, 1, "{command}");
        }
        let out = invoke(
            &[("CNI_COMMAND", "GC")],
            r#"{"cniVersion":"1.1.0","name":"n"}"#,
        );
        assert_eq!(error(&out).0, 7);
    }

    #[test]
    fn agent_down() {
        let socket = r#""socket":"/nonexistent/agent.sock","timeoutSeconds":1"#;
        let del = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")];
        let out = invoke(&del, &format!(r#"{{"cniVersion":"1.0.0",{socket}}}"#));
        assert!(out.success, "{out:?}");
        assert!(out.stdout.is_empty());
        assert!(out.notes[0].contains("not reachable"), "{:?}", out.notes);
        let out = invoke(
            &[("CNI_COMMAND", "STATUS")],
            &format!(r#"{{"cniVersion":"1.1.0",{socket}}}"#),
        );
        let (code, msg) = error(&out);
        assert_eq!(code, 50);
        assert!(msg.contains("/nonexistent/agent.sock"), "{msg}");
        let out = invoke(
            &[("CNI_COMMAND", "GC")],
            &format!(r#"{{"cniVersion":"1.1.0","cni.dev/valid-attachments":[],{socket}}}"#),
        );
        assert_eq!(error(&out).0, 11);
    }

    #[test]
    fn error_object_carries_the_request_version() {
        let out = invoke(ADD, r#"{"cniVersion":"0.4.0","name":"n"}"#);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 7);
    }
}
