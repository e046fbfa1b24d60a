//! Every limit of the iSCSI front end, in one place (TIGER_STYLE: everything
//! has a limit, relationships are checked at compile time).

use sanvirt_facility::REQUEST_BYTES_MAX;

/// Bytes of a Basic Header Segment.
pub const BHS_BYTES: usize = 48;

/// Largest Additional Header Segment area (TotalAHSLength is 8 bits of
/// 4-byte words).
pub const AHS_BYTES_MAX: usize = 255 * 4;

/// A header digest (CRC32C).
pub const DIGEST_BYTES: usize = 4;

/// Largest header on the wire: BHS, AHS and header digest.
pub const HEADER_BYTES_MAX: usize = BHS_BYTES + AHS_BYTES_MAX + DIGEST_BYTES;

/// SCSI commands one connection may have between command PDU and the end of
/// its response (the CmdSN window is never wider). The completion set is one
/// `u64` bitmask.
pub const TASKS_MAX: usize = 64;

/// Smallest and largest MaxRecvDataSegmentLength (RFC 7143 §13.12).
pub const DATA_SEGMENT_BYTES_MIN: u32 = 512;
pub const DATA_SEGMENT_BYTES_PROTOCOL_MAX: u32 = (1 << 24) - 1;

/// The MaxRecvDataSegmentLength this target declares by default, and the
/// largest it accepts in its configuration.
pub const RECV_DATA_SEGMENT_BYTES_DEFAULT: u32 = 256 << 10;
pub const RECV_DATA_SEGMENT_BYTES_MAX: u32 = 1 << 20;

/// MaxBurstLength / FirstBurstLength offered by default.
pub const MAX_BURST_BYTES_DEFAULT: u32 = 1 << 20;
pub const FIRST_BURST_BYTES_DEFAULT: u32 = 256 << 10;

/// Outstanding R2Ts per task this target allows (MaxOutstandingR2T).
pub const OUTSTANDING_R2T_MAX: u32 = 4;

/// Largest data transfer of one command (both directions): the facility
/// API's request maximum.
pub const TRANSFER_BYTES_MAX: u32 = REQUEST_BYTES_MAX as u32;

/// Text negotiation limits: bytes of all login or text data of one exchange
/// (continuations included), one key, one value.
pub const TEXT_BYTES_MAX: usize = 64 << 10;
pub const KEY_BYTES_MAX: usize = 63;
pub const VALUE_BYTES_MAX: usize = 8192;
/// Keys in one exchange.
pub const KEYS_MAX: usize = 128;

/// iSCSI names (RFC 7143 §4.2.7.1: at most 223 bytes).
pub const NAME_BYTES_MAX: usize = 223;

/// Login request PDUs one login may take (security + operational stages).
pub const LOGIN_PDUS_MAX: usize = 32;

/// CHAP: challenge bytes this target sends, longest challenge and response
/// accepted from an initiator (MD5: 16 bytes), longest CHAP_N.
pub const CHAP_CHALLENGE_BYTES: usize = 16;
pub const CHAP_CHALLENGE_BYTES_MAX: usize = 1024;
pub const CHAP_NAME_BYTES_MAX: usize = 255;

/// Control PDUs (responses other than SCSI data) waiting to be sent before
/// the connection stops reading requests.
pub const CONTROL_QUEUE_MAX: usize = 64;

/// PDUs staged for one `writev` round.
pub const STAGED_PDUS_MAX: usize = 256;

/// iovecs handed to one `writev` (Linux `IOV_MAX`) / one `readv`.
pub const SEND_IOV_MAX: usize = 1024;
pub const RECV_IOV_MAX: usize = 256;

/// Per-connection scratch for discarded payloads.
pub const DISCARD_CHUNK_BYTES: usize = 16 << 10;

/// Poll-loop rounds before a connection yields to the runtime.
pub const POLL_ROUNDS_MAX: usize = 32;

/// Default and largest number of concurrent connections.
pub const CONNECTIONS_DEFAULT: usize = 256;
pub const CONNECTIONS_MAX: usize = 4096;

/// A connection short of buffers waits in the pool's FIFO queue; if the pool
/// refuses even to queue it, it retries this often.
pub const BUFFER_RETRY_INTERVAL_MS: u64 = 1;

/// Default timeouts (seconds).
pub const LOGIN_TIMEOUT_S_DEFAULT: u64 = 30;
pub const DATA_OUT_TIMEOUT_S_DEFAULT: u64 = 30;
pub const NOP_INTERVAL_S_DEFAULT: u64 = 30;
pub const NOP_TIMEOUT_S_DEFAULT: u64 = 30;
pub const SHUTDOWN_GRACE_S_DEFAULT: u64 = 10;
/// How long a reinstating login waits for the old session to end.
pub const REINSTATE_WAIT_S: u64 = 30;

const _: () = assert!(TASKS_MAX <= 64, "completion set is one u64 bitmask");
const _: () = assert!(RECV_DATA_SEGMENT_BYTES_DEFAULT <= RECV_DATA_SEGMENT_BYTES_MAX);
const _: () = assert!(RECV_DATA_SEGMENT_BYTES_MAX <= DATA_SEGMENT_BYTES_PROTOCOL_MAX);
const _: () = assert!(DATA_SEGMENT_BYTES_MIN <= RECV_DATA_SEGMENT_BYTES_DEFAULT);
const _: () = assert!(FIRST_BURST_BYTES_DEFAULT <= MAX_BURST_BYTES_DEFAULT);
const _: () = assert!(MAX_BURST_BYTES_DEFAULT <= DATA_SEGMENT_BYTES_PROTOCOL_MAX);
const _: () = assert!(TEXT_BYTES_MAX >= RECV_DATA_SEGMENT_BYTES_DEFAULT as usize / 4);
const _: () = assert!(VALUE_BYTES_MAX < TEXT_BYTES_MAX);
const _: () = assert!(CONNECTIONS_DEFAULT <= CONNECTIONS_MAX);
const _: () = assert!(STAGED_PDUS_MAX * 3 <= SEND_IOV_MAX || STAGED_PDUS_MAX <= SEND_IOV_MAX);
const _: () = assert!(CONTROL_QUEUE_MAX >= 4);
