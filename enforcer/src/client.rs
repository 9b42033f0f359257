//! HTTP client of the daemon's API, used by the CLI, the demo and the tests.

use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{Abort, Config, ErrorBody, Health, ModeName, PortStats, RegisterVm, SetEpoch},
    datapath::AttachedPort,
    epochs::{GroupRecord, VmRecord},
    hold::HoldReport,
    mac::MacAddr,
};

pub const DEFAULT_API: &str = "http://127.0.0.1:7878";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the enforcer API at {url}: {source} (is `enforcer run` running?)")]
    Connect { url: String, source: reqwest::Error },
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("bad response from {url}: {source}")]
    Decode { url: String, source: reqwest::Error },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let base = base.into().trim_end_matches('/').to_owned();
        Self {
            base,
            token,
            http: reqwest::Client::new(),
        }
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if !status.is_success() {
            let message = match resp.json::<ErrorBody>().await {
                Ok(body) => body.error,
                Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
            };
            return Err(ClientError::Api { status, message });
        }
        resp.json()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health").await
    }

    pub async fn vms(&self) -> Result<Vec<VmRecord>, ClientError> {
        self.get("/v1/vms").await
    }

    pub async fn vm(&self, mac: MacAddr) -> Result<VmRecord, ClientError> {
        self.get(&format!("/v1/vms/{mac}")).await
    }

    pub async fn register_vm(
        &self,
        mac: MacAddr,
        group: u32,
        port: &str,
        epoch: Option<u32>,
    ) -> Result<VmRecord, ClientError> {
        let body = RegisterVm {
            mac,
            group,
            port: port.to_owned(),
            epoch,
        };
        self.call(Method::POST, "/v1/vms", Some(&body)).await
    }

    pub async fn unregister_vm(&self, mac: MacAddr) -> Result<VmRecord, ClientError> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/vms/{mac}"), None)
            .await
    }

    pub async fn set_epoch(&self, mac: MacAddr, epoch: u32) -> Result<VmRecord, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/vms/{mac}/epoch"),
            Some(&SetEpoch { epoch }),
        )
        .await
    }

    pub async fn advance(&self, mac: MacAddr) -> Result<VmRecord, ClientError> {
        self.call::<(), _>(Method::POST, &format!("/v1/vms/{mac}/advance"), None)
            .await
    }

    pub async fn groups(&self) -> Result<Vec<GroupRecord>, ClientError> {
        self.get("/v1/groups").await
    }

    pub async fn holds(&self) -> Result<HoldReport, ClientError> {
        self.get("/v1/holds").await
    }

    pub async fn abort(&self, group: u32, epoch: u32) -> Result<Vec<VmRecord>, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/groups/{group}/abort"),
            Some(&Abort { epoch }),
        )
        .await
    }

    pub async fn ports(&self) -> Result<Vec<AttachedPort>, ClientError> {
        self.get("/v1/ports").await
    }

    pub async fn stats(&self) -> Result<Vec<PortStats>, ClientError> {
        self.get("/v1/stats").await
    }

    pub async fn config(&self) -> Result<Config, ClientError> {
        self.get("/v1/config").await
    }

    pub async fn set_mode(&self, mode: ModeName) -> Result<Config, ClientError> {
        self.call(
            Method::PUT,
            "/v1/config",
            Some(&Config { type3_mode: mode }),
        )
        .await
    }

    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let mut req = self.http.get(&url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        if !resp.status().is_success() {
            return Err(ClientError::Api {
                status: resp.status(),
                message: "metrics".into(),
            });
        }
        resp.text()
            .await
            .map_err(|source| ClientError::Decode { url, source })
    }
}
