//! Request extractors whose every rejection is an [`ApiError`] (JSON), not
//! axum's plain-text default.

use axum::async_trait;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The raw body, at most [`crate::BODY_BYTES_MAX`] bytes (the router's
/// `DefaultBodyLimit`; 413 above).
pub struct ApiBody(pub Bytes);

#[async_trait]
impl<S> FromRequest<S> for ApiBody
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBody)
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large()
                } else {
                    ApiError::invalid_json(format!("cannot read request body: {}", r.body_text()))
                }
            })
    }
}

/// A JSON body of at most [`crate::BODY_BYTES_MAX`] bytes, parsed strictly.
/// The content type is not checked: the body must be JSON whatever the
/// client calls it.
pub struct ApiJson<T>(pub T);

#[async_trait]
impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ApiBody(bytes) = ApiBody::from_request(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_json(
            "request body is empty; expected a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| {
            let field = e.path().to_string();
            describe(&e.into_inner(), &field)
        })
        .and_then(|v| de.end().map(|()| v).map_err(|e| describe(&e, ".")))?;
    Ok(value)
}

/// The serde error with the field it concerns, for people.
fn describe(e: &serde_json::Error, field: &str) -> ApiError {
    use serde_json::error::Category;
    if e.classify() != Category::Data {
        return ApiError::invalid_json(format!("malformed JSON: {e}"));
    }
    let text = e.to_string();
    let named = !(field == "." || field.is_empty() || field.contains('?'));
    // serde_json reads integers beyond u64 as floats; say what was wrong.
    let integer = ["u64", "u32"].into_iter().find(|t| {
        text.contains("invalid type: floating point") && text.contains(&format!("expected {t}"))
    });
    match integer {
        Some(t) if named => ApiError::invalid_json(format!(
            "invalid request: field `{field}` must be a whole number from 0 to {} ({text})",
            if t == "u64" {
                u64::MAX.to_string()
            } else {
                u32::MAX.to_string()
            }
        )),
        _ if named && !text.starts_with("unknown field") => {
            ApiError::invalid_json(format!("invalid request: field `{field}`: {text}"))
        }
        _ => ApiError::invalid_json(format!("invalid request: {text}")),
    }
}

/// Path parameters, percent-decoded.
pub struct ApiPath<T>(pub T);

#[async_trait]
impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|r| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    format!("invalid path: {}", r.body_text()),
                )
            })
    }
}
