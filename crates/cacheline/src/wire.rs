//! The messages of the cache line and their encoding (docs/cache.md, "The
//! cache line").
//!
//! A frame is a 4-byte big-endian length followed by that many bytes: one
//! kind byte and the message's fields, big-endian, in the order below.
//! Every field is bounds-checked when decoded; a frame that does not decode
//! exactly ends the line ([`WireError`]).

use std::sync::Arc;

use sanvirt_facility::{AllocExtent, DiskId, IoError, IoOp};
use sanvirt_objpool::credit::{CreditMsg, LineId};

/// "SANVLINE".
pub const MAGIC: u64 = 0x5341_4E56_4C49_4E45;
pub const VERSION: u16 = 1;
/// Largest frame accepted: the largest request plus its header.
pub const FRAME_MAX: usize = (64 << 20) + 64;
/// Most extents in one block status answer, destaged pages in one
/// notification.
pub const LIST_MAX: usize = 1 << 20;
/// Longest error text carried.
pub const TEXT_MAX: usize = 1024;

/// The first message on a line, in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub magic: u64,
    pub version: u16,
    /// The cluster's identity (a hash of its uid): a line between nodes of
    /// two clusters is refused.
    pub cluster: u64,
    pub io_group: u32,
    pub node: u32,
}

/// An I/O error as it crosses the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireIoError {
    pub code: u8,
    pub errno: i32,
    pub offset: u64,
    pub text: String,
}

const E_NO_SUCH_DISK: u8 = 1;
const E_OUT_OF_RANGE: u8 = 2;
const E_INVALID: u8 = 3;
const E_NOT_SUPPORTED: u8 = 4;
const E_UNAVAILABLE: u8 = 5;
const E_MEDIUM: u8 = 6;
const E_NO_SPACE: u8 = 7;
const E_EXHAUSTED: u8 = 8;
const E_NOT_OWNER: u8 = 9;

impl WireIoError {
    pub fn from_io(e: &IoError) -> WireIoError {
        let (code, errno, offset) = match e {
            IoError::NoSuchDisk { .. } => (E_NO_SUCH_DISK, 0, 0),
            IoError::OutOfRange { offset, .. } => (E_OUT_OF_RANGE, 0, *offset),
            IoError::Invalid { .. } => (E_INVALID, 0, 0),
            IoError::NotSupported { .. } => (E_NOT_SUPPORTED, 0, 0),
            IoError::Unavailable { .. } => (E_UNAVAILABLE, 0, 0),
            IoError::Medium { offset, errno, .. } => (E_MEDIUM, *errno, *offset),
            IoError::NoSpace { .. } => (E_NO_SPACE, 0, 0),
            IoError::Exhausted { .. } => (E_EXHAUSTED, 0, 0),
            IoError::NotOwner { .. } => (E_NOT_OWNER, 0, 0),
        };
        let mut text = e.to_string();
        text.truncate(TEXT_MAX);
        WireIoError {
            code,
            errno,
            offset,
            text,
        }
    }

    /// The error as the forwarding node reports it for `disk` (`op`: the
    /// request's).
    pub fn into_io(self, disk: DiskId, op: IoOp, len: u64) -> IoError {
        match self.code {
            E_NO_SUCH_DISK => IoError::NoSuchDisk { disk },
            E_OUT_OF_RANGE => IoError::OutOfRange {
                disk,
                offset: self.offset,
                len,
                size: 0,
            },
            E_INVALID => IoError::Invalid {
                disk,
                reason: "refused by the volume's owner on the partner node",
            },
            E_NOT_SUPPORTED => IoError::NotSupported { disk, op },
            E_MEDIUM => IoError::Medium {
                disk,
                offset: self.offset,
                errno: self.errno,
                errno_text: self.text.into(),
            },
            E_NO_SPACE => IoError::NoSpace { disk },
            E_EXHAUSTED => IoError::Exhausted { disk },
            E_NOT_OWNER => IoError::NotOwner { disk },
            _ => IoError::Unavailable {
                disk,
                reason: Arc::from(self.text),
            },
        }
    }
}

