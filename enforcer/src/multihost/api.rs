//! The coordinator's own routes (`enforcer coordinator`): its health (every agent, reachable
//! or not) and its groups with each member's epoch as its own host has it; the group and
//! snapshot routes are the agent's ([`crate::api::snapshots`]).

use std::sync::Arc;

use axum::{Json, Router, extract::State, routing::get};
use serde::{Deserialize, Serialize};

use super::hosts::Hosts;
use crate::{
    agent::GroupView,
    api::{self, ApiError, SnapshotService, error::blocking},
    datapath::epochs::GroupRecord,
    snapshot::Snapshots,
};

/// The state of `enforcer coordinator`: no datapath of its own, only agents.
pub struct CoordinatorState {
    pub snapshots: Arc<Snapshots>,
    pub hosts: Hosts,
}

impl SnapshotService for CoordinatorState {
    fn snapshots(&self) -> Result<Arc<Snapshots>, ApiError> {
        Ok(self.snapshots.clone())
    }
}

/// `GET /v1/health` of the coordinator: every agent, reachable or not.
#[derive(Serialize, Deserialize, Debug)]
pub struct CoordinatorHealth {
    pub status: String,
    pub hosts: Vec<HostHealth>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct HostHealth {
    pub name: String,
    pub agent: String,
    pub reachable: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub learned_epochs: u64,
}

/// The API of `enforcer coordinator`: groups and snapshots over the agents of several hosts.
pub fn router(state: Arc<CoordinatorState>, token: Option<String>) -> Router {
    let routes = api::snapshots::routes(Router::new())
        .route("/v1/health", get(health))
        .route("/v1/groups", get(groups))
        .with_state(state);
    api::finish(routes, token)
}

async fn health(State(s): State<Arc<CoordinatorState>>) -> Json<CoordinatorHealth> {
    let mut hosts = Vec::new();
    for spec in s.hosts.specs() {
        let client = s.hosts.client(&spec.name).expect("a listed host");
        let (reachable, error, learned_epochs) = match client.health().await {
            Ok(h) => (true, None, h.learned_epochs),
            Err(e) => (false, Some(e.to_string()), 0),
        };
        hosts.push(HostHealth {
            name: spec.name,
            agent: spec.agent,
            reachable,
            error,
            learned_epochs,
        });
    }
    let status = if hosts.iter().all(|h| h.reachable) {
        "ok"
    } else {
        "degraded"
    };
    Json(CoordinatorHealth {
        status: status.into(),
        hosts,
    })
}

/// The coordinator's groups, with their members' epochs as their own hosts have them.
async fn groups(State(s): State<Arc<CoordinatorState>>) -> Result<Json<Vec<GroupView>>, ApiError> {
    let c = s.snapshots.clone();
    let views = blocking(move || {
        Ok::<_, ApiError>(
            c.groups()
                .into_iter()
                .map(|g| {
                    let epochs: Vec<u32> = g
                        .vms
                        .iter()
                        .filter_map(|vm| c.epochs().epoch(vm).ok())
                        .collect();
                    GroupView {
                        record: GroupRecord {
                            group: g.id,
                            members: g.vms.len() as u32,
                            min_epoch: epochs.iter().copied().min().unwrap_or(0),
                            max_epoch: epochs.iter().copied().max().unwrap_or(0),
                        },
                        name: Some(g.name.to_string()),
                        domains: g.vms.iter().map(|v| v.name.clone()).collect(),
                    }
                })
                .collect(),
        )
    })
    .await?;
    Ok(Json(views))
}
