//! The Debian package, installed for real: `cargo deb` packs the already-built (debug) binary,
//! and `dpkg` runs the maintainer scripts inside a throwaway minimal Debian (debootstrap, cached
//! under `target/package-test/` so a re-run downloads nothing), chrooted and in a network
//! namespace of its own so the interception rules it installs and removes never touch the host.
//! Root only (CI runs as root); it says loudly when it skips. The paths, owners and modes are
//! those of docs/host-layout.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_isthmus");
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Besides minbase: the package's dependencies iptables and iproute2, and systemd for
/// `systemd-analyze verify` (installed, not running: the maintainer scripts must cope with that).
const INCLUDE: &str = "iptables,iproute2,systemd";
/// The cached base root; change the name when INCLUDE changes.
const BASE: &str = "bookworm-minbase-iptables-iproute2-systemd";
const AGENT_UNIT: &str = "/lib/systemd/system/isthmus-agent.service";
const SERVER_UNIT: &str = "/lib/systemd/system/isthmus-server.service";

/// A copy of the base root and a network namespace, both removed on drop.
struct Root {
    dir: PathBuf,
    netns: String,
}

impl Root {
    /// Runs `script` with `sh` in the chroot, inside the namespace, with /proc and /dev mounted
    /// (in `ip netns exec`'s own mount namespace, so the mounts vanish with it).
    fn sh(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, "sh", "-c"])
            .arg(
                "mount -t proc proc \"$1/proc\" && mount --bind /dev \"$1/dev\" && \
                 exec chroot \"$1\" /bin/sh -c \"$2\"",
            )
            .args(["sh"])
            .arg(&self.dir)
            .arg(script)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run ip netns exec")
    }

    /// Like `sh`, and fails the test with the script's output unless it exits 0.
    fn ok(&self, script: &str) -> Output {
        let out = self.sh(script);
        assert!(out.status.success(), "{script}\n{}", show(&out));
        out
    }

    fn stdout(&self, script: &str) -> String {
        String::from_utf8_lossy(&self.ok(script).stdout).into_owned()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    fn exists(&self, p: &str) -> bool {
        self.path(p).symlink_metadata().is_ok()
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("read {p}: {e}"))
    }

    /// `owner:group mode type` as the chroot's own user database names them.
    fn stat(&self, p: &str) -> String {
        self.stdout(&format!("stat -c '%U:%G %a %F' {p}"))
            .trim()
            .to_string()
    }

    fn nat_rules(&self) -> String {
        self.stdout("iptables-save -t nat")
    }

    fn passwd(&self, user: &str) -> Vec<String> {
        self.stdout(&format!("getent passwd {user}"))
            .trim()
            .split(':')
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}\n{}", show(&out));
    out
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (chroot, dpkg into a throwaway root, network namespaces)".into());
    }
    for (program, arg, package) in [
        ("dpkg", "--version", "dpkg"),
        ("debootstrap", "--version", "debootstrap"),
        ("ip", "-V", "iproute2"),
    ] {
        if !have(program, arg) {
            return Some(format!(
                "{program} is missing (scripts/setup.sh installs {package})"
            ));
        }
    }
    if !Command::new(cargo())
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some("cargo-deb is missing (scripts/setup.sh --test-tools installs it)".into());
    }
    None
}

/// `target/` of the build that made BIN (`target/debug/isthmus`).
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("BIN is target/<profile>/isthmus")
        .to_path_buf()
}

