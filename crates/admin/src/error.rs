//! Every failure reaches the client as JSON (`ErrorBody`) with a proper code.
//!
//! | kind | status |
//! |---|---|
//! | `not_found` | 404 |
//! | `already_exists`, `in_use` | 409 |
//! | `insufficient_capacity` | 409: the request conflicts with the pool's current free space; retrying after freeing or adding capacity can succeed |
//! | `invalid_name`, `invalid_argument`, `invalid_json` | 400 |
//! | `store_failed` | 503: the node could not record a change and accepts none until restarted |
//! | `no_quorum`, `cluster_unavailable` | 503: the cluster cannot commit now; retrying later can succeed |
//! | `not_in_cluster` | 409: the request needs a cluster this node is not in |
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

/// The status for a refusal of the kind `kind` (`ConfigError`'s serde tag).
/// By kind rather than by variant, so a variant added to the configuration
/// model reaches clients as a 500 with its own kind and message until it is
/// given a code here.
pub fn status_of(kind: &str) -> StatusCode {
    match kind {
        "not_found" => StatusCode::NOT_FOUND,
        "already_exists"
        | "in_use"
        | "insufficient_capacity"
        | "not_in_cluster"
        | "reservations_changed"
        | "stale_cache_epoch" => StatusCode::CONFLICT,
        "invalid_name" | "invalid_argument" => StatusCode::BAD_REQUEST,
        "store_failed" | "no_quorum" | "cluster_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
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
            _ => "internal".to_string(),
        };
        ApiError {
            status: status_of(&kind),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_code_and_fields() {
        let s = |x: &str| x.to_string();
        let cases = [
            (
                ConfigError::NotFound {
                    object: s("pool"),
                    name: s("p"),
                },
                404,
                "not_found",
            ),
            (
                ConfigError::AlreadyExists {
                    object: s("pool"),
                    name: s("p"),
                },
                409,
                "already_exists",
            ),
            (
                ConfigError::InvalidName {
                    name: s("?"),
                    reason: s("r"),
                },
                400,
                "invalid_name",
            ),
            (
                ConfigError::InvalidArgument {
                    field: s("size_bytes"),
                    reason: s("r"),
                },
                400,
                "invalid_argument",
            ),
            (
                ConfigError::InUse {
                    object: s("pool"),
                    name: s("p"),
                    reason: s("r"),
                },
                409,
                "in_use",
            ),
            (
                ConfigError::InsufficientCapacity {
                    pool: s("p"),
                    needed_bytes: 10 << 30,
                    free_bytes: 1 << 30,
                    free_extents: 64,
                    extent_size_mib: 16,
                },
                409,
                "insufficient_capacity",
            ),
            (
                ConfigError::NoQuorum {
                    reason: s("2 of 3 voters unreachable"),
                },
                503,
                "no_quorum",
            ),
            (
                ConfigError::ClusterUnavailable {
                    reason: s("no leader"),
                },
                503,
                "cluster_unavailable",
            ),
            (ConfigError::NotInCluster, 409, "not_in_cluster"),
            (
                ConfigError::ReservationsChanged {
                    volume: s("v"),
                    expected: 1,
                    current: 2,
                },
                409,
                "reservations_changed",
            ),
            (
                ConfigError::StaleCacheEpoch {
                    io_group: s("io_grp0"),
                    epoch: 1,
                    current: 2,
                },
                409,
                "stale_cache_epoch",
            ),
        ];
        for (e, code, kind) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.body.error.as_str()), (code, kind));
            assert!(!a.body.fields.contains_key("kind"));
        }
        assert_eq!(status_of("store_failed"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            status_of("something_new"),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let a = ApiError::from(ConfigError::InsufficientCapacity {
            pool: s("p0"),
            needed_bytes: 10 << 30,
            free_bytes: 1 << 30,
            free_extents: 64,
            extent_size_mib: 16,
        });
        assert_eq!(
            a.body.message,
            "pool 'p0' has 1.00 GiB free (64 extents of 16 MiB); 10.00 GiB needed"
        );
        assert_eq!(a.body.fields["needed_bytes"], 10u64 << 30);
    }
}
