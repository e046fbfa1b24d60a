//! The OpenAPI 3 description, generated from the handlers' `#[utoipa::path]`
//! attributes and the body types. Served at `GET /v1/openapi.json` and kept
//! in `docs/openapi.json` (a test fails when that file is stale).

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::handlers;
use crate::service::{DiskState, MdiskStatus};
use crate::views::*;

/// Schemas of the configuration crate's types, which do not derive
/// `ToSchema`. Each mirror serializes exactly like the original: the
/// conversions below destructure every variant and field, so a change to
/// `sanvirt_config::Command` or `Outcome` fails to compile here until the
/// mirror follows, and a test compares their JSON forms.
pub mod schema {
    use serde::Serialize;
    use utoipa::ToSchema;

    /// How a new volume's extents are placed on the pool's mdisks.
    #[derive(Debug, Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum VolumeLayout {
        Striped,
        Sequential,
    }

    /// One configuration command (`sanvirt_config::Command`): the form the
    /// journal, `POST /v1/commands` and `sanvirt command --json` share.
    #[derive(Debug, Serialize, ToSchema)]
    #[serde(tag = "op", rename_all = "snake_case")]
    pub enum Command {
        AddMdisk {
            name: String,
            path: String,
            capacity_bytes: u64,
        },
        RemoveMdisk {
            name: String,
        },
        RenameMdisk {
            name: String,
            new_name: String,
        },
        CreatePool {
            name: String,
            extent_size_mib: u32,
        },
        DeletePool {
            name: String,
        },
        RenamePool {
            name: String,
            new_name: String,
        },
        AddMdiskToPool {
            mdisk: String,
            pool: String,
        },
        RemoveMdiskFromPool {
            mdisk: String,
        },
        CreateVolume {
            name: String,
            pool: String,
            size_bytes: u64,
            layout: VolumeLayout,
            /// Optional (default: empty, the whole pool).
            #[serde(default)]
            mdisks: Vec<String>,
        },
        CreateImageVolume {
            name: String,
            pool: String,
            mdisk: String,
        },
        ExpandVolume {
            name: String,
            new_size_bytes: u64,
        },
        DeleteVolume {
            name: String,
        },
        RenameVolume {
            name: String,
            new_name: String,
        },
    }

    /// What an applied command produced: `"done"` or
    /// `{"created": {"id": 3, "name": "p0"}}`.
    #[derive(Debug, Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum Outcome {
        Done,
        Created { id: u64, name: String },
    }

    impl From<sanvirt_config::VolumeLayout> for VolumeLayout {
        fn from(l: sanvirt_config::VolumeLayout) -> Self {
            match l {
                sanvirt_config::VolumeLayout::Striped => VolumeLayout::Striped,
                sanvirt_config::VolumeLayout::Sequential => VolumeLayout::Sequential,
            }
        }
    }

    impl From<sanvirt_config::Outcome> for Outcome {
        fn from(o: sanvirt_config::Outcome) -> Self {
            match o {
                sanvirt_config::Outcome::Done => Outcome::Done,
                sanvirt_config::Outcome::Created { id, name } => Outcome::Created { id, name },
            }
        }
    }

    impl From<sanvirt_config::Command> for Command {
        fn from(c: sanvirt_config::Command) -> Self {
            use sanvirt_config::Command as C;
            match c {
                C::AddMdisk {
                    name,
                    path,
                    capacity_bytes,
                } => Command::AddMdisk {
                    name,
                    path,
                    capacity_bytes,
                },
                C::RemoveMdisk { name } => Command::RemoveMdisk { name },
                C::RenameMdisk { name, new_name } => Command::RenameMdisk { name, new_name },
                C::CreatePool {
                    name,
                    extent_size_mib,
                } => Command::CreatePool {
                    name,
                    extent_size_mib,
                },
                C::DeletePool { name } => Command::DeletePool { name },
                C::RenamePool { name, new_name } => Command::RenamePool { name, new_name },
                C::AddMdiskToPool { mdisk, pool } => Command::AddMdiskToPool { mdisk, pool },
                C::RemoveMdiskFromPool { mdisk } => Command::RemoveMdiskFromPool { mdisk },
                C::CreateVolume {
                    name,
                    pool,
                    size_bytes,
                    layout,
                    mdisks,
                } => Command::CreateVolume {
                    name,
                    pool,
                    size_bytes,
                    layout: layout.into(),
                    mdisks,
                },
                C::CreateImageVolume { name, pool, mdisk } => {
                    Command::CreateImageVolume { name, pool, mdisk }
                }
                C::ExpandVolume {
                    name,
                    new_size_bytes,
                } => Command::ExpandVolume {
                    name,
                    new_size_bytes,
                },
                C::DeleteVolume { name } => Command::DeleteVolume { name },
                C::RenameVolume { name, new_name } => Command::RenameVolume { name, new_name },
            }
        }
    }
}

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
    ),
    components(schemas(
        StatusView, MdiskStatus, DiskState, MdiskView, MdiskModeView, PoolView, VolumeView,
        LayoutView, ErrorBody, CreateMdiskRequest, RenameRequest, CreatePoolRequest,
        PoolMdiskRequest, LayoutRequest, CreateVolumeRequest, ExpandVolumeRequest,
        CreateImageVolumeRequest, schema::Command, schema::Outcome, schema::VolumeLayout,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "node", description = "The node"),
        (name = "commands", description = "Raw configuration commands, for scripts"),
        (name = "mdisks", description = "Managed disks: files and block devices"),
        (name = "pools", description = "Storage pools of extents"),
        (name = "volumes", description = "Virtual disks carved from pools"),
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
