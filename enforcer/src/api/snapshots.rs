//! Group and snapshot routes, the same for one host (`enforcer run`, over its libvirt) and for
//! several (`enforcer coordinator`, over the agents): defining and removing groups, starting,
//! listing, showing, deleting and restoring snapshots.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{State, rejection::JsonRejection},
    http::StatusCode,
    routing::{delete, get, post},
};

use super::extract::{ApiPath, ApiQuery};
use super::{
    error::{ApiError, ApiResult, blocking},
    types::{DefineGroup, RestoreBody, SnapshotBody, SnapshotFilter},
};
use crate::{
    agent::{Agent, AgentDatapath},
    model::{GroupName, GroupSpec, SnapshotId},
    snapshot::{Manifest, RestoreReport, Snapshots},
};

/// What the group and snapshot routes need: the coordinator, or why there is none.
pub trait SnapshotService: Send + Sync + 'static {
    fn snapshots(&self) -> Result<Arc<Snapshots>, ApiError>;
}

impl<D: AgentDatapath> SnapshotService for Agent<D> {
    fn snapshots(&self) -> Result<Arc<Snapshots>, ApiError> {
        Ok(Agent::snapshots(self)?)
    }
}

/// The group and snapshot routes, on a router whose state is `S`.
pub fn routes<S: SnapshotService>(router: Router<Arc<S>>) -> Router<Arc<S>> {
    router
        .route("/v1/groups", post(define_group::<S>))
        .route("/v1/groups/{group}", delete(remove_group::<S>))
        .route("/v1/groups/{group}/snapshots", post(create::<S>))
        .route("/v1/snapshots", get(list::<S>))
        .route("/v1/snapshots/{id}", get(show::<S>).delete(remove::<S>))
        .route("/v1/snapshots/{id}/restore", post(restore::<S>))
}

fn snapshot_id(id: &str) -> Result<SnapshotId, ApiError> {
    Ok(id.parse()?)
}

/// A group name from a path or a body; `bad_group` otherwise.
fn group_name(name: &str) -> Result<GroupName, ApiError> {
    name.parse().map_err(|e: crate::model::NameError| {
        ApiError::from(crate::snapshot::CoordinatorError::BadGroup(e.into()))
    })
}

async fn define_group<S: SnapshotService>(
    State(s): State<Arc<S>>,
    body: Result<Json<DefineGroup>, JsonRejection>,
) -> Result<(StatusCode, Json<GroupSpec>), ApiError> {
    let Json(req) = body?;
    let name = group_name(&req.name)?;
    let c = s.snapshots()?;
    let group = blocking(move || c.define_group(&name, req.id, &req.domains)).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

async fn remove_group<S: SnapshotService>(
    State(s): State<Arc<S>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<GroupSpec> {
    let name = group_name(&name)?;
    let c = s.snapshots()?;
    Ok(Json(blocking(move || c.remove_group(&name)).await?))
}

/// Starts a snapshot and answers at once (202) with its live view; the work goes on in the
/// background (follow it with `GET /v1/snapshots/{id}`). Preparing and running happen in one
/// task, so a client that goes away cannot leave a prepared snapshot (and a busy group) behind.
async fn create<S: SnapshotService>(
    State(s): State<Arc<S>>,
    ApiPath(name): ApiPath<String>,
    body: Result<Option<Json<SnapshotBody>>, JsonRejection>,
) -> Result<(StatusCode, Json<Manifest>), ApiError> {
    let method = body?.map(|Json(b)| b).unwrap_or_default().method;
    let name = group_name(&name)?;
    let c = s.snapshots()?;
    let (started, view) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let prepared = c.group(&name).and_then(|group| c.prepare(&group, method));
        match prepared {
            Ok(prepared) => {
                let _ = started.send(c.get(&prepared.id));
                if let Err(err) = c.run(prepared) {
                    tracing::error!(%err, "group snapshot");
                }
            }
            Err(err) => {
                let _ = started.send(Err(err));
            }
        }
    });
    let view = view
        .await
        .map_err(|_| ApiError::internal("snapshot task ended"))??;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

async fn list<S: SnapshotService>(
    State(s): State<Arc<S>>,
    ApiQuery(filter): ApiQuery<SnapshotFilter>,
) -> ApiResult<Vec<Manifest>> {
    let c = s.snapshots()?;
    let mut all = blocking(move || c.list()).await?;
    if let Some(g) = filter.group {
        all.retain(|m| m.group.name == *g);
    }
    Ok(Json(all))
}

async fn show<S: SnapshotService>(
    State(s): State<Arc<S>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Manifest> {
    let id = snapshot_id(&id)?;
    let c = s.snapshots()?;
    Ok(Json(blocking(move || c.get(&id)).await?))
}

async fn remove<S: SnapshotService>(
    State(s): State<Arc<S>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Manifest> {
    let id = snapshot_id(&id)?;
    let c = s.snapshots()?;
    Ok(Json(blocking(move || c.delete(&id)).await?))
}

async fn restore<S: SnapshotService>(
    State(s): State<Arc<S>>,
    ApiPath(id): ApiPath<String>,
    body: Result<Option<Json<RestoreBody>>, JsonRejection>,
) -> ApiResult<RestoreReport> {
    let req = body?.map(|Json(r)| r).unwrap_or_default();
    let id = snapshot_id(&id)?;
    let c = s.snapshots()?;
    Ok(Json(
        blocking(move || c.restore_with(&id, req.bridge.as_ref(), !req.skip_channel_state)).await?,
    ))
}
