//! One handler per endpoint. Every change is one `Command` submitted to the
//! service; reads come from one `State` snapshot. The `#[utoipa::path]`
//! attributes are the OpenAPI description of each route.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sanvirt_config::{
    check_address, ChapMutual, ChapSettings, Command, ConfigError, IscsiPortal, MdiskMode, Outcome,
    State, ThinParams, VolumeLayout, EXTENT_SIZE_MIB_DEFAULT, SECTOR_BYTES, THIN_GRAIN_KIB_DEFAULT,
};

use crate::capacity::{
    mdisk_view, mdisk_views, pool_view, pool_views, status_view, volume_view, volume_views,
};
use crate::error::ApiError;
use crate::extract::{parse_json, ApiBody, ApiJson, ApiPath};
use crate::hosts::{host_view, host_views, mapping_views, portal_view};
use crate::service::{AdminService, ClusterStatus, MemberStatus};
use crate::views::*;

#[derive(Clone)]
pub struct Ctx {
    pub svc: Arc<dyn AdminService>,
}

/// Runs `f` on the blocking pool: the service may fsync or take locks.
async fn call<T, F>(ctx: &Ctx, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn AdminService) -> T + Send + 'static,
{
    let svc = ctx.svc.clone();
    tokio::task::spawn_blocking(move || f(svc.as_ref()))
        .await
        .map_err(|e| ApiError::internal(format!("admin service failed: {e}")))
}

async fn snapshot(ctx: &Ctx) -> Result<State, ApiError> {
    call(ctx, |s| s.state()).await
}

async fn submit(ctx: &Ctx, cmd: Command) -> Result<Outcome, ApiError> {
    tracing::info!(command = ?cmd, "admin API submits");
    let result = call(ctx, move |s| s.submit(cmd)).await?;
    if let Err(e) = &result {
        tracing::info!(error = %e, "command refused");
    }
    Ok(result?)
}

fn find<'a, T>(map: &'a BTreeMap<String, T>, object: &str, name: &str) -> Result<&'a T, ApiError> {
    map.get(name).ok_or_else(|| {
        ApiError::from(ConfigError::NotFound {
            object: object.into(),
            name: name.into(),
        })
    })
}

async fn mdisk_response(ctx: &Ctx, name: &str, code: StatusCode) -> Result<Response, ApiError> {
    let (state, node) = call(ctx, |s| (s.state(), s.status())).await?;
    let health = node.mdisks.iter().find(|h| h.name == name);
    Ok((code, Json(mdisk_view(&state, name, health)?)).into_response())
}

async fn pool_response(ctx: &Ctx, name: &str, code: StatusCode) -> Result<Response, ApiError> {
    let state = snapshot(ctx).await?;
    Ok((code, Json(pool_view(&state, name)?)).into_response())
}

async fn volume_response(ctx: &Ctx, name: &str, code: StatusCode) -> Result<Response, ApiError> {
    let state = snapshot(ctx).await?;
    Ok((code, Json(volume_view(&state, name)?)).into_response())
}

// ------------------------------------------------------------------ node

/// Node status.
///
/// Identity, uptime, NBD portal, configuration and capacity totals, and the
/// disk-path state of every mdisk.
#[utoipa::path(get, path = "/v1/status", tag = "node",
    responses(
        (status = 200, description = "node status", body = StatusView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
    ))]
pub async fn get_status(AxumState(ctx): AxumState<Ctx>) -> Result<Json<StatusView>, ApiError> {
    let (state, node) = call(&ctx, |s| (s.state(), s.status())).await?;
    Ok(Json(status_view(&state, node)))
}

/// Submit one raw configuration command.
///
/// The command is in the journal's form, for scripts. For `add_mdisk` the
/// path is probed and `capacity_bytes` may not exceed the measured capacity.
/// The schema names refer to `sanvirt_config::{Command, Outcome}`, whose
/// mirrors in `openapi::schema` are the registered components.
#[utoipa::path(post, path = "/v1/commands", tag = "commands",
    request_body = Command,
    responses(
        (status = 200, description = "applied", body = Outcome),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
    ))]
