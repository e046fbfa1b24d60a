//! What to do with one transmission request: a pure function of the request
//! header and what the session negotiated, so every rule of the protocol
//! document's "Request types" and "Error values" sections is unit-tested
//! without a socket.

use sanvirt_facility::IoError;

use crate::limits::OVERSIZE_WRITE_DISCARD_BYTES_MAX;
use crate::proto::*;

/// What a request may do on this session's export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportView {
    /// Current size of the export.
    pub size: u64,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    /// Structured replies negotiated (enables `NBD_CMD_FLAG_DF`).
    pub structured: bool,
    /// `base:allocation` selected for this export (enables `BLOCK_STATUS`).
    pub block_status: bool,
    /// The disk path is available (an offline disk answers `EIO`).
    pub online: bool,
    /// Largest READ/WRITE payload.
    pub payload_max: u32,
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid: execute it.
    Execute,
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
    /// Answer `errno` without executing; first read and throw away `discard`
    /// payload bytes so the stream stays in sync.
    Reject { errno: u32, discard: u32 },
    /// The payload is too large even to throw away: close the connection.
    Close { reason: &'static str },
}

/// Command flags each command accepts (FUA is valid on every command once
/// `NBD_FLAG_SEND_FUA` is advertised, which this server always does).
fn allowed_flags(cmd: Command, v: &ExportView) -> u16 {
    match cmd {
        Command::Read if v.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

fn beyond(h: &RequestHeader, size: u64) -> bool {
    h.offset
        .checked_add(h.len as u64)
        .is_none_or(|end| end > size)
}

/// Decides what to do with request `h`.
pub fn judge(h: &RequestHeader, v: &ExportView) -> Verdict {
    let cmd = h.command();
    let discard = h.payload_len();
    let reject = |errno| Verdict::Reject { errno, discard };
    match cmd {
        Command::Disc => return Verdict::Disconnect,
        // An unknown command cannot carry a payload we know of: assume none.
        Command::Unknown(_) => return reject(NBD_EINVAL),
        _ => {}
    }
    if cmd == Command::Write && h.len > v.payload_max {
        if h.len as u64 > OVERSIZE_WRITE_DISCARD_BYTES_MAX {
            return Verdict::Close {
                reason: "write payload too large to discard",
            };
        }
        return reject(NBD_EINVAL);
    }
    if h.flags & !allowed_flags(cmd, v) != 0 {
        return reject(NBD_EINVAL);
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && v.read_only {
        return reject(NBD_EPERM);
    }
    match cmd {
        Command::Read if h.len > v.payload_max => return reject(NBD_EINVAL),
        Command::Flush if h.offset != 0 || h.len != 0 => return reject(NBD_EINVAL),
        Command::Trim if !v.can_trim => return reject(NBD_EINVAL),
        Command::WriteZeroes if !v.can_write_zeroes => return reject(NBD_EINVAL),
        Command::BlockStatus if !v.block_status || h.len == 0 => return reject(NBD_EINVAL),
        _ => {}
    }
    if cmd != Command::Flush && beyond(h, v.size) {
        // Writes beyond the end are "no space"; everything else is invalid.
        let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return reject(errno);
    }
    if cmd == Command::WriteZeroes && h.flags & CMD_FLAG_FAST_ZERO != 0 {
        // This front end cannot know in advance that zeroing is faster than
        // writing, so it fails fast zero requests quickly, as allowed.
        return reject(NBD_ENOTSUP);
    }
    if !v.online && cmd != Command::Cache {
        return reject(NBD_EIO);
    }
    Verdict::Execute
}

/// The NBD error value for an error from the IOServer. Only values the
/// protocol defines are returned.
pub fn errno_for(e: &IoError, cmd: Command) -> u32 {
    match e {
        IoError::OutOfRange { .. } => match cmd {
            Command::Write | Command::WriteZeroes => NBD_ENOSPC,
            _ => NBD_EINVAL,
        },
        IoError::Invalid { .. } | IoError::NotSupported { .. } => NBD_EINVAL,
        IoError::NoSpace { .. } => NBD_ENOSPC,
        IoError::Exhausted { .. } => NBD_ENOMEM,
        IoError::NoSuchDisk { .. }
        | IoError::Unavailable { .. }
        | IoError::Medium { .. }
        | IoError::NotOwner { .. } => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ExportView {
        ExportView {
            size: 1 << 20,
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            structured: true,
            block_status: true,
            online: true,
            payload_max: 32 << 20,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    fn rej(errno: u32, discard: u32) -> Verdict {
        Verdict::Reject { errno, discard }
    }

    #[test]
    fn valid_requests_execute() {
        let v = view();
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES] {
            assert_eq!(judge(&req(kind, 0, 4096, 4096), &v), Verdict::Execute);
            assert_eq!(
                judge(&req(kind, CMD_FLAG_FUA, 0, 1 << 20), &v),
                Verdict::Execute
            );
        }
        assert_eq!(judge(&req(CMD_FLUSH, 0, 0, 0), &v), Verdict::Execute);
        assert_eq!(
            judge(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &v),
            Verdict::Execute
        );
        assert_eq!(
            judge(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &v),
            Verdict::Execute
        );
        assert_eq!(
            judge(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512), &v),
            Verdict::Execute
        );
        assert_eq!(judge(&req(CMD_DISC, 0xffff, 5, 5), &v), Verdict::Disconnect);
    }

    #[test]
    fn ranges() {
        let v = view();
        assert_eq!(
            judge(&req(CMD_READ, 0, (1 << 20) - 512, 1024), &v),
            rej(NBD_EINVAL, 0)
        );
        assert_eq!(
            judge(&req(CMD_WRITE, 0, 1 << 20, 512), &v),
            rej(NBD_ENOSPC, 512)
        );
        assert_eq!(
            judge(&req(CMD_WRITE_ZEROES, 0, u64::MAX, 2), &v),
            rej(NBD_ENOSPC, 0)
        );
        assert_eq!(
            judge(&req(CMD_TRIM, 0, u64::MAX - 1, 4), &v),
            rej(NBD_EINVAL, 0)
        );
        assert_eq!(
            judge(&req(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &v),
            rej(NBD_EINVAL, 0)
        );
        assert_eq!(judge(&req(CMD_READ, 0, 1 << 20, 0), &v), Verdict::Execute);
    }

    #[test]
    fn sizes() {
        let v = view();
        let big = (32 << 20) + 1;
        assert_eq!(judge(&req(CMD_READ, 0, 0, big), &v), rej(NBD_EINVAL, 0));
        assert_eq!(judge(&req(CMD_WRITE, 0, 0, big), &v), rej(NBD_EINVAL, big));
        assert!(matches!(
            judge(&req(CMD_WRITE, 0, 0, u32::MAX), &v),
            Verdict::Close { .. }
        ));
        // Payload-less commands may exceed the payload limit.
        let mut v2 = v;
        v2.size = u64::MAX;
        assert_eq!(judge(&req(CMD_TRIM, 0, 0, u32::MAX), &v2), Verdict::Execute);
    }

    #[test]
    fn flags_and_capabilities() {
        let mut v = view();
        assert_eq!(
            judge(&req(CMD_READ, 1 << 9, 0, 512), &v),
            rej(NBD_EINVAL, 0)
        );
        assert_eq!(
            judge(&req(CMD_WRITE, CMD_FLAG_DF, 0, 512), &v),
            rej(NBD_EINVAL, 512)
        );
        assert_eq!(judge(&req(CMD_FLUSH, 0, 1, 0), &v), rej(NBD_EINVAL, 0));
        assert_eq!(judge(&req(77, 0, 0, 512), &v), rej(NBD_EINVAL, 0));
        assert_eq!(
            judge(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &v),
            rej(NBD_ENOTSUP, 0)
        );
        v.structured = false;
        assert_eq!(
            judge(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &v),
            rej(NBD_EINVAL, 0)
        );
        v.block_status = false;
        assert_eq!(
            judge(&req(CMD_BLOCK_STATUS, 0, 0, 512), &v),
            rej(NBD_EINVAL, 0)
        );
        v.can_trim = false;
        v.can_write_zeroes = false;
        assert_eq!(judge(&req(CMD_TRIM, 0, 0, 512), &v), rej(NBD_EINVAL, 0));
        assert_eq!(
            judge(&req(CMD_WRITE_ZEROES, 0, 0, 512), &v),
            rej(NBD_EINVAL, 0)
        );
    }

    #[test]
    fn read_only_and_offline() {
        let mut v = view();
        v.read_only = true;
        assert_eq!(judge(&req(CMD_WRITE, 0, 0, 512), &v), rej(NBD_EPERM, 512));
        assert_eq!(judge(&req(CMD_TRIM, 0, 0, 512), &v), rej(NBD_EPERM, 0));
        assert_eq!(judge(&req(CMD_READ, 0, 0, 512), &v), Verdict::Execute);
        v.read_only = false;
        v.online = false;
        assert_eq!(judge(&req(CMD_READ, 0, 0, 512), &v), rej(NBD_EIO, 0));
        assert_eq!(judge(&req(CMD_WRITE, 0, 0, 512), &v), rej(NBD_EIO, 512));
        assert_eq!(judge(&req(CMD_FLUSH, 0, 0, 0), &v), rej(NBD_EIO, 0));
    }

    #[test]
    fn io_errors_map_to_protocol_values() {
        let oor = IoError::OutOfRange {
            disk: 1,
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(errno_for(&oor, Command::Write), NBD_ENOSPC);
        assert_eq!(errno_for(&oor, Command::Read), NBD_EINVAL);
        let gone = IoError::Unavailable {
            disk: 1,
            reason: "x".into(),
        };
        assert_eq!(errno_for(&gone, Command::Read), NBD_EIO);
        assert_eq!(
            errno_for(&IoError::NoSpace { disk: 1 }, Command::Write),
            NBD_ENOSPC
        );
    }
}
