//! Every limit of the NBD front end, in one place (TIGER_STYLE: everything has
//! a limit, relationships are checked at compile time).

use sanvirt_facility::REQUEST_BYTES_MAX;

/// Longest string the protocol allows (export names, queries, messages).
pub const STRING_BYTES_MAX: usize = 4096;

/// Largest option payload read into memory during the handshake. The largest
/// legitimate option is `NBD_OPT_SET_META_CONTEXT` with an export name of
/// [`STRING_BYTES_MAX`] and a few queries.
pub const OPTION_DATA_BYTES_MAX: usize = 16 << 10;

/// Longer option payloads are skipped in [`DISCARD_CHUNK_BYTES`] pieces and
/// refused with `NBD_REP_ERR_TOO_BIG`, up to this size; beyond it the client is
/// treated as hostile and disconnected.
pub const OPTION_DISCARD_BYTES_MAX: u64 = 1 << 20;

/// Options one session may send before it must enter transmission.
pub const OPTIONS_PER_SESSION_MAX: usize = 256;

/// Queries one `NBD_OPT_{LIST,SET}_META_CONTEXT` may carry.
pub const META_QUERIES_MAX: usize = 64;

/// Largest READ or WRITE payload, advertised as the maximum block size.
pub const PAYLOAD_BYTES_MAX: u32 = REQUEST_BYTES_MAX as u32;

/// Over-long WRITE payloads up to this size are read and thrown away with
/// bounded memory (the request gets `EINVAL`, the session stays in sync);
/// larger ones close the connection, as the protocol allows.
pub const OVERSIZE_WRITE_DISCARD_BYTES_MAX: u64 = 64 << 20;

/// Requests one connection may have in flight (received, not yet fully
/// replied to). The connection stops reading from the socket when all slots
/// are busy: TCP flow control is the backpressure towards the client.
pub const IN_FLIGHT_MAX: usize = 64;

/// Bytes of one request header.
pub const REQUEST_HEADER_BYTES: usize = 28;

/// Largest reply header a slot stores: a structured error chunk header (20)
/// plus error (4), message length (2) and message.
pub const SLOT_HEADER_BYTES_MAX: usize = 20 + 6 + ERROR_MESSAGE_BYTES_MAX;

/// Longest human-readable message in a structured error chunk.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 120;

/// Block status descriptors in one reply chunk.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 128;

/// iovecs handed to one `writev` of replies (Linux `IOV_MAX`).
pub const SEND_IOV_MAX: usize = 1024;

/// iovecs handed to one `readv` of a WRITE payload.
pub const RECV_IOV_MAX: usize = 256;

/// WRITE batches (one peek for several requests, `Transmission::recv_batch`):
/// requests per batch, bytes per batch (headers and payloads), iovecs per
/// peek, and the longest payload batched (longer writes gain nothing: a
/// batch would hold too few).
pub const BATCH_REQUESTS_MAX: usize = 16;
pub const BATCH_BYTES_MAX: usize = 64 << 10;
pub const BATCH_IOV_MAX: usize = 64;
pub const BATCH_PAYLOAD_MAX: usize = 16 << 10;

/// Scratch memory per connection (peeked headers, and accepted bytes a
/// payload `readv` reads out); also the piece size in which refused WRITE
/// payloads are thrown away (`MSG_TRUNC`, no copy).
pub const DISCARD_CHUNK_BYTES: usize = 16 << 10;

/// Parsed request headers (and payloads a batch peek put in place) left
/// unread in the socket (with a peek offset) are thrown away once this many
/// bytes have gathered, unless a WRITE payload's `readv` takes them first.
pub const CONSUME_BATCH_BYTES: usize = 4096;

/// A connection short of buffers waits in the pool's FIFO queue; if the pool
/// refuses even to queue it (too many waiters), it retries this often.
pub const BUFFER_RETRY_INTERVAL_MS: u64 = 1;

/// Poll-loop rounds before a connection yields to the runtime.
pub const POLL_ROUNDS_MAX: usize = 32;

/// Request coalescing (`crate::coalesce`): default largest batch an idle
/// connection waits for, and the bounds and default of the wait.
pub const COALESCE_REQUESTS_DEFAULT: u32 = 16;
pub const COALESCE_WAIT_US_DEFAULT: u64 = 200;
pub const COALESCE_WAIT_US_MIN: u64 = 10;
pub const COALESCE_WAIT_US_MAX: u64 = 10_000;

/// Default and largest number of concurrent connections.
pub const CONNECTIONS_DEFAULT: usize = 256;
pub const CONNECTIONS_MAX: usize = 4096;

/// Default time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT_S_DEFAULT: u64 = 30;

/// Default time connections get, after shutdown, to finish their in-flight
/// requests and send the replies; then they are dropped.
pub const SHUTDOWN_GRACE_S_DEFAULT: u64 = 10;

const _: () = assert!(IN_FLIGHT_MAX <= 64, "ready set is one u64 bitmask");
const _: () = assert!(IN_FLIGHT_MAX <= u8::MAX as usize, "slot ids are u8");
const _: () = assert!(PAYLOAD_BYTES_MAX as u64 == REQUEST_BYTES_MAX);
const _: () = assert!(PAYLOAD_BYTES_MAX as u64 <= OVERSIZE_WRITE_DISCARD_BYTES_MAX);
const _: () = assert!(OPTION_DATA_BYTES_MAX >= 4 + STRING_BYTES_MAX + 2 + 2 * 8);
const _: () = assert!(OPTION_DATA_BYTES_MAX as u64 <= OPTION_DISCARD_BYTES_MAX);
const _: () = assert!(ERROR_MESSAGE_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(BLOCK_STATUS_EXTENTS_MAX >= 1 && BLOCK_STATUS_EXTENTS_MAX <= 1 << 20);
const _: () = assert!(DISCARD_CHUNK_BYTES >= IN_FLIGHT_MAX * REQUEST_HEADER_BYTES);
// At least one request of the longest batched payload fits a batch peek.
const _: () = assert!(BATCH_BYTES_MAX >= REQUEST_HEADER_BYTES + BATCH_PAYLOAD_MAX);
const _: () = assert!(BATCH_IOV_MAX > BATCH_PAYLOAD_MAX / 4096 + 1);
const _: () = assert!(BATCH_REQUESTS_MAX <= IN_FLIGHT_MAX);
// Pending headers plus one more peek fit the scratch the readv throws them into.
const _: () =
    assert!(CONSUME_BATCH_BYTES + IN_FLIGHT_MAX * REQUEST_HEADER_BYTES <= DISCARD_CHUNK_BYTES);
const _: () = assert!(CONNECTIONS_DEFAULT <= CONNECTIONS_MAX);
const _: () = assert!(COALESCE_REQUESTS_DEFAULT as usize <= IN_FLIGHT_MAX);
const _: () = assert!(
    COALESCE_WAIT_US_MIN <= COALESCE_WAIT_US_DEFAULT
        && COALESCE_WAIT_US_DEFAULT <= COALESCE_WAIT_US_MAX
);
