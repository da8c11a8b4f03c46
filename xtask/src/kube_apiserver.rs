//! The Kubernetes API server part of `cargo xtask setup`: etcd (Debian's
//! `etcd-server`) and a real `kube-apiserver` built from Debian's own
//! `kubernetes` source package, cached under
//! `$XDG_CACHE_HOME/palisade/kube-apiserver/<debian-version>/kube-apiserver`
//! (default `~/.cache/palisade/...`) with a `current` link to the version in
//! use. The test fixture `palisade_tests::kube` runs them.
//!
//! No kube-apiserver binary can be installed from Debian, so it is built:
//! `apt-get source kubernetes` (the orig tarball ships `vendor/`; the Debian
//! patches are applied on unpacking), the vendored modern-go/reflect2 and
//! json-iterator are replaced by Debian's newer sources (reflect2 1.0.1 makes
//! every JSON decode crash under Go >= 1.18), `make gen_openapi` writes the
//! OpenAPI code the tarball lacks, and `go build` in GOPATH mode (module mode
//! fails on this tree) with Debian's Go 1.19. About 5 to 10 minutes cold on 2
//! cores. The work directory is `$XDG_CACHE_HOME/palisade/build/kube-apiserver`,
//! outside the repository; its Go build cache is kept for rebuilds.
//!
//! Idempotent: when the cached binary runs, nothing is done.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::util::{self, cmd};

/// The Debian source package that holds kube-apiserver.
const SOURCE_PACKAGE: &str = "kubernetes";
/// The apt sources file setup writes when no `deb-src` entry offers the package.
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/palisade-deb-src";
/// Debian's Go 1.19 (bookworm): the `go` the build uses, ahead of any other on PATH.
const GO: &str = "/usr/bin/go";
/// Where Debian's `-dev` packages put Go sources.
const GOCODE: &str = "/usr/share/gocode/src";
/// Vendored packages replaced by Debian's sources (see the module docs).
const VENDOR_REPLACEMENTS: [&str; 2] = [
    "github.com/modern-go/reflect2",
    "github.com/json-iterator/go",
];
/// The Go package the binary's version strings live in (GOPATH mode, vendored).
const VERSION_PACKAGE: &str = "k8s.io/kubernetes/vendor/k8s.io/component-base/version";

/// What the build needs from Debian: package, and a file that shows it is installed.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("golang-go", GO),
    ("make", "/usr/bin/make"),
    ("rsync", "/usr/bin/rsync"),
    ("dpkg-dev", "/usr/bin/dpkg-source"),
    ("patch", "/usr/bin/patch"),
    ("xz-utils", "/usr/bin/xz"),
    (
        "golang-github-modern-go-reflect2-dev",
        "/usr/share/gocode/src/github.com/modern-go/reflect2/reflect2.go",
    ),
    (
        "golang-github-json-iterator-go-dev",
        "/usr/share/gocode/src/github.com/json-iterator/go/iter.go",
    ),
];

/// What this step found, did, and could not do (one line each, with the fix),
/// for setup's summary.
#[derive(Default)]
pub struct Outcome {
    pub present: Vec<String>,
    pub installed: Vec<String>,
    pub missing: Vec<String>,
}

