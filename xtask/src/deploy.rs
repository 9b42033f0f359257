//! `cargo xtask deploy`: installs enforcer on the testbed's hosts over SSH.
//!
//! The hosts come from an ssh-config: `vagrant ssh-config` in `vagrant/` by default, or any file
//! in that format (`--ssh-config`), so any SSH-reachable Debian hosts work. It must name a host
//! `coord` (the coordinator) and one or more `hv<N>` (hypervisor hosts, each runs an agent).
//!
//! Per host, hypervisors first (the coordinator calls the agents when it starts):
//! 1. connect: checks SSH and whether `sudo` is needed (root logins need none);
//! 2. stage: copies the binary, `vagrant/provision.sh`, `vagrant/files/*` (embedded here, so the
//!    Vagrantfile and deploy install the same units) and the host's configuration into a
//!    private directory on the host;
//! 3. provision: runs `provision.sh <role>` (missing packages, bpffs, directories, units);
//! 4. install: the binary to /usr/local/bin/enforcer, /etc/enforcer/enforcer.env (the token
//!    and where the TLS files are, mode 0600), /etc/enforcer/tls/ (the CA's certificate, the
//!    host's certificate and key: agents serve only, the coordinator serves and is the agents'
//!    client; see `enforcer tls`), /etc/enforcer/net.env (hypervisors) or
//!    /etc/enforcer/hosts.json (coordinator, `https://` agents);
//! 5. start: enables and (re)starts the units;
//! 6. health: `GET /v1/health` over mutual TLS with the token, from the coordinator to every
//!    agent over the underlay (the path the coordinator uses), then the coordinator's own.
//!
//! Addresses on the underlay follow the Vagrantfile: coord = .10 and hvN = .(10+N) of `--net`,
//! unless `--host-ip NAME=IP` says otherwise.

use std::{
    fmt::Write as _,
    fs,
    io::Read as _,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail, ensure};

const PROVISION: &str = include_str!("../../vagrant/provision.sh");
/// `vagrant/files/*`: installed by provision.sh from the staged copy.
const FILES: &[(&str, &str)] = &[
    ("net-up.sh", include_str!("../../vagrant/files/net-up.sh")),
    (
        "enforcer-net.service",
        include_str!("../../vagrant/files/enforcer-net.service"),
    ),
    (
        "enforcer-agent.service",
        include_str!("../../vagrant/files/enforcer-agent.service"),
    ),
    (
        "enforcer-coordinator.service",
        include_str!("../../vagrant/files/enforcer-coordinator.service"),
    ),
];

/// Where each host's files are staged; removed again at the end (it holds the token).
const REMOTE_DIR: &str = "/tmp/enforcer-deploy";
const API_PORT: u16 = 7878;
/// Each host's TLS files (the CA's certificate, its own certificate and key).
const TLS_DIR: &str = "/etc/enforcer/tls";
const BRIDGE: &str = "enfbr0";
const OVERLAY: &str = "enfvx0";
const VNI: u32 = 4242;
const VXLAN_PORT: u16 = 4789;
/// 1500 on the underlay minus VXLAN's 50 bytes of outer headers.
const OVERLAY_MTU: u32 = 1450;
/// Seconds to wait for an agent or the coordinator to answer after (re)starting it.
const HEALTH_WAIT_S: u32 = 30;

pub(crate) struct Options {
    pub ssh_config: Option<PathBuf>,
    pub binary: Option<PathBuf>,
    /// Where the token is (made there when missing).
    pub token_file: PathBuf,
    /// The deployment's CA (made there when missing) and the certificates issued with it.
    pub tls_dir: PathBuf,
    pub dry_run: bool,
    pub net: String,
    pub host_ips: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Coordinator,
    Hypervisor,
}

impl Role {
    /// The argument of provision.sh.
    fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Hypervisor => "hypervisor",
        }
    }

    fn units(self) -> &'static [&'static str] {
        match self {
            Role::Coordinator => &["enforcer-coordinator.service"],
            Role::Hypervisor => &["enforcer-net.service", "enforcer-agent.service"],
        }
    }

    /// The unit whose journal explains a failed health check.
    fn main_unit(self) -> &'static str {
        match self {
            Role::Coordinator => "enforcer-coordinator.service",
            Role::Hypervisor => "enforcer-agent.service",
        }
    }
}

