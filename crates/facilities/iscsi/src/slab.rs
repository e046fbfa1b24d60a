//! The connection's slab of in-flight command futures: the shared
//! [`sanvirt_facility::slab::FutureSlab`] with [`TASKS_MAX`] slots.

use crate::limits::TASKS_MAX;

pub use sanvirt_facility::slab::ReadySet;

pub type FutureSlab<F> = sanvirt_facility::slab::FutureSlab<F, TASKS_MAX>;