/// Makes sure etcd runs here and a kube-apiserver binary is cached (building
/// it when it is not). `skip` leaves the API server out (`--skip-kube-apiserver`).
pub fn ensure(skip: bool, root: bool) -> Outcome {
    let mut outcome = Outcome::default();
    if skip {
        println!(
            "kube-apiserver: skipped (--skip-kube-apiserver): tests that need an API server will fail until `cargo xtask setup` builds it"
        );
        return outcome;
    }

    // etcd: the API server's storage.
    if util::which("etcd").is_some() {
        outcome.present.push("etcd".to_owned());
    } else if !root {
        outcome.missing.push(
            "etcd: not installed and setup is not root: rerun `cargo xtask setup` as root (or `apt-get install etcd-server`)"
                .to_owned(),
        );
    } else {
        println!("kube-apiserver: installing etcd (Debian etcd-server)");
        match apt_install(&["etcd-server"]) {
            Ok(()) if util::which("etcd").is_some() => {
                outcome.installed.push("etcd-server".to_owned());
            }
            result => outcome.missing.push(format!(
                "etcd: `apt-get install etcd-server` did not provide it{}: see the apt output above, check /etc/apt/sources.list*",
                result.err().map(|e| format!(" ({e:#})")).unwrap_or_default()
            )),
        }
    }

    // kube-apiserver: cached, or built now.
    match cached() {
        Ok(Some((path, version))) => {
            println!("kube-apiserver: cached at {} ({version})", path.display());
            outcome.present.push(format!("kube-apiserver ({version})"));
            return outcome;
        }
        Ok(None) => {}
        Err(err) => {
            outcome.missing.push(format!(
                "kube-apiserver: cannot tell where to cache it ({err:#}): set HOME or XDG_CACHE_HOME"
            ));
            return outcome;
        }
    }
    if !root {
        outcome.missing.push(
            "kube-apiserver: not built yet, and building it installs Debian packages: rerun `cargo xtask setup` as root, \
             or pass --skip-kube-apiserver if you do not run the Kubernetes API tests"
                .to_owned(),
        );
        return outcome;
    }
    let started = Instant::now();
    match build() {
        Ok((path, version)) => {
            let took = minutes(started.elapsed());
            println!(
                "kube-apiserver: built {version} in {took}: {}",
                path.display()
            );
            outcome
                .installed
                .push(format!("kube-apiserver ({version}, built in {took})"));
        }
        Err(err) => outcome.missing.push(format!(
            "kube-apiserver: the build failed ({err:#}): see the output above and rerun `cargo xtask setup` \
             (work directory {}), or pass --skip-kube-apiserver if you do not run the Kubernetes API tests",
            work_dir().map_or_else(|_| "?".to_owned(), |dir| dir.display().to_string())
        )),
    }
    outcome
}

/// `$XDG_CACHE_HOME/palisade` (default `~/.cache/palisade`).
fn cache_root() -> Result<PathBuf> {
    env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .map(|cache| cache.join("palisade"))
        .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set"))
}

/// The directory holding one subdirectory per built Debian version and the
/// `current` link (the test fixture reads `current/kube-apiserver`).
fn binaries_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join("kube-apiserver"))
}

fn work_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join("build").join("kube-apiserver"))
}

/// The cached binary and the version it reports, if it is there and runs.
fn cached() -> Result<Option<(PathBuf, String)>> {
    let path = binaries_dir()?.join("current").join("kube-apiserver");
    if !path.exists() {
        return Ok(None);
    }
    Ok(binary_version(&path).map(|version| (path, version)))
}

/// `Kubernetes v1.20.2` from `kube-apiserver --version`.
fn binary_version(path: &Path) -> Option<String> {
    cmd!(path, "--version")
        .try_read()
        .filter(|out| out.starts_with("Kubernetes v"))
}

fn step(number: u32, what: &str) {
    println!("kube-apiserver: [{number}/7] {what}");
}