pub async fn post_command(
    AxumState(ctx): AxumState<Ctx>,
    ApiBody(body): ApiBody,
) -> Result<Json<Outcome>, ApiError> {
    let cmd = parse_command(&body)?;
    if let Some(instead) = cluster_layer_only(&cmd) {
        return Err(ConfigError::InvalidArgument {
            field: "op".into(),
            reason: format!(
                "membership changes go through the cluster layer, which also talks to the \
                 nodes; use {instead}"
            ),
        }
        .into());
    }
    if let Command::AddMdisk {
        path,
        capacity_bytes,
        ..
    } = &cmd
    {
        let (path, claimed) = (path.clone(), *capacity_bytes);
        let measured = call(&ctx, move |s| s.probe_mdisk(&path, None)).await??;
        if claimed > measured {
            return Err(ConfigError::InvalidArgument {
                field: "capacity_bytes".into(),
                reason: format!("{claimed} is more than the {measured} bytes the path holds"),
            }
            .into());
        }
    }
    Ok(Json(submit(&ctx, cmd).await?))
}

/// The endpoint to use instead for a command that only the cluster layer
/// may propose (it pairs them with messages to the nodes).
fn cluster_layer_only(cmd: &Command) -> Option<&'static str> {
    match cmd {
        Command::CreateCluster { .. } => Some("POST /v1/cluster"),
        Command::AddNode { .. } => Some("POST /v1/nodes"),
        Command::RemoveNode { .. } => Some("DELETE /v1/nodes/{name}"),
        Command::SetNodeOnline { .. } => Some("nothing: the cluster's leader sends node events"),
        Command::CachePairBroken { .. } | Command::CachePairJoined { .. } => {
            Some("nothing: the nodes' caches send cache pair events")
        }
        _ => None,
    }
}

/// A `Command` from JSON, refusing fields the command does not have (serde's
/// internally tagged enums cannot `deny_unknown_fields` themselves): a typo
/// in an optional field must not be silently dropped.
pub fn parse_command(body: &[u8]) -> Result<Command, ApiError> {
    let raw: serde_json::Value = parse_json(body)?;
    let cmd: Command = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::invalid_json(format!("invalid command: {e}")))?;
    let known = serde_json::to_value(&cmd)
        .map_err(|e| ApiError::internal(format!("cannot serialize command: {e}")))?;
    if let (Some(given), Some(known)) = (raw.as_object(), known.as_object()) {
        if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
            return Err(ApiError::invalid_json(format!(
                "invalid command: unknown field `{extra}` for op `{}`",
                known.get("op").and_then(|v| v.as_str()).unwrap_or("?")
            )));
        }
    }
    Ok(cmd)
}

// ---------------------------------------------------------------- mdisks

/// List mdisks.
#[utoipa::path(get, path = "/v1/mdisks", tag = "mdisks",
    responses((status = 200, description = "every mdisk", body = [MdiskView]), (status = 401, description = "missing or wrong token", body = ErrorBody)))]
pub async fn list_mdisks(AxumState(ctx): AxumState<Ctx>) -> Result<Json<Vec<MdiskView>>, ApiError> {
    let (state, node) = call(&ctx, |s| (s.state(), s.status())).await?;
    Ok(Json(mdisk_views(&state, &node)))
}

