//! `/v1/vms…` and the agent's `/v1/groups…`: registering VMs, reading and moving epochs,
//! listing groups, aborting a group's snapshot on this host. Changes to a named group that a
//! snapshot, restore or definition holds are refused (409).

use std::sync::Arc;

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
    http::StatusCode,
};

use super::error::{ApiError, ApiResult, blocking};
use super::extract::ApiPath;
use crate::{
    agent::{
        Abort, Agent, AgentDatapath, Announce, Announced, GroupView, RawTarget, RegisterVm,
        SetEpoch,
    },
    datapath::epochs::VmRecord,
    model::MacAddr,
};

/// A MAC from the path; 400 with the parser's words otherwise.
pub(crate) fn parse_mac(s: &str) -> Result<MacAddr, ApiError> {
    s.parse()
        .map_err(|e: crate::model::mac::MacParseError| ApiError::bad_request(e.to_string()))
}

pub(crate) async fn list<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
) -> ApiResult<Vec<VmRecord>> {
    Ok(Json(a.vms()?))
}

pub(crate) async fn get_one<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(mac): ApiPath<String>,
) -> ApiResult<VmRecord> {
    Ok(Json(a.vm(parse_mac(&mac)?)?))
}

pub(crate) async fn register<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    body: Result<Json<RegisterVm>, JsonRejection>,
) -> Result<(StatusCode, Json<VmRecord>), ApiError> {
    let Json(req) = body?;
    a.refuse_if_claimed(&[RawTarget::Vm(req.mac), RawTarget::Group(req.group)])?;
    Ok((StatusCode::CREATED, Json(a.register(&req)?)))
}

pub(crate) async fn unregister<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(mac): ApiPath<String>,
) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    a.refuse_if_claimed(&[RawTarget::Vm(mac)])?;
    Ok(Json(a.unregister(mac)?))
}

pub(crate) async fn set_epoch<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(mac): ApiPath<String>,
    body: Result<Json<SetEpoch>, JsonRejection>,
) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    let Json(req) = body?;
    a.refuse_if_claimed(&[RawTarget::Vm(mac)])?;
    Ok(Json(a.change_epoch(
        mac,
        Some(req.epoch),
        req.raise_only,
    )?))
}

pub(crate) async fn advance<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(mac): ApiPath<String>,
) -> ApiResult<VmRecord> {
    let mac = parse_mac(&mac)?;
    a.refuse_if_claimed(&[RawTarget::Vm(mac)])?;
    // A VM whose channel state is being recorded is cut here (its tap's queue taken).
    Ok(Json(blocking(move || a.advance_at_cut(mac, None)).await?))
}

pub(crate) async fn groups<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
) -> ApiResult<Vec<GroupView>> {
    Ok(Json(a.groups()?))
}

fn parse_group(group: &str) -> Result<u32, ApiError> {
    group.parse().map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            super::types::ErrorCode::BadGroup,
            format!("group {group:?}: a group id (0-1023)"),
        )
    })
}

pub(crate) async fn abort<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(group): ApiPath<String>,
    body: Result<Json<Abort>, JsonRejection>,
) -> ApiResult<Vec<VmRecord>> {
    let group = parse_group(&group)?;
    let Json(req) = body?;
    a.refuse_if_claimed(&[RawTarget::Group(group)])?;
    Ok(Json(a.abort(group, req.epoch)?))
}

/// The coordinator's announcement before a snapshot across hosts: it only widens what this
/// host's views accept, so it is not refused while a snapshot holds the group (it is that
/// snapshot's own step).
pub(crate) async fn announce<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(group): ApiPath<String>,
    body: Result<Json<Announce>, JsonRejection>,
) -> ApiResult<Announced> {
    let group = parse_group(&group)?;
    let Json(req) = body?;
    Ok(Json(Announced {
        views: a.announce(group, req.epoch)?,
    }))
}
