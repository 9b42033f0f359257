//! Tier 0 of the HTTP edge: the agent's router served on loopback in this process over a
//! datapath of plain tables (no root, no BPF), driven by the real client and by raw requests;
//! the snapshot routes over the fake hypervisor. Statuses and error codes are checked.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use enforcer_common::Type3Mode;

use super::{client::Client, types::ErrorCode};
use crate::{
    agent::{Agent, datapath::memory::MemoryDatapath},
    api::client::ClientError,
    model::{MacAddr, VmSpec},
    snapshot::{
        Coordinator, CutMethod, EpochControl, Hypervisor, SnapshotOutcome, Timeouts,
        fake::FakeHypervisor,
    },
};

const VM1: MacAddr = MacAddr([2, 0, 0x5e, 0x10, 0, 1]);
const VM2: MacAddr = MacAddr([2, 0, 0x5e, 0x10, 0, 2]);

/// The agent's API on an ephemeral loopback port; stops when dropped.
struct Served {
    agent: Arc<Agent<MemoryDatapath>>,
    client: Client,
    base: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn serve(token: Option<&str>) -> Served {
    let dp = MemoryDatapath::with_ports(&["vnet0", "vnet1", "vnet2"]);
    let agent = Arc::new(Agent::new(
        Arc::new(Mutex::new(dp)),
        None,
        Arc::new(AtomicU64::new(0)),
    ));
    let app = super::router::router(agent.clone(), token.map(str::to_owned));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // The daemons' own server (limits included), not a stand-in.
    tokio::spawn(async move {
        super::serve::serve(
            super::serve::Listener::Tcp {
                listener,
                tls: None,
            },
            app,
            stopped,
        )
        .await
        .unwrap();
    });
    let base = format!("http://{addr}");
    Served {
        agent,
        client: Client::new(base.clone(), token.map(str::to_owned)),
        base,
        _stop: stop,
    }
}

/// A coordinator over the fake hypervisor, for the snapshot routes.
fn fake_snapshots(vms: &[(&str, MacAddr)]) -> (Arc<crate::snapshot::Snapshots>, PathBuf) {
    let specs: Vec<VmSpec> = vms
        .iter()
        .map(|(n, m)| VmSpec {
            name: (*n).into(),
            mac: *m,
        })
        .collect();
    let hv = FakeHypervisor::new(&specs);
    let store = std::env::temp_dir().join(format!(
        "enforcer-api-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&store);
    let timeouts = Timeouts {
        pause: Duration::from_millis(500),
        complete: Duration::from_millis(500),
    };
    let c = Coordinator::open(
        Arc::new(hv.clone()) as Arc<dyn Hypervisor>,
        Arc::new(hv.epochs()) as Arc<dyn EpochControl>,
        &store,
        timeouts,
    )
    .unwrap();
    (Arc::new(c), store)
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, ErrorCode) {
    let e = r.unwrap_err();
    (e.status().map_or(0, |s| s.as_u16()), e.code().unwrap())
}

/// A raw request: (status, body).
async fn raw(
    method: reqwest::Method,
    url: String,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn vm_routes_register_move_and_refuse_with_their_codes() {
    let s = serve(None).await;
    let c = &s.client;
    let vm = c.register_vm(VM1, 1, "vnet0", Some(3)).await.unwrap();
    assert_eq!((vm.epoch, vm.ifindex), (3, 10));
    assert_eq!(
        code(c.register_vm(VM1, 1, "vnet1", None).await),
        (409, ErrorCode::AlreadyRegistered),
        "MAC twice"
    );
    assert_eq!(
        code(c.register_vm(VM2, 1, "vnet0", None).await),
        (409, ErrorCode::PortTaken),
        "port twice"
    );
    assert_eq!(
        code(c.register_vm(VM2, 1, "nosuchport0", None).await),
        (400, ErrorCode::UnknownInterface)
    );
    assert_eq!(
        code(c.register_vm(VM2, 1, "lo", None).await),
        (409, ErrorCode::PortNotAttached)
    );
    assert_eq!(
        code(c.register_vm(VM2, 1, "no such/port", None).await),
        (400, ErrorCode::BadRequest),
        "not an interface name at all"
    );
    assert_eq!(
        code(c.register_vm(MacAddr([0xff; 6]), 1, "vnet1", None).await),
        (400, ErrorCode::BadMac)
    );
    assert_eq!(
        code(c.register_vm(VM2, 5000, "vnet1", None).await),
        (400, ErrorCode::BadGroup)
    );
    assert_eq!(
        code(c.set_epoch(VM1, 2).await),
        (409, ErrorCode::EpochBackwards)
    );
    assert_eq!(code(c.advance(VM2).await), (404, ErrorCode::UnknownVm));
    assert_eq!(
        c.vm(VM1).await.unwrap().epoch,
        3,
        "refused requests changed nothing"
    );
    // A new member joins at the group's epoch; an advance moves one epoch.
    assert_eq!(c.register_vm(VM2, 1, "vnet1", None).await.unwrap().epoch, 3);
    assert_eq!(c.advance(VM2).await.unwrap().epoch, 4);
    assert_eq!(c.raise_epoch(VM2, 2).await.unwrap().epoch, 4, "raise only");
    let groups = c.groups().await.unwrap();
    assert_eq!(
        (groups[0].record.min_epoch, groups[0].record.max_epoch),
        (3, 4)
    );
    // An abort goes back, and says which group it did not find.
    assert_eq!(c.abort(1, 3).await.unwrap().len(), 1);
    assert_eq!(c.vm(VM2).await.unwrap().epoch, 3);
    assert_eq!(code(c.abort(9, 0).await), (404, ErrorCode::UnknownGroup));
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/groups/x/abort", s.base),
        Some(r#"{"epoch":0}"#),
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_group")));
    // A view of a VM on another host is registered with its epoch, and needs one.
    let view = c
        .register_remote_vm(MacAddr([2, 9, 9, 9, 9, 9]), 1, "vnet2", 3)
        .await
        .unwrap();
    assert!(view.remote && view.epoch == 3, "{view:?}");
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/vms", s.base),
        Some(r#"{"mac":"02:09:09:09:09:08","group":1,"port":"vnet2","remote":true}"#),
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    // Unregistering frees the port.
    c.unregister_vm(VM2).await.unwrap();
    assert_eq!(
        code(c.unregister_vm(VM2).await),
        (404, ErrorCode::UnknownVm)
    );
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let s = serve(None).await;
    let (status, body) = raw(
        reqwest::Method::GET,
        format!("{}/v1/vms/not-a-mac", s.base),
        None,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("bad MAC address"),
        "{body}"
    );
    assert_eq!(body["code"], "bad_request");
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/vms", s.base),
        Some("{nope"),
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, body) = raw(
        reqwest::Method::PUT,
        format!("{}/v1/config", s.base),
        Some(r#"{"type3_mode":"sometimes"}"#),
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    for (method, path, body, want) in [
        (
            reqwest::Method::DELETE,
            "/v1/stats",
            None,
            (405, "method_not_allowed"),
        ),
        (
            reqwest::Method::DELETE,
            "/v1/groups/my%20group",
            None,
            (400, "bad_group"),
        ),
        (
            reqwest::Method::POST,
            "/v1/groups/abc/abort",
            Some(r#"{"epoch":0}"#),
            (400, "bad_group"),
        ),
    ] {
        let (status, got) = raw(method, format!("{}{path}", s.base), body, None).await;
        assert_eq!(
            (status, got["code"].as_str()),
            (want.0, Some(want.1)),
            "{path}"
        );
    }
    let (status, body) = raw(
        reqwest::Method::GET,
        format!("{}/v1/nothing", s.base),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("no_such_endpoint"))
    );
}

#[tokio::test]
async fn a_token_is_required_when_set() {
    let s = serve(Some("sesame")).await;
    let url = format!("{}/v1/health", s.base);
    let (status, body) = raw(reqwest::Method::GET, url.clone(), None, None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = raw(reqwest::Method::GET, url.clone(), None, Some("open")).await;
    assert_eq!(status, 401, "a wrong token");
    let health = s.client.health().await.unwrap();
    assert_eq!((health.status.as_str(), health.ports), ("ok", 3));
}

#[tokio::test]
async fn the_agents_own_state_config_and_metrics() {
    let s = serve(None).await;
    let c = &s.client;
    assert_eq!(c.config().await.unwrap().type3_mode, Type3Mode::Buffer);
    assert_eq!(
        c.set_mode(Type3Mode::Drop).await.unwrap().type3_mode,
        Type3Mode::Drop
    );
    assert_eq!(
        s.agent.mode().unwrap(),
        Type3Mode::Drop,
        "the datapath has it"
    );
    assert_eq!(c.ports().await.unwrap().len(), 3);
    assert_eq!(code(c.holds().await), (409, ErrorCode::NoBuffer));
    c.register_vm(VM1, 1, "vnet0", Some(3)).await.unwrap();
    let metrics = c.metrics().await.unwrap();
    assert!(
        metrics.contains("enforcer_vm_epoch{mac=\"02:00:5e:10:00:01\",group=\"1\"} 3"),
        "{metrics}"
    );
    assert!(c.stats().await.unwrap().is_empty(), "no counters yet");
}

#[tokio::test]
async fn snapshot_routes_say_why_when_snapshots_are_off() {
    let s = serve(None).await;
    let c = &s.client;
    // Bad input is a 400 before anything else; then a 503 that says why.
    assert_eq!(
        code(c.restore("g-1-e1", Some("br0'/><disk")).await),
        (400, ErrorCode::BadRequest)
    );
    assert_eq!(
        code(c.snapshot(".hidden").await),
        (400, ErrorCode::BadRequest)
    );
    assert_eq!(
        code(c.define_group("web", None, &[]).await),
        (503, ErrorCode::SnapshotsOff)
    );
    let off = c.snapshots(None).await.unwrap_err();
    assert!(off.to_string().contains("--no-libvirt"), "{off}");
    assert_eq!(
        code(c.domain_nic("vm1").await),
        (503, ErrorCode::SnapshotsOff)
    );
}

#[tokio::test]
async fn snapshot_routes_run_a_group_snapshot_and_restore_it() {
    let s = serve(None).await;
    let (snapshots, store) = fake_snapshots(&[("vm1", VM1), ("vm2", VM2)]);
    s.agent.set_snapshots(snapshots);
    let c = &s.client;
    let domains = vec!["vm1".to_owned(), "vm2".to_owned()];
    let g = c.define_group("web", None, &domains).await.unwrap();
    assert_eq!((g.name.as_str(), g.vms.len()), ("web", 2));
    assert_eq!(
        code(c.define_group("web", None, &domains).await),
        (409, ErrorCode::GroupExists)
    );
    assert_eq!(
        code(c.define_group("bad name!", None, &domains).await),
        (400, ErrorCode::BadGroup)
    );
    assert_eq!(
        code(c.define_group("other", None, &["ghost".to_owned()]).await),
        (404, ErrorCode::NoSuchDomain)
    );
    assert_eq!(
        code(c.create_snapshot("nope", CutMethod::Instant).await),
        (404, ErrorCode::UnknownGroup)
    );
    // A method that does not exist is refused before anything starts.
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/groups/web/snapshots", s.base),
        Some(r#"{"method":"fast"}"#),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // Pre-copy when asked for; instant without a body.
    let started = c.create_snapshot("web", CutMethod::PreCopy).await.unwrap();
    let m = c.wait_snapshot(started.id.as_str(), |_| {}).await.unwrap();
    assert_eq!(m.method, CutMethod::PreCopy);
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/groups/web/snapshots", s.base),
        None,
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let m = c
        .wait_snapshot(body["id"].as_str().unwrap(), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (m.outcome, m.method),
        (SnapshotOutcome::Committed, CutMethod::Instant),
        "{m:?}"
    );
    assert!(m.stop_spread_ms.is_some());
    assert_eq!(c.snapshots(Some("web")).await.unwrap().len(), 2);
    assert!(c.snapshots(Some("other")).await.unwrap().is_empty());
    assert_eq!(
        code(c.snapshot("web-1-e9").await),
        (404, ErrorCode::UnknownSnapshot)
    );
    // Not over running VMs: they go first (as a user destroys them), then the restore.
    assert_eq!(
        code(c.restore(m.id.as_str(), None).await),
        (409, ErrorCode::DomainRunning)
    );
    assert_eq!(
        c.domain_state("vm1").await.unwrap(),
        crate::snapshot::DomainState::Running
    );
    for (name, mac) in [("vm1", VM1), ("vm2", VM2)] {
        let vm = VmSpec {
            name: name.into(),
            mac,
        };
        c.domain_destroy(&vm).await.unwrap();
    }
    assert_eq!(
        c.domain_state("vm1").await.unwrap(),
        crate::snapshot::DomainState::Absent
    );
    let r = c.restore(m.id.as_str(), None).await.unwrap();
    assert_eq!((r.epoch, r.vms.len()), (2, 2));
    c.delete_snapshot(m.id.as_str()).await.unwrap();
    assert_eq!(
        code(c.delete_snapshot(m.id.as_str()).await),
        (404, ErrorCode::UnknownSnapshot)
    );
    c.remove_group("web").await.unwrap();
    assert_eq!(
        code(c.remove_group("web").await),
        (404, ErrorCode::UnknownGroup)
    );
    let _ = std::fs::remove_dir_all(store);
}

/// Case S10 of the security review: during a snapshot of group 1, `enforcer abort --group 1
/// --epoch 0` (or an epoch set, a VM removed or registered) changed the group under the
/// coordinator, which then committed an inconsistent snapshot. While a named group is held,
/// those raw changes are refused with 409 `busy`, and allowed again once it is free.
#[tokio::test]
async fn raw_changes_to_a_group_held_by_a_snapshot_are_refused() {
    let s = serve(None).await;
    let (snapshots, store) = fake_snapshots(&[("vm1", VM1), ("vm2", VM2)]);
    s.agent.set_snapshots(snapshots.clone());
    let c = &s.client;
    let g = c
        .define_group("web", None, &["vm1".to_owned(), "vm2".to_owned()])
        .await
        .unwrap();
    c.register_vm(VM1, g.id, "vnet0", Some(0)).await.unwrap();
    let web: crate::model::GroupName = "web".parse().unwrap();
    let claim = snapshots.claim(&web, "snapshot web-1-e1").unwrap();
    let busy = (409, ErrorCode::Busy);
    assert_eq!(code(c.advance(VM1).await), busy);
    assert_eq!(code(c.set_epoch(VM1, 5).await), busy);
    assert_eq!(code(c.unregister_vm(VM1).await), busy);
    assert_eq!(code(c.register_vm(VM2, g.id, "vnet1", Some(0)).await), busy);
    assert_eq!(code(c.abort(g.id, 0).await), busy);
    let err = c.advance(VM1).await.unwrap_err().to_string();
    assert!(err.contains("snapshot web-1-e1"), "{err}");
    assert_eq!(c.vm(VM1).await.unwrap().epoch, 0, "nothing changed");
    // A VM of no held group is not held.
    let other = MacAddr([2, 0, 0x5e, 0x10, 0, 3]);
    c.register_vm(other, g.id + 1, "vnet1", Some(0))
        .await
        .unwrap();
    assert_eq!(c.advance(other).await.unwrap().epoch, 1);
    drop(claim);
    assert_eq!(c.advance(VM1).await.unwrap().epoch, 1, "free again");
    let _ = std::fs::remove_dir_all(store);
}

#[tokio::test]
async fn domain_steps_are_typed() {
    let s = serve(None).await;
    let (snapshots, store) = fake_snapshots(&[("vm1", VM1)]);
    s.agent.set_snapshots(snapshots);
    let vm = VmSpec {
        name: "vm1".into(),
        mac: VM1,
    };
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/domains/vm1/hibernate", s.base),
        Some(r#"{"mac":"02:00:5e:10:00:01"}"#),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("no_such_operation"))
    );
    assert_eq!(
        code(
            s.client
                .domain_advance_at_pause(&vm, Duration::from_millis(10))
                .await
        ),
        (409, ErrorCode::NotBegun)
    );
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/domains/vm1/begin", s.base),
        Some(r#"{"mac":"02:00:5e:10:00:01"}"#),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "no snapshot id"
    );
    // A snapshot id is never a path, nor one of the store's own entries (case S9).
    for id in ["../etc", "groups.json", "journals", "a.b"] {
        let (status, _) = raw(
            reqwest::Method::POST,
            format!("{}/v1/domains/vm1/begin", s.base),
            Some(&format!(
                r#"{{"mac":"02:00:5e:10:00:01","snapshot":"{id}"}}"#
            )),
            None,
        )
        .await;
        assert_eq!(status, 400, "{id}");
    }
    assert!(
        !store.join("groups.json").is_dir(),
        "nothing made in the store"
    );
    assert_eq!(
        code(s.client.domain_nic("ghost").await),
        (404, ErrorCode::NoSuchDomain)
    );
    let (mac, port) = s.client.domain_nic("vm1").await.unwrap();
    assert_eq!((mac, port.as_str()), (VM1, "tap-vm1"));
    // Names as libvirt allows them reach their route as themselves (case S22): before, `#`
    // began a fragment and `/` another segment.
    for odd in ["a b", "x#y", "q?r=1", "p/q", "100%"] {
        assert_eq!(
            s.client.domain_state(odd).await.unwrap(),
            crate::snapshot::DomainState::Absent,
            "{odd}"
        );
    }
    // A restore takes one snapshot's files (case S4): a memory image of one snapshot with the
    // disk list of another is refused before anything is touched.
    let (one, other) = (store.join("g-1-e1"), store.join("g-2-e2"));
    for dir in [&one, &other] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(one.join("vm1.save"), b"image").unwrap();
    std::fs::write(other.join("vm1.captures.json"), b"[]").unwrap();
    let (status, body) = raw(
        reqwest::Method::POST,
        format!("{}/v1/domains/vm1/restore", s.base),
        Some(&format!(
            r#"{{"mac":"02:00:5e:10:00:01","images":["{}","{}"]}}"#,
            one.join("vm1.save").display(),
            other.join("vm1.captures.json").display()
        )),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("not_its_image")),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(store);
}

/// Case S7 of the security review: a client that sends part of a request head and then
/// nothing (or a kept-alive connection left idle) is cut off after the header timeout, so it
/// cannot keep a descriptor of the daemon's for ever (before: axum served without a timer, and
/// hyper's timeout was ignored).
#[tokio::test]
async fn a_trickled_request_head_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = serve(None).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let limit = super::serve::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, slow.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the connection was still open after {limit:?}: {read:?}"
    );
    // The daemon still serves everyone else.
    assert_eq!(s.client.health().await.unwrap().status, "ok");
}

/// Case S7: connections beyond the cap wait in the listen backlog instead of taking one
/// descriptor each; the daemon never holds more than `MAX_CONNECTIONS`, and a waiting client
/// is served once idle ones time out.
#[tokio::test]
async fn connections_beyond_the_cap_wait_and_are_served_later() {
    use super::serve::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
    use tokio::io::AsyncWriteExt as _;
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let s = serve(None).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let before = fds();
    let extra = 40;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + extra {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /v1/health HTTP/1.1\r\n").await.unwrap();
        idle.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Our own client ends are in this process too: one each; the server's ends at most the cap.
    let server_side = fds() - before - idle.len();
    assert!(
        server_side <= MAX_CONNECTIONS + 4,
        "the server holds {server_side} descriptors for {} connections (cap {MAX_CONNECTIONS})",
        idle.len()
    );
    // A real client gets its answer once the idle ones are cut off.
    let answered = tokio::time::timeout(
        HEADER_READ_TIMEOUT * 2 + Duration::from_secs(5),
        s.client.health(),
    )
    .await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "no answer with the cap full of idle connections: {answered:?}"
    );
}

/// Case S6 of the security review: between hosts the API is TLS with client certificates of
/// the deployment's CA, made by `enforcer tls` (`api::pki`). The coordinator's and an
/// operator's certificates get in; no certificate, an agent's (serving only: a host taken over
/// cannot drive its peers with it), another CA's, or plain HTTP do not; a client that trusts
/// another CA refuses the server.
#[tokio::test]
async fn tls_between_hosts_admits_only_client_certificates_of_the_ca() {
    use super::{
        Endpoint,
        pki::{self, Role},
        tls::{ClientTls, TlsFiles},
    };
    let dir = std::env::temp_dir().join(format!("enforcer-tls-{}", std::process::id()));
    let other = dir.join("other");
    let _ = std::fs::remove_dir_all(&dir);
    let ca = pki::new_ca(&dir).unwrap();
    assert!(matches!(pki::new_ca(&dir), Err(pki::PkiError::CaExists(_))));
    let local = ["127.0.0.1".to_owned()];
    let issue =
        |dir: &std::path::Path, name: &str, role| pki::issue(dir, name, role, &local).unwrap();
    let (agent_crt, agent_key) = issue(&dir, "agent", Role::Agent);
    let (coord_crt, coord_key) = issue(&dir, "coord", Role::Coordinator);
    let (op_crt, op_key) = issue(&dir, "op", Role::Operator);
    let (peer_crt, peer_key) = issue(&dir, "peer", Role::Agent);
    let other_ca = pki::new_ca(&other).unwrap();
    let (stranger_crt, stranger_key) = issue(&other, "coord", Role::Coordinator);

    let files = TlsFiles {
        cert: agent_crt,
        key: agent_key.clone(),
        ca: ca.clone(),
    };
    let endpoint: Endpoint = "127.0.0.1:0".parse().unwrap();
    let (listener, addr) = super::serve::listen(&endpoint, None, None, Some(&files))
        .await
        .expect("TCP with client certificates needs no token");
    let dp = MemoryDatapath::with_ports(&["vnet0"]);
    let agent = Arc::new(Agent::new(
        Arc::new(Mutex::new(dp)),
        None,
        Arc::new(AtomicU64::new(0)),
    ));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(super::serve::serve(
        listener,
        super::router::router(agent, None),
        stopped,
    ));
    let https = addr.to_string().replace("http://", "https://");
    let health = async |tls: ClientTls| Client::with_tls(&https, None, Some(&tls)).health().await;
    let with = |crt: &std::path::Path, key: &std::path::Path, ca: &std::path::Path| {
        ClientTls::new(ca, Some((crt, key))).unwrap()
    };
    assert!(
        health(with(&coord_crt, &coord_key, &ca)).await.is_ok(),
        "the coordinator"
    );
    assert!(
        health(with(&op_crt, &op_key, &ca)).await.is_ok(),
        "an operator"
    );
    for (what, tls) in [
        ("no certificate", ClientTls::new(&ca, None).unwrap()),
        (
            "another agent's (serving only)",
            with(&peer_crt, &peer_key, &ca),
        ),
        ("another CA's", with(&stranger_crt, &stranger_key, &ca)),
        (
            "trusting another CA",
            with(&coord_crt, &coord_key, &other_ca),
        ),
    ] {
        assert!(health(tls).await.is_err(), "{what} got in");
    }
    assert!(
        Client::new(addr.to_string(), None).health().await.is_err(),
        "plain HTTP got in"
    );
    // Keys must be private.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&agent_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        super::tls::server_config(&files),
        Err(super::tls::TlsError::KeyNotPrivate { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

mod fuzz;
