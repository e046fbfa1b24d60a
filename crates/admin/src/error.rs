//! Every failure reaches the client as JSON (`ErrorBody`) with a proper code.
//!
//! | kind | status |
//! |---|---|
//! | `not_found` | 404 |
//! | `already_exists`, `in_use` | 409 |
//! | `insufficient_capacity` | 409: the request conflicts with the pool's current free space; retrying after freeing or adding capacity can succeed |
//! | `invalid_name`, `invalid_argument`, `invalid_json` | 400 |
//! | `unauthorized` | 401 |
//! | `no_route` | 404, `method_not_allowed` 405 |
//! | `payload_too_large` | 413 |
//! | `internal` | 500 |

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sanvirt_config::ConfigError;

use crate::units::{format_bytes, format_mib};
use crate::views::ErrorBody;
use crate::BODY_BYTES_MAX;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: kind.to_string(),
                message: message.into(),
                fields: serde_json::Map::new(),
            },
        }
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {BODY_BYTES_MAX} bytes"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API token: send 'Authorization: Bearer <token>' \
             with the token from sanvirtd's token file",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

pub fn status_of(e: &ConfigError) -> StatusCode {
    match e {
        ConfigError::NotFound { .. } => StatusCode::NOT_FOUND,
        ConfigError::AlreadyExists { .. }
        | ConfigError::InUse { .. }
        | ConfigError::InsufficientCapacity { .. } => StatusCode::CONFLICT,
        ConfigError::InvalidName { .. } | ConfigError::InvalidArgument { .. } => {
            StatusCode::BAD_REQUEST
        }
        ConfigError::StoreFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The refusal for people: sizes in binary units rather than raw bytes.
pub fn human_message(e: &ConfigError) -> String {
    match e {
        ConfigError::InsufficientCapacity {
            pool,
            needed_bytes,
            free_bytes,
            free_extents,
            extent_size_mib,
        } => format!(
            "pool '{pool}' has {} free ({free_extents} extents of {}); {} needed",
            format_bytes(*free_bytes),
            format_mib(*extent_size_mib),
            format_bytes(*needed_bytes),
        ),
        other => other.to_string(),
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        let mut fields = match serde_json::to_value(&e) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let kind = match fields.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            _ => "invalid_argument".to_string(),
        };
        ApiError {
            status: status_of(&e),
            body: ErrorBody {
                error: kind,
                message: human_message(&e),
                fields,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