/// Builds kube-apiserver and installs it into the cache; returns its path and version.
fn build() -> Result<(PathBuf, String)> {
    let work = work_dir()?;
    println!(
        "kube-apiserver: not cached: building it from Debian's `{SOURCE_PACKAGE}` source package in {} (5-10 minutes)",
        work.display()
    );

    step(
        1,
        "Debian packages for the build (Go 1.19, make, rsync, dpkg-dev, reflect2, json-iterator)",
    );
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing).context("installing the build's Debian packages")?;
        if let Some((name, probe)) = BUILD_PACKAGES
            .iter()
            .find(|(_, probe)| !Path::new(probe).exists())
        {
            bail!("`apt-get install {name}` did not provide {probe}");
        }
    }
    let go_bin = go_bin_dir()?;

    step(
        2,
        "a deb-src entry that offers the `kubernetes` source package",
    );
    ensure_deb_src()?;

    step(
        3,
        "downloading and unpacking the source (apt-get source kubernetes, Debian patches applied)",
    );
    let src = work.join("src");
    remove_dir(&src)?;
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    cmd!("apt-get", "source", SOURCE_PACKAGE)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .current_dir(&src)
        .run()
        .context(
            "`apt-get source` failed (are deb.debian.org and the deb-src entries reachable?)",
        )?;
    let debian_version = dsc_version(&src)?;
    let upstream = upstream_version(&debian_version);
    let unpacked = unpacked_dir(&src)?;
    // GOPATH mode: the tree must sit at $GOPATH/src/k8s.io/kubernetes (a real
    // directory, not a link, so that Go sees the import path from the cwd).
    let gopath = work.join("gopath");
    remove_dir(&gopath)?;
    let tree = gopath.join("src/k8s.io/kubernetes");
    fs::create_dir_all(tree.parent().expect("has a parent"))
        .with_context(|| format!("creating {}", gopath.display()))?;
    fs::rename(&unpacked, &tree)
        .with_context(|| format!("moving {} to {}", unpacked.display(), tree.display()))?;
    println!(
        "kube-apiserver: Debian {SOURCE_PACKAGE} {debian_version} (Kubernetes v{upstream}) in {}",
        tree.display()
    );

    step(
        4,
        "replacing the vendored reflect2 and json-iterator with Debian's (the vendored ones crash under Go >= 1.18)",
    );
    for package in VENDOR_REPLACEMENTS {
        let vendored = tree.join("vendor").join(package);
        remove_dir(&vendored)?;
        fs::create_dir_all(&vendored)
            .with_context(|| format!("creating {}", vendored.display()))?;
        // Go files only: Debian's copies carry tests and docs the build skips anyway.
        cmd!(
            "rsync",
            "-rL",
            "--exclude=*_test.go",
            format!("{GOCODE}/{package}/"),
            format!("{}/", vendored.display())
        )
        .run()
        .with_context(|| format!("copying Debian's {package}"))?;
    }

    let go_env = |command: util::Cmd| {
        command
            .env(
                "PATH",
                env::join_paths(
                    std::iter::once(go_bin.clone())
                        .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
                )
                .expect("PATH entries have no separator"),
            )
            .env("GOPATH", &gopath)
            .env("GO111MODULE", "off")
            .env("GOCACHE", work.join("gocache"))
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env_remove("GOFLAGS")
            .env_remove("GOROOT")
            .env_remove("GOBIN")
            .current_dir(&tree)
    };

    step(
        5,
        "generating the OpenAPI code the tarball lacks (make gen_openapi)",
    );
    go_env(cmd!("make", "gen_openapi"))
        .run()
        .context("`make gen_openapi` failed")?;

    step(
        6,
        "go build ./cmd/kube-apiserver (about 5 minutes on 2 cores)",
    );
    let (major, minor) = major_minor(&upstream);
    let ldflags = [
        format!("{VERSION_PACKAGE}.gitVersion=v{upstream}"),
        format!("{VERSION_PACKAGE}.gitMajor={major}"),
        format!("{VERSION_PACKAGE}.gitMinor={minor}"),
        format!("{VERSION_PACKAGE}.gitTreeState=clean"),
    ]
    .iter()
    .map(|x| format!("-X {x}"))
    .chain(["-s".to_owned(), "-w".to_owned()])
    .collect::<Vec<_>>()
    .join(" ");
    let built = work.join("kube-apiserver");
    let _ = fs::remove_file(&built);
    go_env(cmd!(
        "go",
        "build",
        "-o",
        &built,
        "-ldflags",
        ldflags,
        "k8s.io/kubernetes/cmd/kube-apiserver"
    ))
    .run()
    .context("`go build` of kube-apiserver failed")?;
    let version = binary_version(&built).ok_or_else(|| {
        anyhow!(
            "the built {} does not answer `--version` with `Kubernetes v...`",
            built.display()
        )
    })?;

    step(7, "installing it into the cache");
    let installed = install(&built, &debian_version)?;
    // The source tree is large and not needed any more; the Go build cache
    // (gocache) stays so that a rebuild is quick.
    remove_dir(&src)?;
    remove_dir(&gopath)?;
    Ok((installed, version))
}