/// One message of the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    /// Lines of credit for forwarded requests.
    Credit(CreditMsg),
    /// Owner → partner: keep a copy of `data`, written at `offset` of
    /// `disk`; answered by `CopyAck`.
    Copy {
        seq: u64,
        disk: DiskId,
        offset: u64,
        data: Vec<u8>,
    },
    CopyAck {
        seq: u64,
        ok: bool,
    },
    /// Owner → partner: these sectors are on the back end; drop the copies.
    Destaged {
        disk: DiskId,
        pages: Vec<(u64, u8)>,
    },
    /// Forwarding node → owner: a host request (data for writes).
    Request {
        seq: u64,
        disk: DiskId,
        op: IoOp,
        fua: bool,
        no_unmap: bool,
        offset: u64,
        len: u64,
        data: Vec<u8>,
    },
    /// Owner → forwarding node: the result (data for reads).
    Reply {
        seq: u64,
        result: Result<Vec<u8>, WireIoError>,
    },
    /// Forwarding node → owner: block status of a range.
    Status {
        seq: u64,
        disk: DiskId,
        offset: u64,
        len: u64,
    },
    StatusReply {
        seq: u64,
        result: Result<Vec<AllocExtent>, WireIoError>,
    },
    /// The sender no longer serves `disk`, which it owned, from `epoch` on:
    /// the receiver, its new owner, may start.
    Released {
        disk: DiskId,
        epoch: u64,
    },
    /// Keeps an idle line's liveness timer from running out.
    Ping,
    /// The sender has applied the cluster's configuration up to `index`.
    Applied {
        index: u64,
    },
}

