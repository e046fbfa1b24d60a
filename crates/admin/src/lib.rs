//! The admin API: REST over the configuration model (the paper's external
//! configuration process). Every change is one `sanvirt_config::Command`
//! handed to the node's [`AdminService`]; the API adds HTTP, JSON, a bearer
//! token, capacity accounting for display and an OpenAPI description.
//!
//! Wiring (the daemon):
//! ```text
//! let app = sanvirt_admin::router(Arc::new(my_service), token);
//! let listener = tokio::net::TcpListener::bind(cfg.admin.listen).await?;
//! sanvirt_admin::serve(listener, app, async { stop.notified().await }).await?;
//! ```

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;
use tokio::sync::Semaphore;

pub mod capacity;
pub mod error;
mod extract;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod handlers;
pub mod hosts;
mod middleware;
pub mod openapi;
mod service;
pub mod units;
pub mod views;

pub use handlers::parse_command;
pub use openapi::openapi_json;
pub use service::{
    AdminService, CachePairView, ClusterStatus, DiskState, MdiskStatus, MemberRole, MemberStatus,
    NodeStatus,
};
pub use views::*;

/// Largest request body accepted (413 above).
pub const BODY_BYTES_MAX: usize = 64 << 10;
/// Requests handled at once; more wait for a permit.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 32;
/// Where the CLI looks by default (the daemon's default `admin.listen`).
pub const API_URL_DEFAULT: &str = "http://127.0.0.1:7480";
/// The one public endpoint.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

const _: () = assert!(BODY_BYTES_MAX >= 4096 && REQUESTS_IN_FLIGHT_MAX > 0);

/// The admin API over `service`, requiring `Authorization: Bearer <token>`
/// on every endpoint except [`OPENAPI_PATH`].
///
/// # Panics
/// If `token` is empty: an empty token would admit every client.
pub fn router(service: Arc<dyn AdminService>, token: String) -> Router {
    assert!(!token.is_empty(), "the admin API token must not be empty");
    let ctx = handlers::Ctx { svc: service };
    let protected = protected_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods))
        .route_layer(from_fn_with_state(
            middleware::Auth::new(&token),
            middleware::require_token,
        ));
    Router::new()
        .merge(protected)
        .route(OPENAPI_PATH, get(handlers::get_openapi))
        .fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(from_fn_with_state(
            Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
            middleware::limit_in_flight,
        ))
        .layer(from_fn(middleware::access_log))
        .with_state(ctx)
}

/// Every authenticated route, in one table so the tests can check it
/// against the OpenAPI description both ways.
fn protected_routes() -> Vec<(&'static str, MethodRouter<handlers::Ctx>)> {
    use handlers::*;
    vec![
        ("/v1/status", get(get_status)),
        ("/v1/commands", post(post_command)),
        ("/v1/mdisks", get(list_mdisks).post(create_mdisk)),
        ("/v1/mdisks/:name", get(get_mdisk).delete(delete_mdisk)),
        ("/v1/mdisks/:name/rename", post(rename_mdisk)),
        ("/v1/pools", get(list_pools).post(create_pool)),
        ("/v1/pools/:name", get(get_pool).delete(delete_pool)),
        ("/v1/pools/:name/rename", post(rename_pool)),
        ("/v1/pools/:name/mdisks", post(add_pool_mdisk)),
        ("/v1/pools/:name/mdisks/:mdisk", delete(remove_pool_mdisk)),
        ("/v1/volumes", get(list_volumes).post(create_volume)),
        // The static segment shadows `:name` = "image"; GET and DELETE keep
        // a volume of that name reachable.
        (
            "/v1/volumes/image",
            post(create_image_volume)
                .get(get_volume_named_image)
                .delete(delete_volume_named_image),
        ),
        ("/v1/volumes/:name", get(get_volume).delete(delete_volume)),
        ("/v1/volumes/:name/rename", post(rename_volume)),
        ("/v1/volumes/:name/expand", post(expand_volume)),
        ("/v1/volumes/:name/preferred-node", post(set_preferred_node)),
        ("/v1/volumes/:name/cache-mode", post(set_cache_mode)),
        ("/v1/cluster", get(get_cluster).post(create_cluster)),
        ("/v1/nodes", get(list_nodes).post(add_node)),
        ("/v1/nodes/:name", delete(remove_node)),
        ("/v1/hosts", get(list_hosts).post(create_host)),
        ("/v1/hosts/:name", get(get_host).delete(delete_host)),
        ("/v1/hosts/:name/rename", post(rename_host)),
        ("/v1/hosts/:name/initiators", post(add_host_initiator)),
        (
            "/v1/hosts/:name/initiators/:initiator",
            delete(remove_host_initiator),
        ),
        (
            "/v1/hosts/:name/chap",
            put(set_host_chap).delete(clear_host_chap),
        ),
        ("/v1/mappings", get(list_mappings).post(map_volume)),
        ("/v1/mappings/:host/:volume", delete(unmap_volume)),
        (
            "/v1/iscsi/portal",
            get(get_iscsi_portal)
                .put(set_iscsi_portal)
                .delete(clear_iscsi_portal),
        ),
    ]
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes
/// the requests in progress and returns.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin API listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests;
