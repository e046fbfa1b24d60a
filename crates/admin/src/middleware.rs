//! Bearer-token authentication, the in-flight request limit and the access
//! log. The token is compared in constant time and never logged; neither is
//! the `Authorization` header.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::error::ApiError;

#[derive(Clone)]
pub struct Auth {
    token: Arc<[u8]>,
}

impl Auth {
    pub fn new(token: &str) -> Self {
        Auth {
            token: token.as_bytes().into(),
        }
    }

    /// True if the request carries `Authorization: Bearer <token>`. Only the
    /// token's length can leak through timing, not its contents.
    fn admits(&self, req: &Request) -> bool {
        let Some(value) = req.headers().get(AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        // RFC 9110: the scheme name is case-insensitive.
        let scheme = b"bearer ";
        if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return false;
        }
        let presented = value[scheme.len()..].trim_ascii();
        bool::from(presented.ct_eq(&self.token))
    }
}

pub async fn require_token(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if auth.admits(&req) {
        next.run(req).await
    } else {
        tracing::warn!(
            method = %req.method(),
            path = req.uri().path(),
            "admin API request refused: missing or wrong bearer token"
        );
        ApiError::unauthorized().into_response()
    }
}

/// Waits for one of [`crate::REQUESTS_IN_FLIGHT_MAX`] permits, so a burst of
/// clients queues here instead of piling blocking work onto the runtime.
pub async fn limit_in_flight(
    State(permits): State<Arc<Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = permits.acquire().await else {
        return ApiError::internal("admin API is shutting down").into_response();
    };
    next.run(req).await
}

pub async fn access_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        path,
        status = resp.status().as_u16(),
        elapsed_us = start.elapsed().as_micros() as u64,
        "admin API"
    );
    resp
}