/// A frame that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than {FRAME_MAX}")]
    TooLarge(usize),
    #[error("frame ends inside a {0}")]
    Truncated(&'static str),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("invalid {field}: {value}")]
    Invalid { field: &'static str, value: u64 },
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
}

const K_HELLO: u8 = 1;
const K_CREDIT: u8 = 2;
const K_COPY: u8 = 3;
const K_COPY_ACK: u8 = 4;
const K_DESTAGED: u8 = 5;
const K_REQUEST: u8 = 6;
const K_REPLY: u8 = 7;
const K_STATUS: u8 = 8;
const K_STATUS_REPLY: u8 = 9;
const K_RELEASED: u8 = 10;
const K_PING: u8 = 11;
const K_APPLIED: u8 = 12;

const CREDIT_GRANT: u8 = 1;
const CREDIT_REVOKE: u8 = 2;
const CREDIT_RETURN: u8 = 3;

fn op_code(op: IoOp) -> u8 {
    match op {
        IoOp::Read => 1,
        IoOp::Write => 2,
        IoOp::Flush => 3,
        IoOp::Unmap => 4,
        IoOp::WriteZeroes => 5,
    }
}

fn op_of(code: u8) -> Result<IoOp, WireError> {
    Ok(match code {
        1 => IoOp::Read,
        2 => IoOp::Write,
        3 => IoOp::Flush,
        4 => IoOp::Unmap,
        5 => IoOp::WriteZeroes,
        v => {
            return Err(WireError::Invalid {
                field: "op",
                value: v as u64,
            })
        }
    })
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn error(&mut self, e: &WireIoError) {
        self.u8(e.code);
        self.i32(e.errno);
        self.u64(e.offset);
        let t = &e.text.as_bytes()[..e.text.len().min(TEXT_MAX)];
        self.bytes(t);
    }
}

/// Encodes `msg` as one frame, length prefix included.
pub fn encode(msg: &Msg) -> Vec<u8> {
    let data = match msg {
        Msg::Copy { data, .. } | Msg::Request { data, .. } => data.len(),
        Msg::Reply {
            result: Ok(data), ..
        } => data.len(),
        _ => 0,
    };
    let mut o = Out(Vec::with_capacity(64 + data));
    o.u32(0);
    match msg {
        Msg::Hello(h) => {
            o.u8(K_HELLO);
            o.u64(h.magic);
            o.u16(h.version);
            o.u64(h.cluster);
            o.u32(h.io_group);
            o.u32(h.node);
        }
        Msg::Credit(c) => {
            o.u8(K_CREDIT);
            let (kind, line, credits) = match *c {
                CreditMsg::Grant { line, credits } => (CREDIT_GRANT, line, credits),
                CreditMsg::Revoke { line, credits } => (CREDIT_REVOKE, line, credits),
                CreditMsg::Return { line, credits } => (CREDIT_RETURN, line, credits),
            };
            o.u8(kind);
            o.u32(line.0);
            o.u32(credits);
        }
        Msg::Copy {
            seq,
            disk,
            offset,
            data,
        } => {
            o.u8(K_COPY);
            o.u64(*seq);
            o.u64(*disk);
            o.u64(*offset);
            o.bytes(data);
        }
        Msg::CopyAck { seq, ok } => {
            o.u8(K_COPY_ACK);
            o.u64(*seq);
            o.u8(*ok as u8);
        }
        Msg::Destaged { disk, pages } => {
            o.u8(K_DESTAGED);
            o.u64(*disk);
            o.u32(pages.len() as u32);
            for (p, m) in pages {
                o.u64(*p);
                o.u8(*m);
            }
        }
        Msg::Request {
            seq,
            disk,
            op,
            fua,
            no_unmap,
            offset,
            len,
            data,
        } => {
            o.u8(K_REQUEST);
            o.u64(*seq);
            o.u64(*disk);
            o.u8(op_code(*op));
            o.u8(*fua as u8 | (*no_unmap as u8) << 1);
            o.u64(*offset);
            o.u64(*len);
            o.bytes(data);
        }
        Msg::Reply { seq, result } => {
            o.u8(K_REPLY);
            o.u64(*seq);
            match result {
                Ok(data) => {
                    o.u8(0);
                    o.bytes(data);
                }
                Err(e) => {
                    o.u8(1);
                    o.error(e);
                }
            }
        }
        Msg::Status {
            seq,
            disk,
            offset,
            len,
        } => {
            o.u8(K_STATUS);
            o.u64(*seq);
            o.u64(*disk);
            o.u64(*offset);
            o.u64(*len);
        }
        Msg::StatusReply { seq, result } => {
            o.u8(K_STATUS_REPLY);
            o.u64(*seq);
            match result {
                Ok(ext) => {
                    o.u8(0);
                    o.u32(ext.len() as u32);
                    for e in ext {
                        o.u64(e.len);
                        o.u8(e.hole as u8 | (e.zero as u8) << 1);
                    }
                }
                Err(e) => {
                    o.u8(1);
                    o.error(e);
                }
            }
        }
        Msg::Released { disk, epoch } => {
            o.u8(K_RELEASED);
            o.u64(*disk);
            o.u64(*epoch);
        }
        Msg::Ping => o.u8(K_PING),
        Msg::Applied { index } => {
            o.u8(K_APPLIED);
            o.u64(*index);
        }
    }
    let mut frame = o.0;
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Encodes `msg`, whose last field is its (empty) data, with `data`'s bytes
/// as that field: the bytes are copied once, from the buffer into the
/// frame. For `Copy`, `Request` and a successful `Reply`.
pub fn encode_with_data(msg: &Msg, data: &sanvirt_buffer::Buffer) -> Vec<u8> {
    debug_assert!(matches!(
        msg,
        Msg::Copy { data, .. } | Msg::Request { data, .. } | Msg::Reply { result: Ok(data), .. }
            if data.is_empty()
    ));
    let mut frame = encode(msg);
    let head = frame.len() - 4;
    frame.truncate(head);
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let at = frame.len();
    frame.resize(at + data.len(), 0);
    data.copy_to_slice(0, &mut frame[at..]);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Reads the fields of one frame's body.
struct In<'a> {
    b: &'a [u8],
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::Invalid {
                field: what,
                value: v as u64,
            }),
        }
    }
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    fn count(&mut self, what: &'static str, each: usize) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        if n > LIST_MAX || n * each > self.b.len() {
            return Err(WireError::Invalid {
                field: what,
                value: n as u64,
            });
        }
        Ok(n)
    }
    fn error(&mut self) -> Result<WireIoError, WireError> {
        let code = self.u8("error code")?;
        let errno = self.i32("errno")?;
        let offset = self.u64("error offset")?;
        let text = self.bytes("error text")?;
        if text.len() > TEXT_MAX {
            return Err(WireError::Invalid {
                field: "error text length",
                value: text.len() as u64,
            });
        }
        Ok(WireIoError {
            code,
            errno,
            offset,
            text: String::from_utf8_lossy(&text).into_owned(),
        })
    }
}

