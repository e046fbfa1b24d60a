//! The connection's slab of in-flight request futures: the shared
//! [`sanvirt_facility::slab::FutureSlab`] with [`IN_FLIGHT_MAX`] slots.

use crate::limits::IN_FLIGHT_MAX;

pub use sanvirt_facility::slab::ReadySet;

pub type FutureSlab<F> = sanvirt_facility::slab::FutureSlab<F, IN_FLIGHT_MAX>;
