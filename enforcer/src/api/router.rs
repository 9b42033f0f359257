//! The routers: the agent's (`enforcer run`), and what every router gets — the fallback and
//! the bearer-token check. The coordinator of several hosts builds its own from the same
//! pieces (`multihost::api`).

use std::sync::Arc;

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};

use super::{domains, error::ApiError, host, recordings, snapshots, types::ErrorCode, vms};
use crate::agent::{Agent, AgentDatapath};

/// The API of an agent (`enforcer run`): its VMs, epochs, buffer and counters, and its groups
/// and snapshots when it runs with libvirt. `token`: required as a bearer token when set.
pub fn router<D: AgentDatapath>(agent: Arc<Agent<D>>, token: Option<String>) -> Router {
    let routes = snapshots::routes::<Agent<D>>(Router::new())
        .route("/v1/health", get(host::health::<D>))
        .route("/v1/vms", get(vms::list::<D>).post(vms::register::<D>))
        .route(
            "/v1/vms/{mac}",
            get(vms::get_one::<D>).delete(vms::unregister::<D>),
        )
        .route("/v1/vms/{mac}/epoch", put(vms::set_epoch::<D>))
        .route("/v1/vms/{mac}/advance", post(vms::advance::<D>))
        .route("/v1/vms/{mac}/shut", post(recordings::shut::<D>))
        .route(
            "/v1/vms/{mac}/replay",
            post(recordings::replay::<D>).layer(axum::extract::DefaultBodyLimit::max(
                recordings::REPLAY_BODY_MAX,
            )),
        )
        .route("/v1/recordings", post(recordings::begin::<D>))
        .route("/v1/recordings/take", post(recordings::take::<D>))
        .route("/v1/groups", get(vms::groups::<D>))
        .route("/v1/groups/{group}/abort", post(vms::abort::<D>))
        .route("/v1/groups/{group}/announce", post(vms::announce::<D>))
        .route("/v1/domains/{name}/nic", get(domains::nic::<D>))
        .route("/v1/domains/{name}/state", get(domains::state::<D>))
        .route("/v1/domains/{name}/{op}", post(domains::op::<D>))
        .route("/v1/holds", get(host::holds::<D>))
        .route("/v1/ports", get(host::ports::<D>))
        .route("/v1/stats", get(host::stats::<D>))
        .route(
            "/v1/config",
            get(host::config::<D>).put(host::set_config::<D>),
        )
        .route("/metrics", get(host::prometheus::<D>))
        .with_state(agent);
    finish(routes, token)
}

/// The fallback and the bearer-token check, the same for every router.
pub fn finish(router: Router, token: Option<String>) -> Router {
    router
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NoSuchEndpoint,
                "no such endpoint",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ))
}

async fn require_token(
    State(token): State<Arc<Option<String>>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = token.as_deref() {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()));
        if !ok {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong bearer token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