/// Decodes one frame's body (the bytes after the length prefix).
pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
    if body.len() > FRAME_MAX {
        return Err(WireError::TooLarge(body.len()));
    }
    let mut i = In { b: body };
    let msg = match i.u8("kind")? {
        K_HELLO => Msg::Hello(Hello {
            magic: i.u64("magic")?,
            version: i.u16("version")?,
            cluster: i.u64("cluster")?,
            io_group: i.u32("I/O group")?,
            node: i.u32("node")?,
        }),
        K_CREDIT => {
            let kind = i.u8("credit kind")?;
            let line = LineId(i.u32("line")?);
            let credits = i.u32("credits")?;
            Msg::Credit(match kind {
                CREDIT_GRANT => CreditMsg::Grant { line, credits },
                CREDIT_REVOKE => CreditMsg::Revoke { line, credits },
                CREDIT_RETURN => CreditMsg::Return { line, credits },
                v => {
                    return Err(WireError::Invalid {
                        field: "credit kind",
                        value: v as u64,
                    })
                }
            })
        }
        K_COPY => Msg::Copy {
            seq: i.u64("seq")?,
            disk: i.u64("disk")?,
            offset: i.u64("offset")?,
            data: i.bytes("data")?,
        },
        K_COPY_ACK => Msg::CopyAck {
            seq: i.u64("seq")?,
            ok: i.bool("ok")?,
        },
        K_DESTAGED => {
            let disk = i.u64("disk")?;
            let n = i.count("page count", 9)?;
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                pages.push((i.u64("page")?, i.u8("mask")?));
            }
            Msg::Destaged { disk, pages }
        }
        K_REQUEST => {
            let seq = i.u64("seq")?;
            let disk = i.u64("disk")?;
            let op = op_of(i.u8("op")?)?;
            let flags = i.u8("flags")?;
            if flags & !3 != 0 {
                return Err(WireError::Invalid {
                    field: "flags",
                    value: flags as u64,
                });
            }
            Msg::Request {
                seq,
                disk,
                op,
                fua: flags & 1 != 0,
                no_unmap: flags & 2 != 0,
                offset: i.u64("offset")?,
                len: i.u64("len")?,
                data: i.bytes("data")?,
            }
        }
        K_REPLY => {
            let seq = i.u64("seq")?;
            let result = if i.bool("status")? {
                Err(i.error()?)
            } else {
                Ok(i.bytes("data")?)
            };
            Msg::Reply { seq, result }
        }
        K_STATUS => Msg::Status {
            seq: i.u64("seq")?,
            disk: i.u64("disk")?,
            offset: i.u64("offset")?,
            len: i.u64("len")?,
        },
        K_STATUS_REPLY => {
            let seq = i.u64("seq")?;
            let result = if i.bool("status")? {
                Err(i.error()?)
            } else {
                let n = i.count("extent count", 9)?;
                let mut ext = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = i.u64("extent length")?;
                    let f = i.u8("extent flags")?;
                    if f & !3 != 0 {
                        return Err(WireError::Invalid {
                            field: "extent flags",
                            value: f as u64,
                        });
                    }
                    ext.push(AllocExtent {
                        len,
                        hole: f & 1 != 0,
                        zero: f & 2 != 0,
                    });
                }
                Ok(ext)
            };
            Msg::StatusReply { seq, result }
        }
        K_RELEASED => Msg::Released {
            disk: i.u64("disk")?,
            epoch: i.u64("epoch")?,
        },
        K_PING => Msg::Ping,
        K_APPLIED => Msg::Applied {
            index: i.u64("index")?,
        },
        k => return Err(WireError::UnknownKind(k)),
    };
    if !i.b.is_empty() {
        return Err(WireError::Trailing(i.b.len()));
    }
    Ok(msg)
}

