//! The OpenAPI 3 description, generated from the handlers' `#[utoipa::path]`
//! attributes and the body types. Served at `GET /v1/openapi.json` and kept
//! in `docs/openapi.json` (a test fails when that file is stale).

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::handlers;
use crate::service::{
    CachePairView, ClusterStatus, DiskState, MdiskStatus, MemberRole, MemberStatus,
};
use crate::views::*;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The token in sanvirtd's token file (default data/api-token).",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sanvirt admin API",
        description = "REST over sanvirt's configuration model: every change is one \
            configuration command, validated, journaled and applied atomically. \
            Every endpoint except GET /v1/openapi.json needs `Authorization: Bearer <token>`. \
            Errors are JSON: {\"error\": kind, \"message\": text, ...fields}.",
    ),
    paths(
        handlers::get_status,
        handlers::get_openapi,
        handlers::post_command,
        handlers::list_mdisks,
        handlers::create_mdisk,
        handlers::get_mdisk,
        handlers::delete_mdisk,
        handlers::rename_mdisk,
        handlers::list_pools,
        handlers::create_pool,
        handlers::get_pool,
        handlers::delete_pool,
        handlers::rename_pool,
        handlers::add_pool_mdisk,
        handlers::remove_pool_mdisk,
        handlers::list_volumes,
        handlers::create_volume,
        handlers::create_image_volume,
        handlers::get_volume_named_image,
        handlers::delete_volume_named_image,
        handlers::get_volume,
        handlers::delete_volume,
        handlers::rename_volume,
        handlers::expand_volume,
        handlers::set_preferred_node,
        handlers::set_cache_mode,
        handlers::create_cluster,
        handlers::get_cluster,
        handlers::list_nodes,
        handlers::add_node,
        handlers::remove_node,
        handlers::list_hosts,
        handlers::create_host,
        handlers::get_host,
        handlers::delete_host,
        handlers::rename_host,
        handlers::add_host_initiator,
        handlers::remove_host_initiator,
        handlers::set_host_chap,
        handlers::clear_host_chap,
        handlers::list_mappings,
        handlers::map_volume,
        handlers::unmap_volume,
        handlers::get_iscsi_portal,
        handlers::set_iscsi_portal,
        handlers::clear_iscsi_portal,
    ),
    components(schemas(
        StatusView, MdiskStatus, DiskState, MdiskView, MdiskModeView, PoolView, VolumeView,
        LayoutView, ErrorBody, CreateMdiskRequest, RenameRequest, CreatePoolRequest,
        PoolMdiskRequest, LayoutRequest, CreateVolumeRequest, ExpandVolumeRequest,
        CreateImageVolumeRequest, ThinRequest, ThinView, CreateHostRequest, HostInitiatorRequest,
        SetChapRequest, MutualChapRequest, MapVolumeRequest, IscsiPortalRequest, HostView,
        HostLunView, VolumeMappingView, MappingView, IscsiPortalView, SetPreferredNodeRequest, SetCacheModeRequest,
        CreateClusterRequest, AddNodeRequest, ClusterStatus, CachePairView, MemberStatus, MemberRole,
        sanvirt_config::Command, sanvirt_config::Outcome, sanvirt_config::VolumeLayout,
        sanvirt_config::ThinParams, sanvirt_config::ChapSettings, sanvirt_config::ChapMutual,
        sanvirt_config::ChapSecret, sanvirt_config::ChapMode, sanvirt_config::IscsiPortal,
        sanvirt_config::PrState, sanvirt_config::reservations::PrRegistration,
        sanvirt_config::reservations::PrReservation, sanvirt_config::reservations::PrNexus,
        sanvirt_config::NodeSpec, sanvirt_config::VolumeCacheMode,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "node", description = "The node"),
        (name = "commands", description = "Raw configuration commands, for scripts"),
        (name = "mdisks", description = "Managed disks: files and block devices"),
        (name = "pools", description = "Storage pools of extents"),
        (name = "volumes", description = "Virtual disks carved from pools"),
        (name = "hosts", description = "Hosts: initiator names and CHAP"),
        (name = "mappings", description = "Which host sees which volume at which LUN"),
        (name = "iscsi", description = "The node's iSCSI target settings"),
        (name = "cluster", description = "The cluster: its status and its nodes"),
    ),
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON, newline-terminated (the form kept in
/// `docs/openapi.json`).
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document is plain data and always serializes");
    text.push('\n');
    text
}

pub(crate) fn openapi_json_cached() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(openapi_json)
}
