//! Small helpers shared by the subcommands: running external commands with
//! readable logs and errors, finding programs, and a few system probes.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Builds a [`Cmd`]: `cmd!("cargo", "build", "--package", name)`.
///
/// Every argument may be anything that is `AsRef<OsStr>` (`&str`, `String`,
/// `PathBuf`, ...). Further arguments, environment changes and the working
/// directory are set with the builder methods of [`Cmd`].
macro_rules! cmd {
    ($program:expr $(, $arg:expr)* $(,)?) => {{
        #[allow(unused_mut)]
        let mut cmd = $crate::util::Cmd::new($program);
        $( cmd = cmd.arg($arg); )*
        cmd
    }};
}
pub(crate) use cmd;

/// Removes from this process's environment the variables `cargo run` set
/// for the xtask package (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), so that
/// the cargo commands the tasks run see the environment of a plain `cargo`
/// in a shell: build scripts that watch them (ring's watches
/// `CARGO_MANIFEST_DIR`) would otherwise run again, and everything built on
/// them be rebuilt, at every switch between `cargo xtask` and `cargo`.
/// Call it first thing in `main`, before any thread exists.
pub fn forget_package_variables() {
    let names: Vec<OsString> = env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str().is_some_and(|n| {
                matches!(
                    n,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                ) || n.starts_with("CARGO_PKG_")
            })
        })
        .collect();
    for name in names {
        // SAFETY: called at the start of main, while the process has one thread.
        unsafe { env::remove_var(name) };
    }
}

/// A command that failed: carries the exit code so that `main` can exit with
/// the same status (e.g. `cargo xtask test` exits like `cargo test`).
#[derive(Debug)]
pub struct CommandFailed {
    pub command: String,
    pub code: Option<i32>,
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` exited with status {code}", self.command),
            None => write!(f, "`{}` was killed by a signal", self.command),
        }
    }
}

impl std::error::Error for CommandFailed {}

/// A process to run, which remembers how to print itself as a shell line.
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    /// Variables set (Some) or removed (None), in order, for display and use.
    envs: Vec<(OsString, Option<OsString>)>,
    dir: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            dir: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (key, value) in &self.envs {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    fn spawn_error(&self, err: std::io::Error) -> anyhow::Error {
        if err.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "cannot run `{}`: program not found on PATH",
                self.program.to_string_lossy()
            )
        } else {
            anyhow::Error::new(err).context(format!("cannot run `{self}`"))
        }
    }

    /// Prints the command line, runs it with inherited stdio and returns its
    /// exit status (a non-zero status is not an error here).
    pub fn status(&self) -> Result<ExitStatus> {
        eprintln!("$ {self}");
        self.command().status().map_err(|e| self.spawn_error(e))
    }

    /// Prints the command line and runs it; a non-zero exit is a [`CommandFailed`] error.
    pub fn run(&self) -> Result<()> {
        let status = self.status()?;
        if status.success() {
            Ok(())
        } else {
            Err(CommandFailed {
                command: self.to_string(),
                code: status.code(),
            }
            .into())
        }
    }

    /// Runs the command quietly (a probe) and returns its trimmed stdout;
    /// fails with the command's stderr if it exits non-zero.
    pub fn read(&self) -> Result<String> {
        let output = self
            .command()
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            bail!("`{self}` failed ({}): {}", output.status, stderr.trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Like [`Cmd::read`], but any failure is just `None`.
    pub fn try_read(&self) -> Option<String> {
        self.read().ok()
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.envs {
            if let Some(value) = value {
                write!(f, "{}={} ", key.to_string_lossy(), shell_quote(value))?;
            }
        }
        write!(f, "{}", shell_quote(&self.program))?;
        for arg in &self.args {
            write!(f, " {}", shell_quote(arg))?;
        }
        Ok(())
    }
}

/// Quotes a word so that the printed line can be pasted into a shell.
fn shell_quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else if word.chars().any(char::is_control) {
        // ANSI-C quoting, e.g. the 0x1f separator of CARGO_ENCODED_RUSTFLAGS.
        let mut out = String::from("$'");
        for c in word.chars() {
            match c {
                '\'' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('\'');
        out
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

/// The cargo that runs us (set by `cargo run`), or `cargo` from PATH.
pub fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Finds a program on PATH. System directories (`/usr/sbin`, `/sbin`) are
/// searched as well, since a non-root PATH often lacks them.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// Finds a program on PATH only (what a child process would find).
pub fn which_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs with effective uid 0 (read from /proc, no libc).
pub fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// Fails with one line unless we run as root.
pub fn require_root(what: &str) -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        bail!(
            "{what} must run as root (it loads BPF programs and creates network namespaces): rerun with sudo"
        )
    }
}

/// Whether a bpf filesystem is mounted at `mountpoint`.
pub fn bpffs_mounted(mountpoint: &str) -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(mountpoint) && fstype == Some("bpf")
    }))
}

/// The sysroot of a rustup toolchain (`rustc +<toolchain> --print sysroot`).
pub fn toolchain_sysroot(toolchain: &str) -> Result<PathBuf> {
    cmd!("rustup", "run", toolchain, "rustc", "--print", "sysroot")
        .read()
        .map(PathBuf::from)
}

/// Formats a byte count for humans.
pub fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote(OsStr::new("plain-arg=1")), "plain-arg=1");
        assert_eq!(shell_quote(OsStr::new("two words")), "'two words'");
        assert_eq!(shell_quote(OsStr::new("it's")), r"'it'\''s'");
        assert_eq!(shell_quote(OsStr::new("a\x1fb")), r"$'a\x1fb'");
        assert_eq!(shell_quote(OsStr::new("")), "''");
    }

    #[test]
    fn display_shows_env_and_args() {
        let c = cmd!("cargo", "build", "--target", "bpfel-unknown-none")
            .env("X", "a b")
            .env_remove("Y");
        assert_eq!(
            c.to_string(),
            "X='a b' cargo build --target bpfel-unknown-none"
        );
    }
}