/// Reads one frame's body from `r`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_MAX || len == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            WireError::TooLarge(len),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err() -> impl Strategy<Value = WireIoError> {
        (any::<u8>(), any::<i32>(), any::<u64>(), "[a-z ]{0,40}").prop_map(
            |(code, errno, offset, text)| WireIoError {
                code,
                errno,
                offset,
                text,
            },
        )
    }

    fn op() -> impl Strategy<Value = IoOp> {
        prop_oneof![
            Just(IoOp::Read),
            Just(IoOp::Write),
            Just(IoOp::Flush),
            Just(IoOp::Unmap),
            Just(IoOp::WriteZeroes)
        ]
    }

    fn msg() -> impl Strategy<Value = Msg> {
        let data = proptest::collection::vec(any::<u8>(), 0..600);
        prop_oneof![
            (
                any::<u64>(),
                any::<u16>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(magic, version, cluster, io_group, node)| Msg::Hello(
                    Hello {
                        magic,
                        version,
                        cluster,
                        io_group,
                        node
                    }
                )),
            (0u8..3, any::<u32>(), any::<u32>()).prop_map(|(k, l, c)| {
                let line = LineId(l);
                Msg::Credit(match k {
                    0 => CreditMsg::Grant { line, credits: c },
                    1 => CreditMsg::Revoke { line, credits: c },
                    _ => CreditMsg::Return { line, credits: c },
                })
            }),
            (any::<u64>(), any::<u64>(), any::<u64>(), data.clone()).prop_map(
                |(seq, disk, offset, data)| Msg::Copy {
                    seq,
                    disk,
                    offset,
                    data
                }
            ),
            (any::<u64>(), any::<bool>()).prop_map(|(seq, ok)| Msg::CopyAck { seq, ok }),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), any::<u8>()), 0..20)
            )
                .prop_map(|(disk, pages)| Msg::Destaged { disk, pages }),
            (
                any::<u64>(),
                any::<u64>(),
                op(),
                any::<bool>(),
                any::<bool>(),
                any::<u64>(),
                any::<u64>(),
                data.clone()
            )
                .prop_map(|(seq, disk, op, fua, no_unmap, offset, len, data)| {
                    Msg::Request {
                        seq,
                        disk,
                        op,
                        fua,
                        no_unmap,
                        offset,
                        len,
                        data,
                    }
                }),
            (any::<u64>(), prop::result::maybe_ok(data, err()))
                .prop_map(|(seq, result)| Msg::Reply { seq, result }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(seq, disk, offset, len)| Msg::Status {
                    seq,
                    disk,
                    offset,
                    len
                }
            ),
            (
                any::<u64>(),
                prop::result::maybe_ok(
                    proptest::collection::vec(
                        (any::<u64>(), any::<bool>(), any::<bool>())
                            .prop_map(|(len, hole, zero)| AllocExtent { len, hole, zero }),
                        0..10
                    ),
                    err()
                )
            )
                .prop_map(|(seq, result)| Msg::StatusReply { seq, result }),
            (any::<u64>(), any::<u64>()).prop_map(|(disk, epoch)| Msg::Released { disk, epoch }),
            Just(Msg::Ping),
            any::<u64>().prop_map(|index| Msg::Applied { index }),
        ]
    }

    proptest! {
        /// Every message survives encoding and decoding unchanged.
        #[test]
        fn round_trip(m in msg()) {
            let frame = encode(&m);
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(len, frame.len() - 4);
            prop_assert_eq!(decode(&frame[4..]).unwrap(), m);
        }

        /// Any bytes at all decode to a message or an error, never a panic;
        /// every proper prefix of a valid frame is refused.
        #[test]
        fn garbage_and_truncation_are_refused(
            m in msg(),
            junk in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = decode(&junk);
            let frame = encode(&m);
            let body = &frame[4..];
            for cut in 0..body.len() {
                prop_assert!(decode(&body[..cut]).is_err(), "prefix of {} bytes decoded", cut);
            }
            let mut longer = body.to_vec();
            longer.push(0);
            prop_assert!(decode(&longer).is_err());
        }

        /// Flipping any byte never panics (and usually fails).
        #[test]
        fn corrupted_frames_never_panic(m in msg(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let frame = encode(&m);
            let mut body = frame[4..].to_vec();
            let i = at.index(body.len());
            body[i] ^= x;
            let _ = decode(&body);
        }
    }

    #[test]
    fn data_from_a_buffer_encodes_as_in_the_message() {
        let pool = sanvirt_buffer::BufferPool::new(16, 16);
        let mut b = pool.alloc(4096 + 512).unwrap();
        b.copy_from_slice(0, &[7; 4096 + 512]);
        let with = |data: Vec<u8>| {
            [
                Msg::Copy {
                    seq: 3,
                    disk: 9,
                    offset: 512,
                    data: data.clone(),
                },
                Msg::Request {
                    seq: 4,
                    disk: 9,
                    op: IoOp::Write,
                    fua: true,
                    no_unmap: false,
                    offset: 4096,
                    len: 4096 + 512,
                    data: data.clone(),
                },
                Msg::Reply {
                    seq: 5,
                    result: Ok(data),
                },
            ]
        };
        for (empty, full) in with(vec![]).iter().zip(with(vec![7; 4096 + 512]).iter()) {
            assert_eq!(encode_with_data(empty, &b), encode(full), "{full:?}");
            assert_eq!(decode(&encode_with_data(empty, &b)[4..]).unwrap(), *full);
        }
    }

    #[test]
    fn errors_keep_their_kind() {
        let e = IoError::Medium {
            disk: 3,
            offset: 4096,
            errno: 5,
            errno_text: "Input/output error".into(),
        };
        let back = WireIoError::from_io(&e).into_io(3, IoOp::Read, 512);
        assert!(
            matches!(
                back,
                IoError::Medium {
                    offset: 4096,
                    errno: 5,
                    ..
                }
            ),
            "{back:?}"
        );
        let back = WireIoError::from_io(&IoError::NoSpace { disk: 1 }).into_io(9, IoOp::Write, 1);
        assert_eq!(back, IoError::NoSpace { disk: 9 });
        // The forwarding node retries on this one: it must come back as is.
        let back = WireIoError::from_io(&IoError::NotOwner { disk: 1 }).into_io(9, IoOp::Read, 1);
        assert_eq!(back, IoError::NotOwner { disk: 9 });
    }

    #[tokio::test]
    async fn oversized_and_empty_frames_are_refused_before_reading_them() {
        let mut r: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0];
        assert!(read_frame(&mut r).await.is_err());
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(read_frame(&mut r).await.is_err());
        let f = encode(&Msg::Ping);
        let mut r: &[u8] = &f;
        assert_eq!(
            decode(&read_frame(&mut r).await.unwrap()).unwrap(),
            Msg::Ping
        );
    }
}