struct Host {
    /// The ssh-config alias.
    name: String,
    role: Role,
    /// Address on the underlay (private network).
    ip: Ipv4Addr,
    /// `sudo -n ` unless the login is root; learnt in the connect step.
    sudo: &'static str,
}

impl Host {
    fn url(&self) -> String {
        format!("https://{}:{API_PORT}", self.ip)
    }
}

/// Runs (or, with `--dry-run`, prints) commands, reporting failures with their host, step and
/// stderr.
struct Runner {
    dry_run: bool,
    ssh_config: PathBuf,
}

impl Runner {
    fn ssh_base(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.ssh_config)
            // Never hang on a password or host-key prompt: fail with a message instead.
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]);
        cmd
    }

    /// `ssh HOST SCRIPT`: the script runs in the login's shell on the host.
    fn ssh(&self, host: &str, script: &str) -> Command {
        let mut cmd = self.ssh_base();
        cmd.arg(host).arg(script);
        cmd
    }

    fn scp(&self, host: &str, sources: &[PathBuf], dest: &str) -> Command {
        let mut cmd = Command::new("scp");
        cmd.arg("-F")
            .arg(&self.ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-q", "-r"])
            .args(sources)
            .arg(format!("{host}:{dest}"));
        cmd
    }

    /// Runs one step; returns its stdout. `None` in a dry run (the command is printed).
    fn step(&self, host: &str, what: &str, mut cmd: Command) -> anyhow::Result<Option<String>> {
        if self.dry_run {
            println!("[{host}] {what}\n    $ {}", display(&cmd));
            return Ok(None);
        }
        println!("[{host}] {what} …");
        let started = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("[{host}] {what}: cannot run {}", display(&cmd)))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!(
                "[{host}] {what} failed ({}).\ncommand: {}\n{}{}",
                out.status,
                display(&cmd),
                tail("stdout", &stdout, 40),
                tail("stderr", &stderr, 40),
            );
        }
        println!(
            "[{host}] {what}: ok ({:.1} s)",
            started.elapsed().as_secs_f64()
        );
        Ok(Some(stdout))
    }
}

