//! `/v1/domains/{name}/…`: a local domain's NIC, and one step of a snapshot or restore of it,
//! for a coordinator of several hosts.

use std::sync::Arc;

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
};
use serde_json::Value;

use super::error::{ApiResult, blocking};
use super::extract::ApiPath;
use crate::agent::{Agent, AgentDatapath, DomainCall, DomainNic, DomainOp, DomainStateView};

pub(crate) async fn nic<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<DomainNic> {
    Ok(Json(blocking(move || a.domain_nic(&name)).await?))
}

pub(crate) async fn state<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<DomainStateView> {
    Ok(Json(blocking(move || a.domain_state(&name)).await?))
}

pub(crate) async fn op<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath((name, op)): ApiPath<(String, String)>,
    body: Result<Json<DomainCall>, JsonRejection>,
) -> ApiResult<Value> {
    let op: DomainOp = op.parse()?;
    let Json(call) = body?;
    Ok(Json(blocking(move || a.domain_op(&name, op, call)).await?))
}