/// The minimal Debian every run copies, made once. Concurrent first runs each build their own
/// and the first rename wins.
fn base_root(cache: &Path) -> PathBuf {
    let base = cache.join(BASE);
    if base.join(".complete").exists() {
        drop_downloaded_debs(&base);
        return base;
    }
    let tmp = cache.join(format!("{BASE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("package test: debootstrap {SUITE} (minbase + {INCLUDE}) into {tmp:?}, once");
    let started = Instant::now();
    run(Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&tmp)
        .arg(MIRROR));
    eprintln!("package test: debootstrap took {:?}", started.elapsed());
    drop_downloaded_debs(&tmp);
    std::fs::write(tmp.join(".complete"), "").unwrap();
    if std::fs::rename(&tmp, &base).is_err() {
        // Another run got there first.
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(base.join(".complete").exists(), "no base root at {base:?}");
    }
    base
}

/// Copies left by runs that were killed before their drop ran (their process is gone).
fn remove_stale_runs(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("run-") else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// debootstrap leaves the ~100 MB of .debs it installed in apt's cache; every run copies the base
/// root, so they go (what `apt-get clean` does). CI once ran out of disk copying them.
fn drop_downloaded_debs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root.join("var/cache/apt/archives")) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "deb") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Builds the .deb from the debug binary the test harness already built (a release build is too
/// slow for CI); completions are generated from it as scripts/package.sh does.
fn build_deb(out: &Path) {
    let completions = target_dir().join("debug/completions");
    std::fs::create_dir_all(&completions).unwrap();
    for (shell, file) in [
        ("bash", "isthmus.bash"),
        ("zsh", "_isthmus"),
        ("fish", "isthmus.fish"),
    ] {
        let script = run(Command::new(BIN).args(["completion", shell])).stdout;
        // Temp + rename: a concurrent run may be packing the same file.
        let tmp = completions.join(format!("{file}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, script).unwrap();
        std::fs::rename(&tmp, completions.join(file)).unwrap();
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // `--profile dev --no-build` packs target/debug/isthmus (cargo-deb warns that dev profiles
    // are meant for tests only, which is what this is); --strip and --fast keep it quick.
    run(Command::new(cargo())
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--strip",
            "--fast",
            "--quiet",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("-o")
        .arg(out));
}

#[test]
fn debian_package_installs_removes_and_purges() {
    let name = "debian_package_installs_removes_and_purges";
    if let Some(why) = missing() {
        eprintln!("!!!! SKIP {name}: {why} !!!!");
        return;
    }
    let started = Instant::now();
    let cache = target_dir().join("package-test");
    std::fs::create_dir_all(&cache).unwrap();
    let base = base_root(&cache);

    let id = std::process::id();
    let root = Root {
        dir: cache.join(format!("run-{id}")),
        netns: format!("isthmus-pkg-{id}"),
    };
    let _ = std::fs::remove_dir_all(&root.dir);
    remove_stale_runs(&cache);
    run(Command::new("cp").args(["-a"]).arg(&base).arg(&root.dir));
    run(Command::new("ip").args(["netns", "add", &root.netns]));
    root.ok("ip link set lo up 2>/dev/null || true");
    let deb = root.path("/tmp/isthmus.deb");
    build_deb(&deb);
    eprintln!(
        "package test: root and .deb ready after {:?}",
        started.elapsed()
    );

    // Install: files, users, directories.
    root.ok("dpkg -i /tmp/isthmus.deb");
    installed_files_users_and_dirs(&root);
    units_verify(&root);

    // The agent's unit lets user istio-proxy install rules, with iptables-legacy's lock too.
    agent_can_install_rules(&root);
    assert!(root.nat_rules().contains("ISTHMUS_OUTPUT"));

    // Remove: no interception rule is left, the binary and units go, config and state stay.
    let out = root.ok("dpkg -r isthmus");
    assert!(
        !root.nat_rules().contains("ISTHMUS_"),
        "rules left after dpkg -r:\n{}\n{}",
        root.nat_rules(),
        show(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("interception rules removed"));
    for gone in ["/usr/bin/isthmus", AGENT_UNIT, SERVER_UNIT] {
        assert!(!root.exists(gone), "{gone} left after dpkg -r");
    }
    for kept in [
        "/etc/isthmus/server.env",
        "/var/lib/isthmus",
        "/var/lib/isthmus-server",
    ] {
        assert!(root.exists(kept), "{kept} gone after dpkg -r");
    }
    assert!(root
        .stdout("dpkg-query -W -f '${Status}' isthmus")
        .contains("config-files"));

    // Re-install after remove, then over the installed package: same users, same modes, the
    // host's files untouched.
    root.ok("dpkg -i /tmp/isthmus.deb");
    root.ok(
        "printf 'CA_ADDR=https://10.0.0.1:15012\\n' > /etc/isthmus/agent.env && \
         printf 'token' > /etc/isthmus/token && chown istio-proxy:istio-proxy /etc/isthmus/token && \
         chmod 0600 /etc/isthmus/token && \
         printf 'key' > /etc/certs/key.pem && chown istio-proxy: /etc/certs/key.pem && \
         touch /var/lib/isthmus/discovery.cache /var/lib/isthmus-server/registry.redb && \
         mkdir -p /var/lib/istio/envoy && echo ISTIO_SERVICE_CIDR=10.96.0.0/12 > /var/lib/istio/envoy/cluster.env",
    );
    let out = root.ok("dpkg -i /tmp/isthmus.deb");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("taken"),
        "{}",
        show(&out)
    );
    assert_eq!(
        root.stdout("getent passwd | grep -c '^istio-proxy:'")
            .trim(),
        "1"
    );
    assert_eq!(root.passwd("istio-proxy")[2], "1337");
    installed_files_users_and_dirs(&root);
    assert_eq!(root.read("/etc/isthmus/token"), "token");
    assert!(root.exists("/var/lib/isthmus-server/registry.redb"));
    assert_eq!(
        root.read("/var/lib/istio/envoy/cluster.env"),
        "ISTIO_SERVICE_CIDR=10.96.0.0/12\n",
        "cluster.env changed though uid 1337 is istio-proxy's"
    );

    // Purge: configuration and state go, the users stay (Debian keeps system users).
    root.ok("dpkg --purge isthmus");
    for gone in [
        "/etc/isthmus",
        "/var/lib/isthmus",
        "/var/lib/isthmus-server",
        "/etc/certs",
        "/var/lib/istio",
        "/usr/bin/isthmus",
    ] {
        assert!(!root.exists(gone), "{gone} left after dpkg --purge");
    }
    let status = root.sh("dpkg-query -W -f '${Status}' isthmus");
    assert!(
        !status.status.success()
            || String::from_utf8_lossy(&status.stdout).contains("not-installed"),
        "dpkg still knows isthmus after purge: {}",
        show(&status)
    );
    root.ok("getent passwd istio-proxy && getent passwd isthmus");

    uid_1337_taken(&root);
    eprintln!("package test: done in {:?}", started.elapsed());
}

fn installed_files_users_and_dirs(root: &Root) {
    for (path, want) in [
        ("/usr/bin/isthmus", "root:root 755 regular file"),
        (AGENT_UNIT, "root:root 644 regular file"),
        (SERVER_UNIT, "root:root 644 regular file"),
        ("/etc/isthmus", "root:root 755 directory"),
        ("/etc/isthmus/server.env", "root:root 644 regular file"),
        ("/etc/certs", "istio-proxy:istio-proxy 755 directory"),
        ("/var/lib/isthmus", "istio-proxy:istio-proxy 750 directory"),
        ("/var/lib/isthmus-server", "isthmus:isthmus 750 directory"),
        (
            "/usr/share/bash-completion/completions/isthmus",
            "root:root 644 regular file",
        ),
        (
            "/usr/share/zsh/vendor-completions/_isthmus",
            "root:root 644 regular file",
        ),
        (
            "/usr/share/fish/vendor_completions.d/isthmus.fish",
            "root:root 644 regular file",
        ),
        (
            "/usr/share/doc/isthmus/copyright",
            "root:root 644 regular file",
        ),
        (
            "/usr/share/doc/isthmus/README.md",
            "root:root 644 regular file",
        ),
        (
            "/usr/share/doc/isthmus/changelog.Debian.gz",
            "root:root 644 regular file",
        ),
    ] {
        assert_eq!(root.stat(path), want, "{path}");
    }
    assert_eq!(root.stdout("isthmus --version").trim(), "isthmus 0.1.0");
    assert!(root
        .read("/usr/share/bash-completion/completions/isthmus")
        .contains("isthmus"));
    assert!(root
        .read("/var/lib/dpkg/info/isthmus.conffiles")
        .lines()
        .any(|l| l == "/etc/isthmus/server.env"));

    // server.env: all commented, and every variable it documents is one the server reads.
    let env = root.read("/etc/isthmus/server.env");
    let help = root.stdout("isthmus server --help");
    let mut documented = 0;
    for line in env.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.starts_with('#'),
            "server.env line not commented: {line}"
        );
        if let Some((var, _)) = line[1..].split_once('=') {
            if !var.contains(' ') {
                assert!(
                    help.contains(&format!("[env: {var}=")),
                    "server.env documents {var}, which `isthmus server` does not read"
                );
                documented += 1;
            }
        }
    }
    assert!(
        documented >= 10,
        "server.env documents {documented} variables"
    );

    // Users: istio-proxy on 1337 (the id the rules exempt), both system users without a login.
    let proxy = root.passwd("istio-proxy");
    assert_eq!(
        (proxy[2].as_str(), proxy[3].as_str()),
        ("1337", "1337"),
        "{proxy:?}"
    );
    assert_eq!(proxy[6], "/usr/sbin/nologin");
    assert_eq!(
        root.stdout("getent group istio-proxy").trim(),
        "istio-proxy:x:1337:"
    );
    let server = root.passwd("isthmus");
    assert!(server[2].parse::<u32>().unwrap() < 1000, "{server:?}");
    assert_eq!(server[5], "/var/lib/isthmus-server");
    assert_eq!(server[6], "/usr/sbin/nologin");

    // Nothing enabled or started on install: the agent has no configuration yet.
    assert!(
        !root.exists("/etc/systemd/system/multi-user.target.wants/isthmus-agent.service")
            && !root.exists("/etc/systemd/system/multi-user.target.wants/isthmus-server.service")
    );
}

/// Both units lift systemd's default soft limit of 1024 open files (the roles raise their
/// soft limit to this hard one at start). Read from the source tree: runs without dpkg or root.
#[test]
fn units_set_the_open_files_limit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
    for unit in ["isthmus-agent.service", "isthmus-server.service"] {
        let text = std::fs::read_to_string(dir.join(unit)).unwrap();
        assert!(
            text.lines().any(|l| l == "LimitNOFILE=1048576"),
            "{unit} lacks LimitNOFILE=1048576"
        );
    }
}

fn units_verify(root: &Root) {
    let out = root.sh(&format!(
        "SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no {AGENT_UNIT} {SERVER_UNIT}"
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("isthmus"),
        "systemd-analyze verify:\n{}",
        show(&out)
    );
    let agent = root.read(AGENT_UNIT);
    for line in [
        "User=istio-proxy",
        "EnvironmentFile=/etc/isthmus/agent.env",
        "ExecStart=/usr/bin/isthmus agent",
        "ExecStopPost=+/usr/bin/isthmus iptables --cleanup",
        "Restart=on-failure",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/isthmus /etc/certs",
        "LimitNOFILE=1048576",
    ] {
        assert!(agent.lines().any(|l| l == line), "agent unit lacks {line}");
    }
    let server = root.read(SERVER_UNIT);
    for line in [
        "User=isthmus",
        "Environment=ISTHMUS_DATA_DIR=/var/lib/isthmus-server",
        "EnvironmentFile=-/etc/isthmus/server.env",
        "ExecStart=/usr/bin/isthmus server",
        "ReadWritePaths=/var/lib/isthmus-server",
        "LimitNOFILE=1048576",
    ] {
        assert!(
            server.lines().any(|l| l == line),
            "server unit lacks {line}"
        );
    }
}

/// What systemd does for the agent, by hand: run the unit's root-side ExecStartPre, then, as
/// istio-proxy with only the unit's two capabilities, no new privileges and /run read-only
/// (ProtectSystem=strict), install rules with iptables-legacy (which flocks /run/xtables.lock,
/// here left root-owned 0600 by an earlier root run) and with the default iptables (nft).
fn agent_can_install_rules(root: &Root) {
    let agent = root.read(AGENT_UNIT);
    let pre = agent
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre=+"))
        .expect("agent unit has a root ExecStartPre");
    root.ok(&format!(
        "rm -f /run/xtables.lock && (umask 077 && touch /run/xtables.lock) && {pre}"
    ));
    let as_agent = "setpriv --reuid=istio-proxy --regid=istio-proxy --init-groups \
                    --inh-caps=-all,+net_admin,+net_raw --ambient-caps=-all,+net_admin,+net_raw \
                    --bounding-set=-all,+net_admin,+net_raw --no-new-privs";
    let rules =
        root.stdout("isthmus iptables --dry-run -e ISTIO_SERVICE_CIDR=10.96.0.0/12 | grep -v '^#'");
    std::fs::write(root.path("/tmp/rules"), rules).unwrap();
    std::fs::write(
        root.path("/tmp/legacy-rules"),
        "*nat\n:ISTHMUS_LOCKTEST - [0:0]\nCOMMIT\n",
    )
    .unwrap();
    let out = root.ok(&format!(
        "mount --bind /run /run && mount -o remount,bind,ro /run && \
         {as_agent} iptables-legacy-restore --noflush < /tmp/legacy-rules && \
         {as_agent} iptables-restore --noflush < /tmp/rules && \
         iptables-legacy-save -t nat"
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains(":ISTHMUS_LOCKTEST"));
    root.ok("iptables-legacy -t nat -X ISTHMUS_LOCKTEST");
}

/// When uid/gid 1337 belong to someone else, istio-proxy gets other ids, the package says so,
/// and cluster.env tells the rules to exempt the real ones.
fn uid_1337_taken(root: &Root) {
    root.ok(
        "userdel istio-proxy; getent group istio-proxy && groupdel istio-proxy; \
         groupadd -g 1337 squatter && useradd -u 1337 -g squatter -M squatter",
    );
    let out = root.ok("dpkg -i /tmp/isthmus.deb");
    let proxy = root.passwd("istio-proxy");
    let (uid, gid) = (proxy[2].clone(), proxy[3].clone());
    assert!(uid != "1337" && gid != "1337", "{proxy:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "uid/gid 1337 is taken: user istio-proxy has uid {uid}, gid {gid}"
        )),
        "{}",
        show(&out)
    );
    root.ok("dpkg -i /tmp/isthmus.deb");
    let env = root.read("/var/lib/istio/envoy/cluster.env");
    assert_eq!(
        env,
        format!("ISTHMUS_PROXY_UID={uid}\nISTHMUS_PROXY_GID={gid}\n"),
        "cluster.env after two installs"
    );
    assert_eq!(
        root.stat("/var/lib/isthmus"),
        "istio-proxy:istio-proxy 750 directory"
    );
    // The rules read it from the seeds' path.
    let rules = root.stdout("isthmus iptables --dry-run -e ISTIO_SERVICE_CIDR=10.96.0.0/12");
    assert!(
        rules.contains(&format!("--uid-owner {uid} -j RETURN"))
            && rules.contains(&format!("--gid-owner {gid} -j RETURN")),
        "{rules}"
    );
    root.ok("dpkg --purge isthmus");
    assert!(!root.exists("/var/lib/istio"));
}

/// scripts/package.sh refuses option mistakes before it builds anything, naming the fix: a profile
/// with --pgo (which only builds release), --profile without a name, an unknown option, a dev
/// profile.
#[test]
fn package_script_refuses_bad_options() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/package.sh");
    for (args, expected) in [
        (
            &["--pgo", "--profile", "dist"][..],
            "--pgo builds the release profile",
        ),
        (&["--profile"][..], "--profile needs a cargo profile name"),
        (
            &["--bogus"][..],
            "usage: scripts/package.sh [--profile NAME] [--pgo]",
        ),
        (&["--profile", "dev"][..], "use a release-like profile"),
    ] {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        // Refused before any build: no cargo output.
        assert!(
            !stderr.contains("Compiling") && !stderr.contains("Finished"),
            "{args:?}: {stderr}"
        );
        assert!(
            started.elapsed().as_secs() < 10,
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}