/// Runs `apt-get install`; if that fails, refreshes the package lists and tries again.
fn apt_install(packages: &[&str]) -> Result<()> {
    let apt = |args: &[&str]| {
        cmd!("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
    };
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(packages);
    if apt(&install).is_ok() {
        return Ok(());
    }
    eprintln!("apt-get install failed; refreshing the package lists and retrying");
    if let Err(err) = apt(&["update"]) {
        eprintln!("warning: apt-get update failed ({err:#}); retrying anyway");
    }
    apt(&install)
}

/// The directory of Debian's Go 1.19 (`/usr/bin/go` -> `/usr/lib/go-1.19/bin/go`),
/// put first on PATH so that no other Go on the machine is picked.
fn go_bin_dir() -> Result<PathBuf> {
    let go = fs::canonicalize(GO).with_context(|| format!("resolving {GO} (golang-go)"))?;
    let version = cmd!(&go, "version").read()?;
    println!("kube-apiserver: using {version} ({})", go.display());
    Ok(go.parent().expect("a file has a parent").to_owned())
}

/// Whether apt offers the source package.
fn source_available() -> bool {
    cmd!("apt-cache", "showsrc", "--only-source", SOURCE_PACKAGE)
        .try_read()
        .is_some_and(|out| {
            out.lines()
                .any(|line| line == format!("Package: {SOURCE_PACKAGE}"))
        })
}

/// Adds `deb-src` twins of the machine's Debian `deb` entries (same mirrors,
/// suites and components) when apt offers no `kubernetes` source yet.
fn ensure_deb_src() -> Result<()> {
    if source_available() {
        println!("kube-apiserver: apt already offers the `{SOURCE_PACKAGE}` source package");
        return Ok(());
    }
    let twins = deb_src_twins()?;
    if twins.deb822.is_empty() && twins.one_line.is_empty() {
        bail!(
            "no `deb` entries found in /etc/apt/sources.list or /etc/apt/sources.list.d: \
             add a `deb-src` entry for Debian 12 (bookworm) and rerun setup"
        );
    }
    if !twins.deb822.is_empty() {
        write_sources(&format!("{DEB_SRC_FILE}.sources"), &twins.deb822.join("\n"))?;
    }
    if !twins.one_line.is_empty() {
        write_sources(&format!("{DEB_SRC_FILE}.list"), &twins.one_line.join("\n"))?;
    }
    if let Err(err) = cmd!("apt-get", "update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
    {
        eprintln!(
            "warning: apt-get update failed ({err:#}); looking for the source package anyway"
        );
    }
    if !source_available() {
        bail!(
            "apt offers no `{SOURCE_PACKAGE}` source package even with the deb-src entries in {DEB_SRC_FILE}.*: \
             it is in Debian 12 (bookworm); point apt at a bookworm mirror"
        );
    }
    Ok(())
}

fn write_sources(path: &str, text: &str) -> Result<()> {
    let header = "# Written by `cargo xtask setup` (Palisade): deb-src twins of the Debian entries,\n\
                  # so that `apt-get source kubernetes` can fetch the API server's sources.\n\n";
    fs::write(path, format!("{header}{text}\n")).with_context(|| format!("writing {path}"))?;
    println!("kube-apiserver: wrote {path}");
    Ok(())
}

#[derive(Default, Debug)]
struct Twins {
    /// deb822 stanzas (for a `.sources` file).
    deb822: Vec<String>,
    /// one-line entries (for a `.list` file).
    one_line: Vec<String>,
}

/// `deb-src` twins of the enabled `deb` entries that point at a Debian archive
/// (or of all entries, if none looks like one).
fn deb_src_twins() -> Result<Twins> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut list: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                !path.to_string_lossy().starts_with(DEB_SRC_FILE)
                    && path
                        .extension()
                        .is_some_and(|ext| ext == "list" || ext == "sources")
            })
            .collect();
        list.sort();
        files.extend(list);
    }
    let mut all = Twins::default();
    for file in &files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        if file.extension().is_some_and(|ext| ext == "sources") {
            all.deb822.extend(deb822_twins(&text));
        } else {
            all.one_line.extend(one_line_twins(&text));
        }
    }
    let debian = |entry: &String| entry.contains("debian");
    if all.deb822.iter().chain(&all.one_line).any(debian) {
        all.deb822.retain(debian);
        all.one_line.retain(debian);
    }
    Ok(all)
}

/// `deb-src` stanzas for the enabled deb822 stanzas whose Types include `deb`.
fn deb822_twins(text: &str) -> Vec<String> {
    let mut twins = Vec::new();
    for stanza in text.split("\n\n") {
        let lines: Vec<&str> = stanza
            .lines()
            .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
            .collect();
        let field = |name: &str| {
            lines.iter().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
            })
        };
        let is_deb =
            field("Types").is_some_and(|types| types.split_whitespace().any(|t| t == "deb"));
        let enabled = field("Enabled").is_none_or(|value| !value.eq_ignore_ascii_case("no"));
        if !is_deb || !enabled {
            continue;
        }
        let twin: Vec<String> = lines
            .iter()
            .map(|line| match line.split_once(':') {
                Some((key, _)) if key.trim().eq_ignore_ascii_case("Types") => {
                    "Types: deb-src".to_owned()
                }
                _ => (*line).to_owned(),
            })
            .collect();
        twins.push(twin.join("\n") + "\n");
    }
    twins
}

