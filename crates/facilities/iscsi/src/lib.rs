//! The iSCSI front-end facility (RFC 7143 target). Under construction.
