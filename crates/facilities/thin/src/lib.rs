//! The thin-provisioning facility. Under construction.