/// `deb-src ...` for each `deb ...` line.
fn one_line_twins(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("deb "))
        .map(|rest| format!("deb-src {}", rest.trim_start()))
        .collect()
}

/// The `Version:` of the one `.dsc` file in `dir`.
fn dsc_version(dir: &Path) -> Result<String> {
    let dsc = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "dsc"))
        .ok_or_else(|| anyhow!("`apt-get source` left no .dsc file in {}", dir.display()))?;
    let text = fs::read_to_string(&dsc).with_context(|| format!("reading {}", dsc.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("Version:"))
        .map(|version| version.trim().to_owned())
        .ok_or_else(|| anyhow!("no Version: line in {}", dsc.display()))
}

/// The upstream Kubernetes version in a Debian version:
/// `1.20.5+really1.20.2-1.1+deb12u1` -> `1.20.2`.
fn upstream_version(debian: &str) -> String {
    let without_epoch = debian.split_once(':').map_or(debian, |(_, rest)| rest);
    let upstream = without_epoch
        .rsplit_once('-')
        .map_or(without_epoch, |(upstream, _revision)| upstream);
    let upstream = upstream
        .split_once("+really")
        .map_or(upstream, |(_, really)| really);
    upstream
        .split(['+', '~'])
        .next()
        .unwrap_or(upstream)
        .to_owned()
}

/// `("1", "20")` from `1.20.2`.
fn major_minor(version: &str) -> (&str, &str) {
    let mut parts = version.split('.');
    (parts.next().unwrap_or("0"), parts.next().unwrap_or("0"))
}

/// The one directory `apt-get source` unpacked into `dir`.
fn unpacked_dir(dir: &Path) -> Result<PathBuf> {
    let dirs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir())
        .collect();
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "`apt-get source` unpacked nothing into {} (is dpkg-dev installed?)",
            dir.display()
        ),
        _ => bail!(
            "`apt-get source` left several directories in {}: {dirs:?}",
            dir.display()
        ),
    }
}

/// Moves the built binary to `<binaries>/<debian version>/kube-apiserver` and
/// points `current` at that version.
fn install(built: &Path, debian_version: &str) -> Result<PathBuf> {
    let binaries = binaries_dir()?;
    let dir = binaries.join(debian_version);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("kube-apiserver");
    // Same file system (both under the cache), so this is atomic.
    fs::rename(built, &target)
        .or_else(|_| fs::copy(built, &target).map(drop))
        .with_context(|| format!("installing {} to {}", built.display(), target.display()))?;
    let current = binaries.join("current");
    let next = binaries.join(".current.new");
    let _ = fs::remove_file(&next);
    symlink(debian_version, &next).with_context(|| format!("linking {}", next.display()))?;
    fs::rename(&next, &current).with_context(|| format!("replacing {}", current.display()))?;
    Ok(current.join("kube-apiserver"))
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

fn minutes(elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            upstream_version("1.20.5+really1.20.2-1.1+deb12u1"),
            "1.20.2"
        );
        assert_eq!(upstream_version("1.20.5+really1.20.2-1.1"), "1.20.2");
        assert_eq!(upstream_version("2:1.28.3+ds-2"), "1.28.3");
        assert_eq!(upstream_version("1.25.0"), "1.25.0");
        assert_eq!(major_minor("1.20.2"), ("1", "20"));
    }

    #[test]
    fn deb822_twin() {
        let text = "Types: deb\n# mirror\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: http://example.org/x\nSuites: y\nComponents: main\nEnabled: no\n";
        let twins = deb822_twins(text);
        assert_eq!(twins.len(), 1);
        assert_eq!(
            twins[0],
            "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
    }

    #[test]
    fn one_line_twin() {
        let text = "# comment\ndeb [arch=amd64] http://deb.debian.org/debian bookworm main\ndeb-src http://x y z\n";
        assert_eq!(
            one_line_twins(text),
            ["deb-src [arch=amd64] http://deb.debian.org/debian bookworm main"]
        );
    }
}
