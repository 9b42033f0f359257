//! `/v1/recordings…` and `/v1/vms/{mac}/shut|replay`: an agent's part in recording a group's
//! channel state for a coordinator of several hosts — start recording its members, shut one
//! before its cut, hand the recordings over, replay one into a restored VM
//! (`agent::channel`; bodies in `agent::recording_wire`).

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{State, rejection::JsonRejection},
};

use super::{
    error::{ApiError, ApiResult, blocking},
    extract::ApiPath,
    vms::parse_mac,
};
use crate::{
    agent::{
        Agent, AgentDatapath,
        recording_wire::{RecordBegin, RecordTake, Replay, Shut, WireRecording, WireRecordings},
    },
    hold::Replayed,
};

/// How long the buffer may take to hand recordings over when the request does not say.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a take may be asked to wait.
const TAKE_TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// The largest replay body. A recording is what the buffer kept within its memory bound
/// (`--hold-max-mib`, 64 MiB by default) plus what waited in the receiver's tap at its cut (at
/// most its queue's length, 1000 frames of up to 64 KiB); base64 adds a third.
pub(crate) const REPLAY_BODY_MAX: usize = 1 << 30;

pub(crate) async fn begin<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    body: Result<Json<RecordBegin>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let Json(req) = body?;
    blocking(move || a.record_begin(&req.vms)).await?;
    Ok(Json(serde_json::json!({})))
}

pub(crate) async fn take<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    body: Result<Json<RecordTake>, JsonRejection>,
) -> ApiResult<WireRecordings> {
    let Json(req) = body?;
    let timeout = req
        .timeout_ms
        .map_or(TAKE_TIMEOUT, Duration::from_millis)
        .min(TAKE_TIMEOUT_MAX);
    // Encoding is work for a blocking thread too: a recording may be many MiB.
    let wire = blocking(move || {
        a.record_end(&req.vms, timeout).map(|taken| {
            taken
                .iter()
                .map(|(mac, r)| (*mac, WireRecording::from(r)))
                .collect::<WireRecordings>()
        })
    })
    .await?;
    Ok(Json(wire))
}

pub(crate) async fn shut<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(mac): ApiPath<String>,
) -> ApiResult<Shut> {
    let mac = parse_mac(&mac)?;
    let tap_empty = blocking(move || a.shut_before_cut(mac)).await?;
    Ok(Json(Shut { tap_empty }))
}

pub(crate) async fn replay<D: AgentDatapath>(
    State(a): State<Arc<Agent<D>>>,
    ApiPath(mac): ApiPath<String>,
    body: Result<Json<Replay>, JsonRejection>,
) -> ApiResult<Replayed> {
    let mac = parse_mac(&mac)?;
    let Json(req) = body?;
    Ok(Json(
        blocking(move || {
            let frames = req
                .frames
                .decode()
                .map_err(|e| ApiError::bad_request(format!("the frames to replay: {e}")))?;
            a.replay(mac, &req.port, &frames).map_err(ApiError::from)
        })
        .await?,
    ))
}