/// Show one mdisk.
#[utoipa::path(get, path = "/v1/mdisks/{name}", tag = "mdisks",
    params(("name" = String, Path, description = "mdisk name")),
    responses(
        (status = 200, description = "the mdisk", body = MdiskView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn get_mdisk(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    mdisk_response(&ctx, &name, StatusCode::OK).await
}

/// Register a file or block device as an unmanaged mdisk.
///
/// The node probes `path` (creating a sparse file first if
/// `create_size_bytes` is set) and submits `add_mdisk` with the measured
/// capacity.
#[utoipa::path(post, path = "/v1/mdisks", tag = "mdisks",
    request_body = CreateMdiskRequest,
    responses(
        (status = 201, description = "the new mdisk", body = MdiskView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
    ))]
pub async fn create_mdisk(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<CreateMdiskRequest>,
) -> Result<Response, ApiError> {
    if let Some(size) = req.create_size_bytes {
        if size == 0 || size % SECTOR_BYTES != 0 {
            return Err(ConfigError::InvalidArgument {
                field: "create_size_bytes".into(),
                reason: format!("{size} is not a positive multiple of {SECTOR_BYTES}"),
            }
            .into());
        }
    }
    let name = req.name.clone();
    let cmd = call(&ctx, move |s| -> Result<Command, ConfigError> {
        let state = s.state();
        if let Some(m) = state.mdisks.values().find(|m| m.path == req.path) {
            return Err(ConfigError::InUse {
                object: "path".into(),
                name: req.path,
                reason: format!("it is already mdisk '{}'", m.name),
            });
        }
        if let Some(size) = req.create_size_bytes {
            // Refuse before creating a file the command would then not use.
            s.validate(&Command::AddMdisk {
                name: req.name.clone(),
                path: req.path.clone(),
                capacity_bytes: size,
            })?;
        } else if state.mdisks.contains_key(&req.name) {
            return Err(ConfigError::AlreadyExists {
                object: "mdisk".into(),
                name: req.name,
            });
        }
        let capacity_bytes = s.probe_mdisk(&req.path, req.create_size_bytes)?;
        Ok(Command::AddMdisk {
            name: req.name,
            path: req.path,
            capacity_bytes,
        })
    })
    .await??;
    submit(&ctx, cmd).await?;
    mdisk_response(&ctx, &name, StatusCode::CREATED).await
}

/// Remove an unmanaged mdisk.
///
/// Only the configuration forgets it; its data is untouched.
#[utoipa::path(delete, path = "/v1/mdisks/{name}", tag = "mdisks",
    params(("name" = String, Path, description = "mdisk name")),
    responses(
        (status = 204, description = "removed"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn delete_mdisk(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    submit(&ctx, Command::RemoveMdisk { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rename an mdisk.
#[utoipa::path(post, path = "/v1/mdisks/{name}/rename", tag = "mdisks",
    params(("name" = String, Path, description = "current mdisk name")),
    request_body = RenameRequest,
    responses(
        (status = 200, description = "the mdisk", body = MdiskView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn rename_mdisk(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Response, ApiError> {
    let new_name = req.new_name.clone();
    submit(
        &ctx,
        Command::RenameMdisk {
            name,
            new_name: req.new_name,
        },
    )
    .await?;
    mdisk_response(&ctx, &new_name, StatusCode::OK).await
}

// ----------------------------------------------------------------- pools

/// List pools.
#[utoipa::path(get, path = "/v1/pools", tag = "pools",
    responses((status = 200, description = "every pool", body = [PoolView]), (status = 401, description = "missing or wrong token", body = ErrorBody)))]
pub async fn list_pools(AxumState(ctx): AxumState<Ctx>) -> Result<Json<Vec<PoolView>>, ApiError> {
    Ok(Json(pool_views(&snapshot(&ctx).await?)))
}

/// Show one pool.
#[utoipa::path(get, path = "/v1/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    responses(
        (status = 200, description = "the pool", body = PoolView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn get_pool(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    pool_response(&ctx, &name, StatusCode::OK).await
}

/// Create a pool.
#[utoipa::path(post, path = "/v1/pools", tag = "pools",
    request_body = CreatePoolRequest,
    responses(
        (status = 201, description = "the new pool", body = PoolView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn create_pool(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<CreatePoolRequest>,
) -> Result<Response, ApiError> {
    let name = req.name.clone();
    submit(
        &ctx,
        Command::CreatePool {
            name: req.name,
            extent_size_mib: req.extent_size_mib.unwrap_or(EXTENT_SIZE_MIB_DEFAULT),
        },
    )
    .await?;
    pool_response(&ctx, &name, StatusCode::CREATED).await
}

/// Delete an empty pool.
///
/// Refused (409) while the pool has volumes or mdisks.
#[utoipa::path(delete, path = "/v1/pools/{name}", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn delete_pool(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    submit(&ctx, Command::DeletePool { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rename a pool.
#[utoipa::path(post, path = "/v1/pools/{name}/rename", tag = "pools",
    params(("name" = String, Path, description = "current pool name")),
    request_body = RenameRequest,
    responses(
        (status = 200, description = "the pool", body = PoolView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn rename_pool(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Response, ApiError> {
    let new_name = req.new_name.clone();
    submit(
        &ctx,
        Command::RenamePool {
            name,
            new_name: req.new_name,
        },
    )
    .await?;
    pool_response(&ctx, &new_name, StatusCode::OK).await
}

/// Add an mdisk to the pool.
///
/// An unmanaged mdisk becomes managed; its capacity becomes free extents.
#[utoipa::path(post, path = "/v1/pools/{name}/mdisks", tag = "pools",
    params(("name" = String, Path, description = "pool name")),
    request_body = PoolMdiskRequest,
    responses(
        (status = 200, description = "the pool", body = PoolView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn add_pool_mdisk(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<PoolMdiskRequest>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::AddMdiskToPool {
            mdisk: req.mdisk,
            pool: name.clone(),
        },
    )
    .await?;
    pool_response(&ctx, &name, StatusCode::OK).await
}

/// Remove an mdisk from the pool.
///
/// Refused (409) while it holds volume extents.
#[utoipa::path(delete, path = "/v1/pools/{name}/mdisks/{mdisk}", tag = "pools",
    params(
        ("name" = String, Path, description = "pool name"),
        ("mdisk" = String, Path, description = "mdisk name"),
    ),
    responses(
        (status = 200, description = "the pool", body = PoolView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn remove_pool_mdisk(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath((name, mdisk)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    // `RemoveMdiskFromPool` names no pool: check the URL's pool is the one.
    let state = snapshot(&ctx).await?;
    find(&state.pools, "pool", &name)?;
    let m = find(&state.mdisks, "mdisk", &mdisk)?;
    let in_this_pool = match &m.mode {
        MdiskMode::Managed { pool } | MdiskMode::Image { pool, .. } => *pool == name,
        MdiskMode::Unmanaged => false,
    };
    if !in_this_pool {
        return Err(ConfigError::InvalidArgument {
            field: "mdisk".into(),
            reason: format!("mdisk '{mdisk}' is not in pool '{name}'"),
        }
        .into());
    }
    submit(&ctx, Command::RemoveMdiskFromPool { mdisk }).await?;
    pool_response(&ctx, &name, StatusCode::OK).await
}

// --------------------------------------------------------------- volumes

/// List volumes.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, description = "every volume", body = [VolumeView]), (status = 401, description = "missing or wrong token", body = ErrorBody)))]
pub async fn list_volumes(
    AxumState(ctx): AxumState<Ctx>,
) -> Result<Json<Vec<VolumeView>>, ApiError> {
    Ok(Json(volume_views(&snapshot(&ctx).await?)))
}

/// Show one volume.
#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses(
        (status = 200, description = "the volume", body = VolumeView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn get_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    volume_response(&ctx, &name, StatusCode::OK).await
}

/// Show the volume named `image`.
///
/// `/v1/volumes/image` is the image-mode creation endpoint, which shadows
/// `/v1/volumes/{name}` for a volume of that name; this serves it.
#[utoipa::path(get, path = "/v1/volumes/image", tag = "volumes",
    responses(
        (status = 200, description = "the volume named image", body = VolumeView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn get_volume_named_image(AxumState(ctx): AxumState<Ctx>) -> Result<Response, ApiError> {
    volume_response(&ctx, "image", StatusCode::OK).await
}

/// Delete the volume named `image`.
///
/// See `GET /v1/volumes/image`.
#[utoipa::path(delete, path = "/v1/volumes/image", tag = "volumes",
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn delete_volume_named_image(
    AxumState(ctx): AxumState<Ctx>,
) -> Result<StatusCode, ApiError> {
    submit(
        &ctx,
        Command::DeleteVolume {
            name: "image".into(),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create a volume.
///
/// Carves the volume from the pool's free extents. 409
/// `insufficient_capacity` says how much the pool has. With `thin`,
/// `size_bytes` is the virtual size and `thin.real_size_bytes` (rounded up
/// to whole extents) is what the pool gives.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes",
    request_body = CreateVolumeRequest,
    responses(
        (status = 201, description = "the new volume", body = VolumeView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn create_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> Result<Response, ApiError> {
    let name = req.name.clone();
    let layout = match req.layout.unwrap_or(LayoutRequest::Striped) {
        LayoutRequest::Striped => VolumeLayout::Striped,
        LayoutRequest::Sequential => VolumeLayout::Sequential,
    };
    submit(
        &ctx,
        Command::CreateVolume {
            name: req.name,
            pool: req.pool,
            size_bytes: req.size_bytes,
            layout,
            mdisks: req.mdisks.unwrap_or_default(),
            thin: req.thin.map(|t| ThinParams {
                real_size_bytes: t.real_size_bytes,
                grain_kib: t.grain_kib.unwrap_or(THIN_GRAIN_KIB_DEFAULT),
            }),
            io_group: req.io_group,
        },
    )
    .await?;
    volume_response(&ctx, &name, StatusCode::CREATED).await
}

/// Create an image-mode volume.
///
/// The volume is exactly one unmanaged mdisk, its data kept as is.
#[utoipa::path(post, path = "/v1/volumes/image", tag = "volumes",
    request_body = CreateImageVolumeRequest,
    responses(
        (status = 201, description = "the new volume", body = VolumeView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn create_image_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<CreateImageVolumeRequest>,
) -> Result<Response, ApiError> {
    let name = req.name.clone();
    submit(
        &ctx,
        Command::CreateImageVolume {
            name: req.name,
            pool: req.pool,
            mdisk: req.mdisk,
            io_group: req.io_group,
        },
    )
    .await?;
    volume_response(&ctx, &name, StatusCode::CREATED).await
}

/// Expand a volume.
///
/// Grows it to `size_bytes`, adding extents with its layout. A thin volume
/// grows its virtual size only.
#[utoipa::path(post, path = "/v1/volumes/{name}/expand", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = ExpandVolumeRequest,
    responses(
        (status = 200, description = "the volume", body = VolumeView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn expand_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<ExpandVolumeRequest>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::ExpandVolume {
            name: name.clone(),
            new_size_bytes: req.size_bytes,
        },
    )
    .await?;
    volume_response(&ctx, &name, StatusCode::OK).await
}

/// Delete a volume.
///
/// Its extents return to the pool (an image-mode mdisk becomes unmanaged
/// again, data untouched). Refused (409) while it is mapped to a host.
#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn delete_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    submit(&ctx, Command::DeleteVolume { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rename a volume.
#[utoipa::path(post, path = "/v1/volumes/{name}/rename", tag = "volumes",
    params(("name" = String, Path, description = "current volume name")),
    request_body = RenameRequest,
    responses(
        (status = 200, description = "the volume", body = VolumeView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn rename_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Response, ApiError> {
    let new_name = req.new_name.clone();
    submit(
        &ctx,
        Command::RenameVolume {
            name,
            new_name: req.new_name,
        },
    )
    .await?;
    volume_response(&ctx, &new_name, StatusCode::OK).await
}

/// Set a volume's preferred node.
///
/// The node of the volume's I/O group that serves it by preference.
#[utoipa::path(post, path = "/v1/volumes/{name}/preferred-node", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = SetPreferredNodeRequest,
    responses(
        (status = 200, description = "the volume", body = VolumeView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "this node is in no cluster", body = ErrorBody),
        (status = 503, description = "the cluster cannot commit now", body = ErrorBody),
    ))]
pub async fn set_preferred_node(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetPreferredNodeRequest>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::SetPreferredNode {
            volume: name.clone(),
            node: req.node,
        },
    )
    .await?;
    volume_response(&ctx, &name, StatusCode::OK).await
}

/// Set a volume's cache mode.
///
/// `write_back` (completed once in both nodes' memory; write-through while
/// the I/O group's pair is not mirrored), `write_through` or `none`
/// (docs/cache.md).
#[utoipa::path(post, path = "/v1/volumes/{name}/cache-mode", tag = "volumes",
    params(("name" = String, Path, description = "volume name")),
    request_body = SetCacheModeRequest,
    responses(
        (status = 200, description = "the volume", body = VolumeView),
        (status = 400, description = "invalid request", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such volume", body = ErrorBody),
        (status = 503, description = "the cluster cannot commit now", body = ErrorBody),
    ))]
pub async fn set_cache_mode(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetCacheModeRequest>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::SetVolumeCacheMode {
            volume: name.clone(),
            mode: req.mode,
        },
    )
    .await?;
    volume_response(&ctx, &name, StatusCode::OK).await
}

// --------------------------------------------------------------- cluster

/// Create a cluster.
///
/// This standalone node becomes the first member (node 1, I/O group 0, the
/// leader) of a new cluster named `name`; its configuration becomes the
/// cluster's.
#[utoipa::path(post, path = "/v1/cluster", tag = "cluster",
    request_body = CreateClusterRequest,
    responses(
        (status = 201, description = "the new cluster", body = ClusterStatus),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "this node is already in a cluster", body = ErrorBody),
        (status = 503, description = "the cluster layer cannot take it now", body = ErrorBody),
    ))]
pub async fn create_cluster(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<CreateClusterRequest>,
) -> Result<Response, ApiError> {
    tracing::info!(name = %req.name, "admin API creates a cluster");
    let status = call(&ctx, move |s| s.cluster_create(req.name)).await??;
    Ok((StatusCode::CREATED, Json(status)).into_response())
}

/// Cluster status.
///
/// Name, leader, term, quorum, log indexes and every member with its role,
/// lease and I/O group. A standalone node answers with `name` null and no
/// members.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "the cluster as this node sees it", body = ClusterStatus),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
    ))]
pub async fn get_cluster(AxumState(ctx): AxumState<Ctx>) -> Result<Json<ClusterStatus>, ApiError> {
    Ok(Json(call(&ctx, |s| s.cluster_status()).await?))
}

/// List the cluster's nodes.
#[utoipa::path(get, path = "/v1/nodes", tag = "cluster",
    responses(
        (status = 200, description = "every member, by id", body = [MemberStatus]),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "this node is in no cluster", body = ErrorBody),
    ))]
pub async fn list_nodes(
    AxumState(ctx): AxumState<Ctx>,
) -> Result<Json<Vec<MemberStatus>>, ApiError> {
    let status = call(&ctx, |s| s.cluster_status()).await?;
    if status.name.is_none() {
        return Err(ConfigError::NotInCluster.into());
    }
    Ok(Json(status.members))
}

/// Add a node to the cluster.
///
/// `address` is the cluster RPC address of a running sanvirtd in no
/// cluster. It gets the next node id and the lowest I/O group with room (a
/// witness: none), and is offline until its first lease.
#[utoipa::path(post, path = "/v1/nodes", tag = "cluster",
    request_body = AddNodeRequest,
    responses(
        (status = 201, description = "the new member", body = MemberStatus),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "conflicts with the cluster (in no cluster, name or address in use)", body = ErrorBody),
        (status = 503, description = "the cluster cannot commit now or the node is unreachable", body = ErrorBody),
    ))]
pub async fn add_node(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<AddNodeRequest>,
) -> Result<Response, ApiError> {
    check_address("address", &req.address)?;
    tracing::info!(address = %req.address, "admin API adds a node");
    let member = call(&ctx, move |s| s.node_add(req.address)).await??;
    Ok((StatusCode::CREATED, Json(member)).into_response())
}

/// Remove a node from the cluster.
///
/// Its volumes move to its I/O-group partner. Refused (409) for the last
/// node that serves I/O and for the only node of an I/O group with volumes.
#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "cluster",
    params(("name" = String, Path, description = "node name")),
    responses(
        (status = 204, description = "removed"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such node", body = ErrorBody),
        (status = 409, description = "in use, or this node is in no cluster", body = ErrorBody),
        (status = 503, description = "the cluster cannot commit now", body = ErrorBody),
    ))]
pub async fn remove_node(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    tracing::info!(node = %name, "admin API removes a node");
    call(&ctx, move |s| s.node_remove(name)).await??;
    Ok(StatusCode::NO_CONTENT)
}

// ----------------------------------------------------------------- hosts

async fn host_response(ctx: &Ctx, name: &str, code: StatusCode) -> Result<Response, ApiError> {
    let state = snapshot(ctx).await?;
    Ok((code, Json(host_view(&state, name)?)).into_response())
}

/// List hosts.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, description = "every host", body = [HostView]), (status = 401, description = "missing or wrong token", body = ErrorBody)))]
pub async fn list_hosts(AxumState(ctx): AxumState<Ctx>) -> Result<Json<Vec<HostView>>, ApiError> {
    Ok(Json(host_views(&snapshot(&ctx).await?)))
}

/// Show one host.
///
/// Its initiators, CHAP mode (never the secrets) and mapped volumes.
#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 200, description = "the host", body = HostView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn get_host(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    host_response(&ctx, &name, StatusCode::OK).await
}

/// Create a host.
///
/// Each initiator name belongs to at most one host.
#[utoipa::path(post, path = "/v1/hosts", tag = "hosts",
    request_body = CreateHostRequest,
    responses(
        (status = 201, description = "the new host", body = HostView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn create_host(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<CreateHostRequest>,
) -> Result<Response, ApiError> {
    let name = req.name.clone();
    submit(
        &ctx,
        Command::CreateHost {
            name: req.name,
            initiators: req.initiators.unwrap_or_default(),
        },
    )
    .await?;
    host_response(&ctx, &name, StatusCode::CREATED).await
}

/// Delete a host.
///
/// Refused (409) while volumes are mapped to it.
#[utoipa::path(delete, path = "/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn delete_host(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    submit(&ctx, Command::DeleteHost { name }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rename a host.
#[utoipa::path(post, path = "/v1/hosts/{name}/rename", tag = "hosts",
    params(("name" = String, Path, description = "current host name")),
    request_body = RenameRequest,
    responses(
        (status = 200, description = "the host", body = HostView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn rename_host(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<RenameRequest>,
) -> Result<Response, ApiError> {
    let new_name = req.new_name.clone();
    submit(
        &ctx,
        Command::RenameHost {
            name,
            new_name: req.new_name,
        },
    )
    .await?;
    host_response(&ctx, &new_name, StatusCode::OK).await
}

/// Add an initiator to a host.
#[utoipa::path(post, path = "/v1/hosts/{name}/initiators", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    request_body = HostInitiatorRequest,
    responses(
        (status = 200, description = "the host", body = HostView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn add_host_initiator(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<HostInitiatorRequest>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::AddHostInitiator {
            host: name.clone(),
            initiator: req.initiator,
        },
    )
    .await?;
    host_response(&ctx, &name, StatusCode::OK).await
}

/// Remove an initiator from a host.
#[utoipa::path(delete, path = "/v1/hosts/{name}/initiators/{initiator}", tag = "hosts",
    params(
        ("name" = String, Path, description = "host name"),
        ("initiator" = String, Path, description = "iSCSI initiator name"),
    ),
    responses(
        (status = 200, description = "the host", body = HostView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn remove_host_initiator(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath((name, initiator)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::RemoveHostInitiator {
            host: name.clone(),
            initiator,
        },
    )
    .await?;
    host_response(&ctx, &name, StatusCode::OK).await
}

/// Set CHAP for a host.
///
/// One-way, or mutual with `mutual`. The secrets are stored in the node's
/// configuration and never returned: the host view shows only the mode.
#[utoipa::path(put, path = "/v1/hosts/{name}/chap", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    request_body = SetChapRequest,
    responses(
        (status = 200, description = "the host", body = HostView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn set_host_chap(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetChapRequest>,
) -> Result<Response, ApiError> {
    let chap = ChapSettings {
        username: req.username,
        secret: req.secret,
        mutual: req.mutual.map(|m| ChapMutual {
            username: m.username,
            secret: m.secret,
        }),
    };
    submit(
        &ctx,
        Command::SetHostChap {
            host: name.clone(),
            chap: Some(chap),
        },
    )
    .await?;
    host_response(&ctx, &name, StatusCode::OK).await
}

/// Remove CHAP from a host.
///
/// Its initiators then log in without authentication.
#[utoipa::path(delete, path = "/v1/hosts/{name}/chap", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 200, description = "the host", body = HostView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn clear_host_chap(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    submit(
        &ctx,
        Command::SetHostChap {
            host: name.clone(),
            chap: None,
        },
    )
    .await?;
    host_response(&ctx, &name, StatusCode::OK).await
}

// -------------------------------------------------------------- mappings

/// List mappings.
///
/// Every (host, LUN, volume), by host name then LUN.
#[utoipa::path(get, path = "/v1/mappings", tag = "mappings",
    responses((status = 200, description = "every mapping", body = [MappingView]), (status = 401, description = "missing or wrong token", body = ErrorBody)))]
pub async fn list_mappings(
    AxumState(ctx): AxumState<Ctx>,
) -> Result<Json<Vec<MappingView>>, ApiError> {
    Ok(Json(mapping_views(&snapshot(&ctx).await?)))
}

/// Map a volume to a host.
///
/// At `lun`, or the host's lowest free LUN. A volume is mapped at most
/// once per host; several hosts may map the same volume.
#[utoipa::path(post, path = "/v1/mappings", tag = "mappings",
    request_body = MapVolumeRequest,
    responses(
        (status = 201, description = "the new mapping", body = MappingView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
        (status = 409, description = "conflicts with the configuration (exists, in use, insufficient capacity)", body = ErrorBody),
    ))]
pub async fn map_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<MapVolumeRequest>,
) -> Result<Response, ApiError> {
    let (host, volume) = (req.host.clone(), req.volume.clone());
    submit(
        &ctx,
        Command::MapVolume {
            volume: req.volume,
            host: req.host,
            lun: req.lun,
        },
    )
    .await?;
    let state = snapshot(&ctx).await?;
    let m = mapping_views(&state)
        .into_iter()
        .find(|m| m.host == host && m.volume == volume)
        .ok_or_else(|| ApiError::internal("the new mapping is not in the state"))?;
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

/// Unmap a volume from a host.
#[utoipa::path(delete, path = "/v1/mappings/{host}/{volume}", tag = "mappings",
    params(
        ("host" = String, Path, description = "host name"),
        ("volume" = String, Path, description = "volume name"),
    ),
    responses(
        (status = 204, description = "unmapped"),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 404, description = "no such object", body = ErrorBody),
    ))]
pub async fn unmap_volume(
    AxumState(ctx): AxumState<Ctx>,
    ApiPath((host, volume)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    submit(&ctx, Command::UnmapVolume { volume, host }).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----------------------------------------------------------------- iscsi

/// Show the iSCSI portal setting.
///
/// A node-level setting. When not configured, the daemon's configuration
/// file decides.
#[utoipa::path(get, path = "/v1/iscsi/portal", tag = "iscsi",
    responses((status = 200, description = "the setting", body = IscsiPortalView), (status = 401, description = "missing or wrong token", body = ErrorBody)))]
pub async fn get_iscsi_portal(
    AxumState(ctx): AxumState<Ctx>,
) -> Result<Json<IscsiPortalView>, ApiError> {
    Ok(Json(portal_view(&snapshot(&ctx).await?)))
}

/// Set the iSCSI portal.
#[utoipa::path(put, path = "/v1/iscsi/portal", tag = "iscsi",
    request_body = IscsiPortalRequest,
    responses(
        (status = 200, description = "the setting", body = IscsiPortalView),
        (status = 400, description = "invalid request or refused as invalid", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
    ))]
pub async fn set_iscsi_portal(
    AxumState(ctx): AxumState<Ctx>,
    ApiJson(req): ApiJson<IscsiPortalRequest>,
) -> Result<Json<IscsiPortalView>, ApiError> {
    submit(
        &ctx,
        Command::SetIscsiPortal {
            portal: Some(IscsiPortal {
                listen: req.listen,
                enabled: req.enabled.unwrap_or(true),
            }),
        },
    )
    .await?;
    Ok(Json(portal_view(&snapshot(&ctx).await?)))
}

/// Clear the iSCSI portal setting.
///
/// The daemon's configuration file decides again.
#[utoipa::path(delete, path = "/v1/iscsi/portal", tag = "iscsi",
    responses(
        (status = 200, description = "the setting", body = IscsiPortalView),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
    ))]
pub async fn clear_iscsi_portal(
    AxumState(ctx): AxumState<Ctx>,
) -> Result<Json<IscsiPortalView>, ApiError> {
    submit(&ctx, Command::SetIscsiPortal { portal: None }).await?;
    Ok(Json(portal_view(&snapshot(&ctx).await?)))
}

// ------------------------------------------------------------- fallbacks

/// This OpenAPI document.
///
/// The only endpoint that needs no token.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "node", security(()),
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub async fn get_openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::openapi_json_cached(),
    )
        .into_response()
}

pub async fn no_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such endpoint; see GET /v1/openapi.json",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see GET /v1/openapi.json",
    )
}
