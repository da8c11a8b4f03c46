//! The invocation's environment variables (spec section 2, "Parameters"):
//! CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS. Read
//! through a lookup function, so tests need no process environment.

use std::path::PathBuf;

/// What the runtime asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    /// The CNI_COMMAND value.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Command::Add,
            Command::Del,
            Command::Check,
            Command::Status,
            Command::Gc,
            Command::Version,
        ]
        .into_iter()
        .find(|c| c.as_str() == text)
    }
}

/// Why the environment does not describe a valid invocation (CNI error 4).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("CNI_COMMAND is not set: palisade-cni is a CNI plugin, run by the container runtime")]
    NoCommand,
    #[error("CNI_COMMAND={0:?} is not a CNI command (ADD, DEL, CHECK, STATUS, GC, VERSION)")]
    UnknownCommand(String),
    #[error("{0} is not set (required for this command)")]
    Missing(&'static str),
    #[error("{name}={value:?} is invalid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "CNI_ARGS has no {0}: Palisade needs the pod's namespace and name \
         (a Kubernetes runtime passes K8S_POD_NAMESPACE and K8S_POD_NAME)"
    )]
    NoPodArg(&'static str),
}

/// CNI_ARGS: `KEY=VALUE` pairs separated by `;`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs(Vec<(String, String)>);

impl CniArgs {
    /// Parses CNI_ARGS; an item without `=` or with an empty key is an error.
    pub fn parse(text: &str) -> Result<Self, EnvError> {
        let mut pairs = Vec::new();
        for item in text.split(';').filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    pairs.push((key.to_owned(), value.to_owned()));
                }
                _ => {
                    return Err(EnvError::Invalid {
                        name: "CNI_ARGS",
                        value: text.to_owned(),
                        why: "every item must be KEY=VALUE, items separated by ';'",
                    });
                }
            }
        }
        Ok(Self(pairs))
    }

    /// The value of `key` (the last one if repeated).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// K8S_POD_NAMESPACE and K8S_POD_NAME, both required.
    pub fn pod(&self) -> Result<(String, String), EnvError> {
        let get = |key: &'static str| {
            self.get(key)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or(EnvError::NoPodArg(key))
        };
        Ok((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
    }
}

/// The parameters of one invocation. Which ones are required depends on
/// the command; the accessors check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    args: Option<String>,
}

impl Invocation {
    /// Reads the invocation through `var` (e.g. `std::env::var(..).ok()`).
    /// Only CNI_COMMAND is checked here; the accessors check the rest when
    /// a command needs them.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let command = set("CNI_COMMAND").ok_or(EnvError::NoCommand)?;
        let command = Command::parse(&command).ok_or(EnvError::UnknownCommand(command))?;
        Ok(Self {
            command,
            container_id: set("CNI_CONTAINERID"),
            netns: set("CNI_NETNS"),
            ifname: set("CNI_IFNAME"),
            args: set("CNI_ARGS"),
        })
    }

    /// CNI_ARGS, parsed.
    pub fn args(&self) -> Result<CniArgs, EnvError> {
        CniArgs::parse(self.args.as_deref().unwrap_or_default())
    }

    /// CNI_CONTAINERID: an alphanumeric first character, then
    /// alphanumerics, `_`, `.` or `-`.
    pub fn container_id(&self) -> Result<&str, EnvError> {
        let id = self
            .container_id
            .as_deref()
            .ok_or(EnvError::Missing("CNI_CONTAINERID"))?;
        let mut chars = id.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if valid {
            Ok(id)
        } else {
            Err(EnvError::Invalid {
                name: "CNI_CONTAINERID",
                value: id.to_owned(),
                why: "must start with a letter or digit, then letters, digits, '_', '.' or '-'",
            })
        }
    }

    /// CNI_NETNS: the pod's network namespace path.
    pub fn netns(&self) -> Result<PathBuf, EnvError> {
        self.netns
            .as_deref()
            .map(PathBuf::from)
            .ok_or(EnvError::Missing("CNI_NETNS"))
    }

    /// CNI_NETNS if set (DEL may come without it).
    pub fn netns_if_set(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// CNI_IFNAME: a Linux interface name.
    pub fn ifname(&self) -> Result<&str, EnvError> {
        let name = self
            .ifname
            .as_deref()
            .ok_or(EnvError::Missing("CNI_IFNAME"))?;
        if name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(EnvError::Invalid {
                name: "CNI_IFNAME",
                value: name.to_owned(),
                why: "must be an interface name: at most 15 characters, no '/', ':' or whitespace",
            });
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        move |k| map.get(k).map(|v| (*v).to_owned())
    }

    #[test]
    fn a_kubelet_add() {
        let inv = Invocation::from_lookup(lookup(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "3f2a9c_x.y-z"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=3f2a",
            ),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.container_id().unwrap(), "3f2a9c_x.y-z");
        assert_eq!(
            inv.netns().unwrap(),
            PathBuf::from("/var/run/netns/cni-1234")
        );
        assert_eq!(inv.ifname().unwrap(), "eth0");
        let args = inv.args().unwrap();
        assert_eq!(args.pod().unwrap(), ("shop".into(), "web-0".into()));
        assert_eq!(args.get("IgnoreUnknown"), Some("1"));
    }

    #[test]
    fn missing_and_invalid() {
        assert_eq!(
            Invocation::from_lookup(lookup(&[])),
            Err(EnvError::NoCommand)
        );
        assert!(matches!(
            Invocation::from_lookup(lookup(&[("CNI_COMMAND", "add")])),
            Err(EnvError::UnknownCommand(_))
        ));
        let inv = Invocation::from_lookup(lookup(&[("CNI_COMMAND", "DEL")])).unwrap();
        assert_eq!(
            inv.container_id(),
            Err(EnvError::Missing("CNI_CONTAINERID"))
        );
        assert_eq!(inv.netns(), Err(EnvError::Missing("CNI_NETNS")));
        assert_eq!(inv.ifname(), Err(EnvError::Missing("CNI_IFNAME")));
        assert_eq!(
            inv.args().unwrap().pod(),
            Err(EnvError::NoPodArg("K8S_POD_NAMESPACE"))
        );
        for (id, ok) in [
            ("abc", true),
            ("-abc", false),
            ("a b", false),
            ("a/b", false),
        ] {
            let inv =
                Invocation::from_lookup(lookup(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", id)]))
                    .unwrap();
            assert_eq!(inv.container_id().is_ok(), ok, "{id}");
        }
        for (name, ok) in [
            ("eth0", true),
            ("a-very-long-name", false),
            ("a:b", false),
            ("..", false),
        ] {
            let inv =
                Invocation::from_lookup(lookup(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", name)]))
                    .unwrap();
            assert_eq!(inv.ifname().is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn cni_args() {
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        let args = CniArgs::parse("A=1;B=x=y;;A=2").unwrap();
        assert_eq!(args.get("A"), Some("2"));
        assert_eq!(args.get("B"), Some("x=y"));
        assert!(CniArgs::parse("A=1;oops").is_err());
        assert!(CniArgs::parse("=1").is_err());
        let args = CniArgs::parse("K8S_POD_NAMESPACE=a;K8S_POD_NAME=").unwrap();
        assert_eq!(args.pod(), Err(EnvError::NoPodArg("K8S_POD_NAME")));
    }
}
