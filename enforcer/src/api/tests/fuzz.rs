//! Fuzzing the API's inputs (issue 11, item 6): arbitrary methods, paths and bodies sent to
//! the agent's router (over the in-memory datapath, with a coordinator over the fake
//! hypervisor), in process. Whatever arrives, the answer is a success or a JSON error with a
//! code this version knows, and never an internal error. Failures are kept as seeds in
//! `enforcer/proptest-regressions/` and run first.

use axum::body::Body;
use proptest::prelude::*;
use tower::ServiceExt as _;

use super::*;

/// Path segments: the API's own words, ids of the right shape, and anything at all.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "vms",
            "groups",
            "snapshots",
            "domains",
            "epoch",
            "advance",
            "abort",
            "announce",
            "restore",
            "nic",
            "state",
            "holds",
            "config",
            "health",
            "stats",
            "ports",
            "metrics",
            "begin",
            "stop",
            "capture",
            "wait-paused",
            "complete",
            "resume",
            "cancel",
            "destroy",
            "discard",
            "vm1",
            "web",
            "7",
            "1024",
            "02:00:5e:10:00:01",
            "web-1-e1",
            "..",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z0-9._~:-]{0,20}",
        any::<Vec<u8>>().prop_map(|b| {
            // Any bytes, percent-encoded: the path stays a valid URI, its meaning anything.
            b.iter().map(|c| format!("%{c:02X}")).collect()
        }),
    ]
}

/// The API's routes with their methods, each `{}` filled with a [`segment`]; now and then any
/// method on any route, or any path at all.
fn request_line() -> impl Strategy<Value = (&'static str, String)> {
    let routes = prop::sample::select(vec![
        ("GET", "/v1/health"),
        ("GET", "/v1/vms"),
        ("POST", "/v1/vms"),
        ("GET", "/v1/vms/{}"),
        ("DELETE", "/v1/vms/{}"),
        ("PUT", "/v1/vms/{}/epoch"),
        ("POST", "/v1/vms/{}/advance"),
        ("GET", "/v1/groups"),
        ("POST", "/v1/groups"),
        ("DELETE", "/v1/groups/{}"),
        ("POST", "/v1/groups/{}/abort"),
        ("POST", "/v1/groups/{}/announce"),
        ("POST", "/v1/groups/{}/snapshots"),
        ("GET", "/v1/snapshots"),
        ("GET", "/v1/snapshots/{}"),
        ("DELETE", "/v1/snapshots/{}"),
        ("POST", "/v1/snapshots/{}/restore"),
        ("GET", "/v1/domains/{}/nic"),
        ("GET", "/v1/domains/{}/state"),
        ("POST", "/v1/domains/{}/{}"),
        ("GET", "/v1/holds"),
        ("GET", "/v1/ports"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/config"),
        ("PUT", "/v1/config"),
        ("GET", "/metrics"),
    ]);
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]);
    let fill = |route: &str, a: &str, b: &str| route.replacen("{}", a, 1).replacen("{}", b, 1);
    prop_oneof![
        6 => (routes.clone(), segment(), segment())
            .prop_map(move |((m, route), a, b)| (m, fill(route, &a, &b))),
        2 => (method.clone(), routes, segment(), segment())
            .prop_map(move |(m, (_, route), a, b)| (m, fill(route, &a, &b))),
        1 => (method, prop::collection::vec(segment(), 0..5))
            .prop_map(|(m, s)| (m, format!("/v1/{}", s.join("/")))),
    ]
}

/// Bodies: nothing, JSON of the shapes the API takes with odd values, or any text.
fn body() -> impl Strategy<Value = Option<String>> {
    let number = prop_oneof![
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        Just("1e40".to_owned()),
        any::<u32>().prop_map(|n| n.to_string()),
        Just("\"3\"".to_owned()),
        Just("null".to_owned()),
    ];
    let text = prop_oneof![
        Just("\"\"".to_owned()),
        Just("\"02:00:5e:10:00:01\"".to_owned()),
        Just("\"ff:ff:ff:ff:ff:ff\"".to_owned()),
        "[ -~]{0,24}".prop_map(|s| serde_json::Value::String(s).to_string()),
    ];
    let field = prop::sample::select(vec![
        "epoch",
        "raise_only",
        "mac",
        "group",
        "port",
        "remote",
        "name",
        "domains",
        "id",
        "method",
        "bridge",
        "type3_mode",
        "snapshot",
        "images",
        "timeout_ms",
        "advance",
    ]);
    let value = prop_oneof![number, text.clone(), Just("true".into()), Just("[]".into())];
    prop_oneof![
        Just(None),
        prop::collection::vec((field, value), 0..5).prop_map(|fields| {
            let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            Some(format!("{{{}}}", inner.join(",")))
        }),
        "[ -~]{0,40}".prop_map(Some),
    ]
}

#[test]
fn any_request_gets_a_known_answer_and_never_an_internal_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dp = MemoryDatapath::with_ports(&["vnet0", "vnet1", "vnet2"]);
    let agent = Arc::new(Agent::new(
        Arc::new(Mutex::new(dp)),
        None,
        Arc::new(AtomicU64::new(0)),
    ));
    let (snapshots, store) = fake_snapshots(&[("vm1", VM1), ("vm2", VM2)]);
    agent.set_snapshots(snapshots);
    let app = super::super::router::router(agent, None);
    let strategy = (request_line(), body());
    let config = ProptestConfig {
        cases: 600,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    // What the cases reached: a fuzzer that only ever hits 404 tests nothing.
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let result = runner.run(&strategy, |((method, path), body)| {
        let mut request = axum::http::Request::builder().method(method).uri(&path);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(body.clone().map_or_else(Body::empty, Body::from))
            .expect("a request");
        let (status, bytes) = rt.block_on(async {
            let response = app
                .clone()
                .oneshot(request)
                .await
                .expect("the router answers");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("a body");
            (status, bytes)
        });
        let what = format!("{method} {path} {body:?} -> {status}");
        let mut outcome = status.as_u16().to_string();
        prop_assert_ne!(
            status.as_u16(),
            500,
            "{}: {}",
            what,
            String::from_utf8_lossy(&bytes)
        );
        if !status.is_success() {
            let err: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{what}: not JSON ({e})")))?;
            let code: ErrorCode = serde_json::from_value(err["code"].clone())
                .map_err(|e| TestCaseError::fail(format!("{what}: no code ({e}): {err}")))?;
            prop_assert!(code != ErrorCode::Unknown, "{}: {}", what, err);
            prop_assert!(err["error"].is_string(), "{}: {}", what, err);
            outcome = format!("{outcome} {}", err["code"]);
        }
        *seen.borrow_mut().entry(outcome).or_default() += 1;
        Ok(())
    });
    let _ = std::fs::remove_dir_all(store);
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = seen.into_inner();
    let successes: usize = seen
        .iter()
        .filter(|(k, _)| k.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    eprintln!("fuzzing the API reached: {seen:?}");
    assert!(
        successes > 0 && seen.len() >= 8,
        "the cases reached too little: {seen:?}"
    );
}
