//! The command line's dispatch: each command is one call (the daemon roles, or the API's
//! client) and one thing printed.

use anyhow::Context as _;

use super::{
    Cli, Command, EpochCommand, GroupCommand, SnapshotCommand, TlsCommand, VmCommand, render,
};
use crate::{
    agent::SnapshotOptions,
    api::{
        client::Client,
        pki,
        tls::{ClientTls, TlsFiles},
    },
    daemon::{self, CoordinatorConfig, DaemonConfig},
    datapath::{self, ports::PortSource},
    hold::HoldOptions,
    multihost,
    snapshot::{SnapshotOutcome, Timeouts},
};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(cli))
}

/// The bearer token: from `--token-file` (which must be private to its owner), or from
/// `ENFORCER_TOKEN`.
fn token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(file) = file else {
        return Ok(std::env::var("ENFORCER_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()));
    };
    let mode = std::fs::metadata(file)
        .with_context(|| format!("token file {}", file.display()))?
        .permissions()
        .mode();
    anyhow::ensure!(
        mode & 0o077 == 0,
        "token file {} is readable by other accounts (mode {:o}): chmod 600 {0}",
        file.display(),
        mode & 0o777
    );
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the token file {}", file.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", file.display());
    Ok(Some(token.to_owned()))
}

async fn run_async(cli: Cli) -> anyhow::Result<()> {
    let token = token(cli.token_file.as_deref())?;
    let tls = match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        _ => None,
    };
    let client_tls = tls
        .as_ref()
        .map(ClientTls::from_files)
        .transpose()
        .context("the TLS files")?;
    let client = Client::with_tls(&cli.api, token.clone(), client_tls.as_ref());
    match cli.command {
        Command::Run(args) => {
            let ports = if args.bridge.is_empty() {
                PortSource::Named(args.port)
            } else {
                PortSource::Bridges(args.bridge)
            };
            let running = daemon::start(DaemonConfig {
                ports,
                pin_root: args.pin_root,
                attach: args.attach,
                listen: args.listen,
                token: token.clone(),
                api_group: args.api_group,
                tls: tls.clone(),
                type3_mode: args.mode,
                hold: (!args.no_buffer).then_some(HoldOptions {
                    device: args.hold_device,
                    max_bytes: args.hold_max_mib << 20,
                    ..Default::default()
                }),
                snapshots: (!args.no_libvirt).then(|| SnapshotOptions {
                    uri: args.libvirt_uri,
                    store: args.store,
                    ..SnapshotOptions::default()
                }),
            })
            .await?;
            running.wait_for_signal().await?;
        }
        Command::Coordinator(args) => {
            let hosts = multihost::load(&args.hosts)?;
            let running = daemon::start_coordinator(CoordinatorConfig {
                hosts,
                listen: args.listen,
                token,
                api_group: args.api_group,
                tls: tls.clone(),
                store: args.store,
                timeouts: Timeouts::default(),
            })
            .await?;
            running.wait_for_signal().await?;
        }
        Command::Vm(VmCommand::Add {
            mac,
            group,
            port,
            epoch,
        }) => {
            let vm = client.register_vm(mac, group, port.as_str(), epoch).await?;
            println!(
                "registered {} in group {} at epoch {} (ifindex {})",
                vm.mac, vm.group, vm.epoch, vm.ifindex
            );
        }
        Command::Vm(VmCommand::Rm { mac }) => {
            let vm = client.unregister_vm(mac).await?;
            println!("unregistered {}", vm.mac);
        }
        Command::Vm(VmCommand::Ls) | Command::Epoch(EpochCommand::Get { mac: None }) => {
            print!("{}", render::vms(&client.vms().await?));
        }
        Command::Epoch(EpochCommand::Get { mac: Some(mac) }) => {
            println!("{}", client.vm(mac).await?.epoch);
        }
        Command::Epoch(EpochCommand::Set { mac, epoch }) => {
            let vm = client.set_epoch(mac, epoch).await?;
            println!("{} at epoch {}", vm.mac, vm.epoch);
        }
        Command::Epoch(EpochCommand::Advance { mac }) => {
            let vm = client.advance(mac).await?;
            println!("{} at epoch {}", vm.mac, vm.epoch);
        }
        Command::Groups => print!("{}", render::groups(&client.groups().await?)),
        Command::Group(GroupCommand::Define { name, domains, id }) => {
            let g = client.define_group(name.as_str(), id, &domains).await?;
            println!("group {} (id {}) defined:", g.name, g.id);
            for vm in &g.vms {
                println!("  {:<20} {}", vm.name, vm.mac);
            }
        }
        Command::Group(GroupCommand::Rm { name }) => {
            let g = client.remove_group(name.as_str()).await?;
            println!(
                "group {} removed ({} VMs left the datapath)",
                g.name,
                g.vms.len()
            );
        }
        Command::Snapshot(SnapshotCommand::Create {
            group,
            wait,
            method,
        }) => {
            let started = client.create_snapshot(group.as_str(), method).await?;
            println!(
                "snapshot {} of group {group} started ({method})",
                started.id
            );
            if wait {
                let m = client
                    .wait_snapshot(&started.id, |m| println!("  {}", render::progress(m)))
                    .await?;
                print!("{}", render::manifest(&m));
                anyhow::ensure!(
                    m.outcome == SnapshotOutcome::Committed,
                    "snapshot {} aborted",
                    m.id
                );
            }
        }
        Command::Snapshot(SnapshotCommand::Ls { group }) => {
            print!(
                "{}",
                render::snapshots(&client.snapshots(group.as_ref().map(|g| g.as_str())).await?)
            );
        }
        Command::Snapshot(SnapshotCommand::Show { id, json }) => {
            let m = client.snapshot(id.as_str()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", render::manifest(&m));
            }
        }
        Command::Snapshot(SnapshotCommand::Restore {
            id,
            bridge,
            skip_channel_state,
        }) => {
            let bridge = bridge.as_ref().map(|b| b.as_str());
            let restored = client
                .restore_with(id.as_str(), bridge, !skip_channel_state)
                .await?;
            print!("{}", render::restored(&restored));
        }
        Command::Snapshot(SnapshotCommand::Rm { id }) => {
            let m = client.delete_snapshot(id.as_str()).await?;
            println!("deleted {}", m.id);
        }
        Command::Ports => print!("{}", render::ports(&client.ports().await?)),
        Command::Tls(TlsCommand::Ca { dir }) => {
            let crt = pki::new_ca(&dir)?;
            println!(
                "CA {} (its key beside it, mode 0600: keep it off the hosts)",
                crt.display()
            );
        }
        Command::Tls(TlsCommand::Cert {
            dir,
            name,
            role,
            addresses,
        }) => {
            let (crt, key) = pki::issue(&dir, &name, role, &addresses)?;
            println!("{} and {} ({role:?})", crt.display(), key.display());
        }
        Command::Stats { json } => {
            let stats = client.stats().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                // The buffer's part, when one runs.
                let holds = client.holds().await.ok();
                print!("{}", render::stats(&stats, holds.as_ref()));
            }
        }
        Command::Holds { json } => {
            let report = client.holds().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render::holds(&report));
            }
        }
        Command::Abort { group, epoch } => {
            let vms = client.abort(group, epoch).await?;
            println!(
                "group {group} back at epoch {epoch} ({} VMs rolled back); held frames delivered",
                vms.len()
            );
        }
        Command::Mode { mode: None } => println!("{}", client.config().await?.type3_mode),
        Command::Mode { mode: Some(mode) } => {
            println!("{}", client.set_mode(mode).await?.type3_mode);
        }
        Command::Teardown { pin_root } => {
            if datapath::teardown(&pin_root)
                .with_context(|| format!("removing {}", pin_root.display()))?
            {
                println!(
                    "removed {} (programs detached, maps freed)",
                    pin_root.display()
                );
            } else {
                println!("nothing pinned at {}", pin_root.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::token;

    /// Secrets come from files private to their owner, never from the command line.
    #[test]
    fn a_token_file_must_be_private() {
        let dir = std::env::temp_dir().join(format!("enforcer-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = token(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(token(Some(&file)).unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&file, "  \n").unwrap();
        assert!(token(Some(&file)).is_err(), "an empty token is refused");
        assert!(token(Some(&dir.join("missing"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