/// The last `n` lines of a command's output, labelled; empty if there was none.
fn tail(label: &str, text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let skip = lines.len().saturating_sub(n);
    let mut s = format!("--- {label}");
    if skip > 0 {
        let _ = write!(s, " (last {n} of {} lines)", lines.len());
    }
    s.push_str(" ---\n");
    for line in &lines[skip..] {
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// A command as a shell line (for dry runs and error messages).
fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes for a POSIX shell when needed.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A local directory removed on drop (it holds the token), kept in a dry run for inspection.
struct Staging {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn run(root: &Path, opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let staging = Staging {
        dir: std::env::temp_dir().join(format!("enforcer-deploy.{}", std::process::id())),
        keep: opts.dry_run,
    };
    if staging.dir.exists() {
        fs::remove_dir_all(&staging.dir)
            .with_context(|| format!("removing stale {}", staging.dir.display()))?;
    }
    fs::create_dir(&staging.dir).with_context(|| format!("creating {}", staging.dir.display()))?;
    fs::set_permissions(&staging.dir, fs::Permissions::from_mode(0o700))?;

    // 1. The hosts.
    let vagrant_dir = root.join("vagrant");
    let (ssh_config, from_vagrant) = match &opts.ssh_config {
        Some(path) => (path.clone(), false),
        None => (staging.dir.join("ssh-config"), true),
    };
    let names = if from_vagrant {
        let mut cmd = Command::new("vagrant");
        cmd.arg("ssh-config").current_dir(&vagrant_dir);
        if opts.dry_run {
            println!(
                "[local] ssh config from vagrant (the dry run assumes hosts coord, hv1, hv2)\n    $ (cd {} && vagrant ssh-config > {})",
                vagrant_dir.display(),
                ssh_config.display()
            );
            vec!["coord".to_owned(), "hv1".to_owned(), "hv2".to_owned()]
        } else {
            println!("[local] vagrant ssh-config …");
            let out = cmd.output().with_context(|| {
                format!(
                    "running `vagrant ssh-config` in {} (is vagrant installed? or give --ssh-config FILE)",
                    vagrant_dir.display()
                )
            })?;
            if !out.status.success() {
                bail!(
                    "`vagrant ssh-config` in {} failed ({}); are the machines up (`vagrant up`)? \
                     Or give --ssh-config FILE.\n{}",
                    vagrant_dir.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim_end()
                );
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            fs::write(&ssh_config, &text)?;
            ssh_host_names(&text)
        }
    } else {
        let text = fs::read_to_string(&ssh_config)
            .with_context(|| format!("reading ssh config {}", ssh_config.display()))?;
        ssh_host_names(&text)
    };
    let mut hosts = plan_hosts(&names, &opts.net, &opts.host_ips)?;
    let hypervisors: Vec<&Host> = hosts
        .iter()
        .filter(|h| h.role == Role::Hypervisor)
        .collect();
    println!(
        "[local] hosts ({}): {}",
        ssh_config.display(),
        hosts
            .iter()
            .map(|h| format!("{} {} {}", h.name, h.role.name(), h.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 2. The token, from its file (made when missing): never printed, never on a command line.
    let token = token_from(&opts.token_file, opts.dry_run)?;

    // 3. The binary.
    let binary = match &opts.binary {
        Some(path) => {
            ensure!(
                opts.dry_run || path.is_file(),
                "--binary {}: no such file",
                path.display()
            );
            path.clone()
        }
        None => build_release(root, opts.dry_run)?,
    };

    // 4. What each host gets, staged locally: TLS first (the CA once, every host's
    // certificate afresh, an operator's for the person deploying).
    issue_certificates(&binary, &opts.tls_dir, &hosts, opts.dry_run)?;
    let hosts_json = hosts_json(&hypervisors);
    for host in &hosts {
        let dir = staging.dir.join(&host.name);
        fs::create_dir_all(dir.join("files"))?;
        fs::create_dir_all(dir.join("tls"))?;
        for (from, to) in [
            (opts.tls_dir.join("ca.crt"), "ca.crt"),
            (opts.tls_dir.join(format!("{}.crt", host.name)), "host.crt"),
            (opts.tls_dir.join(format!("{}.key", host.name)), "host.key"),
        ] {
            if opts.dry_run {
                continue;
            }
            fs::copy(&from, dir.join("tls").join(to))
                .with_context(|| format!("staging {}", from.display()))?;
        }
        write_file(&dir.join("provision.sh"), PROVISION, 0o755)?;
        for (name, text) in FILES {
            let mode = if name.ends_with(".sh") { 0o755 } else { 0o644 };
            write_file(&dir.join("files").join(name), text, mode)?;
        }
        write_file(
            &dir.join("enforcer.env"),
            &format!(
                "# written by cargo xtask deploy\nENFORCER_TOKEN={token}\n\
                 ENFORCER_TLS_CERT={TLS_DIR}/host.crt\nENFORCER_TLS_KEY={TLS_DIR}/host.key\n\
                 ENFORCER_TLS_CA={TLS_DIR}/ca.crt\n"
            ),
            0o600,
        )?;
        match host.role {
            Role::Coordinator => write_file(&dir.join("hosts.json"), &hosts_json, 0o644)?,
            Role::Hypervisor => write_file(&dir.join("net.env"), &net_env(host, &hosts), 0o644)?,
        }
        if opts.dry_run {
            println!(
                "[local] would copy {} to {}",
                binary.display(),
                dir.join("enforcer").display()
            );
        } else {
            fs::copy(&binary, dir.join("enforcer")).with_context(|| {
                format!("copying {} into the staging directory", binary.display())
            })?;
        }
    }
    if opts.dry_run {
        println!(
            "[local] staged files, kept for inspection: {}",
            staging.dir.display()
        );
    }

    // 5. Per host, hypervisors first.
    let runner = Runner {
        dry_run: opts.dry_run,
        ssh_config: ssh_config.clone(),
    };
    hosts.sort_by_key(|h| h.role == Role::Coordinator);
    for host in &mut hosts {
        deploy_host(&runner, host, &staging.dir.join(&host.name))?;
    }

    // 6. Health: each agent on its own host, then every agent from the coordinator (the path
    // the coordinator uses), then the coordinator's own API.
    let coord = hosts
        .iter()
        .find(|h| h.role == Role::Coordinator)
        .expect("plan_hosts requires a coordinator");
    // Agents answer only the coordinator's certificate (an agent's own cannot authenticate
    // as a client), so each is checked from the coordinator, over the underlay.
    for hv in hosts.iter().filter(|h| h.role == Role::Hypervisor) {
        check_health(&runner, coord, hv, &hv.url())?;
    }
    check_health(
        &runner,
        coord,
        coord,
        &format!("https://127.0.0.1:{API_PORT}"),
    )?;

    // 7. Clean the staged copies (they hold the token).
    for host in &hosts {
        runner.step(
            &host.name,
            "remove staged files",
            runner.ssh(&host.name, &format!("rm -rf {REMOTE_DIR}")),
        )?;
    }

    if opts.dry_run {
        println!("\ndry run: nothing was run on any host.");
    } else {
        println!(
            "\nenforcer is deployed ({:.0} s).",
            started.elapsed().as_secs_f64()
        );
    }
    let hvs: Vec<&Host> = hosts
        .iter()
        .filter(|h| h.role == Role::Hypervisor)
        .collect();
    let ssh = if from_vagrant {
        "vagrant ssh".to_owned()
    } else {
        format!("ssh -F {}", shell_quote(&ssh_config.to_string_lossy()))
    };
    print_usage(
        coord,
        &hvs,
        &opts.token_file,
        &opts.tls_dir,
        &ssh,
        from_vagrant,
    );
    Ok(())
}

fn deploy_host(runner: &Runner, host: &mut Host, staged: &Path) -> anyhow::Result<()> {
    let name = host.name.clone();

    // connect: who we are there decides whether commands need sudo.
    let who = runner.step(
        &name,
        "connect",
        runner.ssh(
            &name,
            "id -u && uname -r && { command -v systemctl >/dev/null || \
             { echo 'this host has no systemd (systemctl): the units need it' >&2; exit 1; }; }",
        ),
    )?;
    if let Some(out) = who {
        let mut lines = out.lines();
        let uid = lines.next().unwrap_or_default().trim();
        let kernel = lines.next().unwrap_or_default().trim();
        host.sudo = if uid == "0" { "" } else { "sudo -n " };
        println!("[{name}] uid {uid}, kernel {kernel}");
        if host.role == Role::Hypervisor && !kernel_at_least(kernel, 6, 6) {
            println!(
                "[{name}] WARNING: kernel {kernel} < 6.6: the agent attaches with tcx links, \
                 which need 6.6 (the box from `cargo xtask basebox` has bookworm-backports' kernel)"
            );
        }
    } else {
        host.sudo = "sudo -n ";
    }
    let sudo = host.sudo;

    // stage
    runner.step(
        &name,
        "stage: create a private directory",
        runner.ssh(
            &name,
            &format!("rm -rf {REMOTE_DIR} && mkdir -m 0700 {REMOTE_DIR}"),
        ),
    )?;
    let config_file = match host.role {
        Role::Coordinator => "hosts.json",
        Role::Hypervisor => "net.env",
    };
    let sources: Vec<PathBuf> = [
        "enforcer",
        "enforcer.env",
        config_file,
        "provision.sh",
        "files",
        "tls",
    ]
    .iter()
    .map(|f| staged.join(f))
    .collect();
    runner.step(
        &name,
        "stage: copy binary, provision.sh, units, configuration",
        runner.scp(&name, &sources, &format!("{REMOTE_DIR}/")),
    )?;

    // provision
    runner.step(
        &name,
        &format!(
            "provision as {} (installs missing packages: can take minutes the first time)",
            host.role.name()
        ),
        runner.ssh(
            &name,
            &format!(
                "{sudo}bash {REMOTE_DIR}/provision.sh {} {REMOTE_DIR}/files",
                host.role.name()
            ),
        ),
    )?;

    // install: the binary is replaced by a rename, so a running agent keeps its old file and
    // `install` never fails with "Text file busy".
    let config = match host.role {
        Role::Coordinator => {
            format!("install -m 0644 {REMOTE_DIR}/hosts.json /etc/enforcer/hosts.json")
        }
        Role::Hypervisor => format!("install -m 0644 {REMOTE_DIR}/net.env /etc/enforcer/net.env"),
    };
    let script = format!(
        "set -e\n\
         install -m 0755 {REMOTE_DIR}/enforcer /usr/local/bin/enforcer.new\n\
         mv -f /usr/local/bin/enforcer.new /usr/local/bin/enforcer\n\
         install -m 0600 -o root -g root {REMOTE_DIR}/enforcer.env /etc/enforcer/enforcer.env\n\
         install -d -m 0755 {TLS_DIR}\n\
         install -m 0644 {REMOTE_DIR}/tls/ca.crt {REMOTE_DIR}/tls/host.crt {TLS_DIR}/\n\
         install -m 0600 -o root -g root {REMOTE_DIR}/tls/host.key {TLS_DIR}/host.key\n\
         {config}\n\
         # Fails here, not in the unit, if the host lacks a shared library the binary needs.\n\
         /usr/local/bin/enforcer --help >/dev/null\n"
    );
    runner.step(
        &name,
        "install binary and configuration",
        runner.ssh(&name, &format!("{sudo}sh -c {}", shell_quote(&script))),
    )?;

    // start: restart, not just `enable --now`, so that a redeploy runs the new binary; reset a
    // unit that hit its start limit in an earlier deploy.
    let units = host.role.units().join(" ");
    let script = format!(
        "set -e\nsystemctl daemon-reload\nsystemctl enable {units}\n\
         systemctl reset-failed {units}\nsystemctl restart {units}\n"
    );
    let started = runner.step(
        &name,
        &format!("start {units}"),
        runner.ssh(&name, &format!("{sudo}sh -c {}", shell_quote(&script))),
    );
    if let Err(err) = started {
        return Err(with_journal(runner, host, err));
    }
    Ok(())
}

/// `GET {url}/v1/health` with the token, run on `on`, retried while `about` starts up.
fn check_health(runner: &Runner, on: &Host, about: &Host, url: &str) -> anyhow::Result<()> {
    // On the service's own host, a unit that has failed (start limit hit) will not answer:
    // stop waiting at once.
    let give_up = if on.name == about.name {
        let unit = about.role.main_unit();
        format!(
            "if systemctl -q is-failed {unit}; then echo \"{unit} has failed\" >&2; exit 1; fi\n"
        )
    } else {
        String::new()
    };
    // The token is read from the host's env file and handed to curl on stdin (`-H @-`), so it
    // never shows up in a process list.
    let script = format!(
        ". /etc/enforcer/enforcer.env\n\
         i=0\n\
         while :; do\n\
           if out=$(printf \"Authorization: Bearer %s\\n\" \"$ENFORCER_TOKEN\" | curl -sS -f -m 5 --cacert \"$ENFORCER_TLS_CA\" --cert \"$ENFORCER_TLS_CERT\" --key \"$ENFORCER_TLS_KEY\" -H @- {url}/v1/health 2>&1); then\n\
             echo \"$out\"; exit 0\n\
           fi\n\
           {give_up}\
           i=$((i+1))\n\
           if [ $i -ge {HEALTH_WAIT_S} ]; then echo \"$out\" >&2; exit 1; fi\n\
           sleep 1\n\
         done\n"
    );
    let what = if on.name == about.name {
        format!("health of the {} at {url}", about.role.name())
    } else {
        format!(
            "health of {}'s agent at {url}, seen from {}",
            about.name, on.name
        )
    };
    let cmd = runner.ssh(
        &on.name,
        &format!("{}sh -c {}", on.sudo, shell_quote(&script)),
    );
    match runner.step(&on.name, &what, cmd) {
        Ok(Some(body)) => {
            println!("[{}]   {}", on.name, body.trim());
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(err) => Err(with_journal(runner, about, err)),
    }
}

/// Adds the unit's status and recent journal on the host to an error.
fn with_journal(runner: &Runner, host: &Host, err: anyhow::Error) -> anyhow::Error {
    let unit = host.role.main_unit();
    let mut cmd = runner.ssh(
        &host.name,
        &format!(
            "{}sh -c {}",
            host.sudo,
            shell_quote(&format!(
                "systemctl --no-pager status {unit} 2>&1 | head -n 3; journalctl --no-pager -n 15 -u {unit} 2>&1"
            ))
        ),
    );
    let journal = cmd
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(cannot read the journal: {e})"));
    anyhow!(
        "{err:#}\n--- {} on {} ---\n{}",
        unit,
        host.name,
        journal.trim_end()
    )
}

/// The `Host` aliases of an ssh-config (patterns with wildcards or negations are skipped).
fn ssh_host_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        // `Host name` or `Host=name`.
        let (keyword, first) = match keyword.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (keyword, None),
        };
        if !keyword.eq_ignore_ascii_case("host") {
            continue;
        }
        for name in first.into_iter().chain(words) {
            if !name.is_empty()
                && !name.contains(['*', '?', '!'])
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// `hvN` → N.
fn hypervisor_index(name: &str) -> Option<u32> {
    name.strip_prefix("hv")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
}

/// The roles and underlay addresses of the hosts named in the ssh-config.
fn plan_hosts(names: &[String], net: &str, overrides: &[String]) -> anyhow::Result<Vec<Host>> {
    let (base, prefix) = parse_net(net)?;
    let host_bits = 32 - prefix;
    let nth = |n: u32| -> anyhow::Result<Ipv4Addr> {
        ensure!(
            host_bits >= 32 || u64::from(n) < (1u64 << host_bits) - 1,
            "--net {net}: host number {n} does not fit"
        );
        Ok(Ipv4Addr::from(u32::from(base) + n))
    };
    let mut hosts = Vec::new();
    ensure!(
        names.iter().any(|n| n == "coord"),
        "the ssh config names no host `coord` (it has: {})",
        names.join(", ")
    );
    hosts.push(Host {
        name: "coord".into(),
        role: Role::Coordinator,
        ip: nth(10)?,
        sudo: "sudo -n ",
    });
    let mut hvs: Vec<(u32, &String)> = names
        .iter()
        .filter_map(|n| hypervisor_index(n).map(|i| (i, n)))
        .collect();
    hvs.sort();
    ensure!(
        !hvs.is_empty(),
        "the ssh config names no hypervisor host `hv1`, `hv2`, … (it has: {})",
        names.join(", ")
    );
    for (i, name) in hvs {
        hosts.push(Host {
            name: name.clone(),
            role: Role::Hypervisor,
            ip: nth(10 + i)?,
            sudo: "sudo -n ",
        });
    }
    for o in overrides {
        let (name, ip) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("--host-ip {o}: expected NAME=IP"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| anyhow!("--host-ip {o}: {ip} is not an IPv4 address ({e})"))?;
        let host = hosts
            .iter_mut()
            .find(|h| h.name == name)
            .ok_or_else(|| anyhow!("--host-ip {o}: no host {name} among the deployed ones"))?;
        host.ip = ip;
    }
    Ok(hosts)
}

/// `192.168.56.0/24` → (network address, prefix length).
fn parse_net(net: &str) -> anyhow::Result<(Ipv4Addr, u32)> {
    let (addr, prefix) = net
        .split_once('/')
        .ok_or_else(|| anyhow!("--net {net}: expected ADDRESS/PREFIX, e.g. 192.168.56.0/24"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|e| anyhow!("--net {net}: {addr}: {e}"))?;
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 30)
        .ok_or_else(|| anyhow!("--net {net}: the prefix must be 0..=30"))?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ok((Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

fn hosts_json(hypervisors: &[&Host]) -> String {
    // Names are ssh aliases `hvN` (checked by hypervisor_index): nothing to escape.
    let entries: Vec<String> = hypervisors
        .iter()
        .map(|h| {
            format!(
                "  {{\"name\": \"{}\", \"agent\": \"{}\", \"overlay\": \"{OVERLAY}\"}}",
                h.name,
                h.url()
            )
        })
        .collect();
    format!("[\n{}\n]\n", entries.join(",\n"))
}

fn net_env(host: &Host, hosts: &[Host]) -> String {
    let peers: Vec<String> = hosts
        .iter()
        .filter(|h| h.role == Role::Hypervisor && h.name != host.name)
        .map(|h| h.ip.to_string())
        .collect();
    format!(
        "# written by cargo xtask deploy; read by enforcer-net.service (net-up.sh) and the agent\n\
         NET_LOCAL_IP={}\n\
         NET_PEERS=\"{}\"\n\
         NET_BRIDGE={BRIDGE}\n\
         NET_VXLAN={OVERLAY}\n\
         NET_VNI={VNI}\n\
         NET_DSTPORT={VXLAN_PORT}\n\
         NET_MTU={OVERLAY_MTU}\n",
        host.ip,
        peers.join(" ")
    )
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// 32 random bytes from the kernel, as hex.
/// The token in `path`, checked (private to its owner; letters, digits and -._~+/= only: it
/// goes into an HTTP header and an environment file), or a new random one written there 0600
/// (a dry run writes nothing).
fn token_from(path: &Path, dry_run: bool) -> anyhow::Result<String> {
    if !path.exists() {
        let token = random_token()?;
        if dry_run {
            println!("[local] a new token would be written to {}", path.display());
            return Ok(token);
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| writeln!(f, "{token}"))
            .with_context(|| format!("writing the token to {}", path.display()))?;
        println!("[local] a new token in {} (mode 0600)", path.display());
        return Ok(token);
    }
    let mode = fs::metadata(path)?.permissions().mode();
    ensure!(
        mode & 0o077 == 0,
        "token file {} is readable by other accounts (mode {:o}): chmod 600 it",
        path.display(),
        mode & 0o777
    );
    let token = fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned();
    ensure!(
        !token.is_empty()
            && token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c)),
        "token file {}: use letters, digits and -._~+/= only (it goes into an HTTP header and an environment file)",
        path.display()
    );
    Ok(token)
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a token")?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// The deployment's certificates in `dir`, made with the enforcer binary (`enforcer tls`): the
/// CA when there is none yet, each host's certificate (agents serve; the coordinator serves and
/// is the agents' client) for its underlay address, and an operator's (a client) for the person
/// deploying. Keys are 0600.
fn issue_certificates(
    binary: &Path,
    dir: &Path,
    hosts: &[Host],
    dry_run: bool,
) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = Command::new(binary);
        cmd.args(args);
        if dry_run {
            println!("[local] would run\n    $ {}", display(&cmd));
            return Ok(());
        }
        let out = cmd.output().with_context(|| {
            format!(
                "running {} (is it built for this machine?)",
                binary.display()
            )
        })?;
        ensure!(
            out.status.success(),
            "{}: {}",
            display(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    let dir_arg = dir.to_string_lossy().into_owned();
    if !dir.join("ca.crt").exists() {
        run(&["tls", "ca", "--dir", &dir_arg])?;
        if !dry_run {
            println!("[local] a new CA in {dir_arg} (its key stays here, never on the hosts)");
        }
    }
    for host in hosts {
        let ip = host.ip.to_string();
        let (role, mut addresses) = match host.role {
            Role::Hypervisor => ("agent", vec![ip]),
            // Its own health check and CLI reach it on loopback too.
            Role::Coordinator => ("coordinator", vec![ip, "127.0.0.1".into()]),
        };
        let mut args = vec![
            "tls", "cert", "--dir", &dir_arg, "--name", &host.name, "--role", role,
        ];
        for a in &mut addresses {
            args.extend(["--address", a.as_str()]);
        }
        run(&args)?;
    }
    run(&[
        "tls", "cert", "--dir", &dir_arg, "--name", "operator", "--role", "operator",
    ])
}

fn build_release(root: &Path, dry_run: bool) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--package", "enforcer"])
        .current_dir(root);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("release/enforcer");
    if dry_run {
        println!("[local] build\n    $ {}", display(&cmd));
        return Ok(binary);
    }
    println!("[local] {} …", display(&cmd));
    let status = cmd.status().context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build --release -p enforcer failed ({status})"
    );
    ensure!(
        binary.is_file(),
        "cargo build succeeded but {} is missing",
        binary.display()
    );
    Ok(binary)
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

fn print_usage(
    coord: &Host,
    hvs: &[&Host],
    token_file: &Path,
    tls_dir: &Path,
    ssh: &str,
    from_vagrant: bool,
) {
    let token = shell_quote(&token_file.to_string_lossy());
    let tls = |f: &str| shell_quote(&tls_dir.join(f).to_string_lossy());
    let (ca, op_crt, op_key) = (tls("ca.crt"), tls("operator.crt"), tls("operator.key"));
    let api = coord.url();
    let domains: Vec<String> = hvs
        .iter()
        .cycle()
        .take(2)
        .enumerate()
        .map(|(i, h)| format!("vm{}@{}", i + 1, h.name))
        .collect();
    let json_domains = domains
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(",");
    let cli_domains = domains.join(" ");
    println!(
        "\ncoordinator: {api}\nagents:      {}\ntoken:       in {token} (mode 0600; also in /etc/enforcer/enforcer.env on every host)\n\
         TLS:         every API requires a client certificate of the CA {ca}; yours is {op_crt}",
        hvs.iter()
            .map(|h| format!("{} {}", h.name, h.url()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "\nDefine a group of libvirt domains running on the hypervisors (NAME@HOST), take a snapshot, \
         and look at it:\n\
         \n  auth() {{ printf 'Authorization: Bearer %s\\n' \"$(cat {token})\"; }}   # the header on stdin, not in argv\
         \n  tls=(--cacert {ca} --cert {op_crt} --key {op_key})\
         \n  auth | curl -sS \"${{tls[@]}}\" -H @- -H 'Content-Type: application/json' \\\
         \n       -d '{{\"name\":\"web\",\"domains\":[{json_domains}]}}' {api}/v1/groups\
         \n  auth | curl -sS \"${{tls[@]}}\" -X POST -H @- {api}/v1/groups/web/snapshots\
         \n  auth | curl -sS \"${{tls[@]}}\" -H @- {api}/v1/snapshots/ID    # ID from the 202 answer\
         \n\nor with the CLI:\
         \n\n  export ENFORCER_API={api} ENFORCER_TOKEN_FILE={token} ENFORCER_TLS_CA={ca} ENFORCER_TLS_CERT={op_crt} ENFORCER_TLS_KEY={op_key}\
         \n  enforcer group define web {cli_domains}\
         \n  enforcer snapshot create --group web --wait"
    );
    println!("\nEpoch maps on each hypervisor host:\n");
    for hv in hvs {
        let cmd = "sudo bpftool map dump pinned /sys/fs/bpf/enforcer/epochs";
        if from_vagrant {
            println!("  {ssh} {} -c '{cmd}'", hv.name);
        } else {
            println!("  {ssh} {} '{cmd}'", hv.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_config_hosts() {
        let text = "Host coord\n  HostName 192.168.121.5\nHost hv1\n  User vagrant\nHost=hv2\nHost *\n  LogLevel FATAL\n";
        assert_eq!(ssh_host_names(text), ["coord", "hv1", "hv2"]);
    }

    #[test]
    fn addresses_follow_the_convention() {
        let names: Vec<String> = ["hv2", "coord", "hv1", "other"].map(String::from).into();
        let hosts = plan_hosts(&names, "192.168.56.0/24", &["hv2=10.0.0.7".into()]).unwrap();
        let got: Vec<(String, String)> = hosts
            .iter()
            .map(|h| (h.name.clone(), h.ip.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("coord".into(), "192.168.56.10".into()),
                ("hv1".into(), "192.168.56.11".into()),
                ("hv2".into(), "10.0.0.7".into()),
            ]
        );
        assert!(plan_hosts(&names, "192.168.56.0/24", &["hv9=1.2.3.4".into()]).is_err());
        assert!(plan_hosts(&["hv1".into()], "192.168.56.0/24", &[]).is_err());
    }

    /// The coordinator reaches the agents over TLS on their underlay addresses (it refuses
    /// `http://` agents once TLS is configured, which deploy always does).
    #[test]
    fn the_agents_are_named_https_on_the_underlay() {
        let names: Vec<String> = ["coord", "hv1", "hv2"].map(String::from).into();
        let hosts = plan_hosts(&names, "192.168.56.0/24", &[]).unwrap();
        let hvs: Vec<&Host> = hosts
            .iter()
            .filter(|h| h.role == Role::Hypervisor)
            .collect();
        let json = hosts_json(&hvs);
        for ip in ["192.168.56.11", "192.168.56.12"] {
            assert!(
                json.contains(&format!("\"agent\": \"https://{ip}:7878\"")),
                "{json}"
            );
        }
        assert!(!json.contains("http://"), "{json}");
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.12.38+deb12-amd64", 6, 6));
        assert!(!kernel_at_least("6.1.0-37-amd64", 6, 6));
        assert!(kernel_at_least("6.18.44-fc-v669", 6, 6));
    }
}
