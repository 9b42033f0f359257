//! The agent's own state: `/v1/health`, `/v1/ports`, `/v1/stats`, `/v1/holds`, `/v1/config`
//! and `/metrics`.

use std::sync::Arc;

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    http::{HeaderMap, header},
    response::IntoResponse,
};

use super::{
    error::{ApiError, ApiResult, blocking},
    metrics,
};
use crate::{
    agent::{Agent, AgentDatapath, AgentError, Config, Health, PortStats},
    datapath::AttachedPort,
    hold::HoldReport,
};

pub(crate) async fn health<D: AgentDatapath>(State(a): State<Arc<Agent<D>>>) -> ApiResult<Health> {
    Ok(Json(a.health()?))
}

pub(crate) async fn ports<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
) -> ApiResult<Vec<AttachedPort>> {
    Ok(Json(a.ports()))
}

pub(crate) async fn stats<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
) -> ApiResult<Vec<PortStats>> {
    Ok(Json(a.stats()?))
}

pub(crate) async fn holds<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
) -> ApiResult<HoldReport> {
    // Waits for the buffer thread: off the async workers.
    Ok(Json(blocking(move || a.holds()).await?))
}

pub(crate) async fn config<D: AgentDatapath>(State(a): State<Arc<Agent<D>>>) -> ApiResult<Config> {
    Ok(Json(Config {
        type3_mode: a.mode()?,
    }))
}

pub(crate) async fn set_config<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    body: Result<Json<Config>, JsonRejection>,
) -> ApiResult<Config> {
    let Json(req) = body?;
    a.set_mode(req.type3_mode)?;
    Ok(Json(req))
}

pub(crate) async fn prometheus<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
) -> Result<impl IntoResponse, ApiError> {
    let text = blocking(move || {
        let (ports, vms) = a.stats_and_vms()?;
        Ok::<_, AgentError>(metrics::render(
            &ports,
            &vms,
            a.hold_report().as_ref(),
            a.replayed_totals(),
        ))
    })
    .await?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4".parse().expect("static header"),
    );
    Ok((headers, text))
}
