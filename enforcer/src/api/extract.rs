//! The API's own extractors for path segments and queries: axum's `Path` and `Query`, with
//! their rejections (a segment that is not UTF-8 once percent-decoded, a query of the wrong
//! shape) answered like every other bad input, as a JSON error `bad_request` (400), not
//! axum's plain text. Found by fuzzing the API (`tests/fuzz.rs`).

use axum::{
    extract::{FromRequestParts, Path, Query},
    http::request::Parts,
};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// `Path<T>` answering its rejections as [`ApiError`].
pub(crate) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// `Query<T>` answering its rejections as [`ApiError`].
pub(crate) struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}
