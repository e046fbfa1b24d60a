//! The NBD wire format as pure functions: bytes in, typed messages out, and
//! back. Nothing here touches a socket, so every parser can be unit-tested,
//! property-tested and fuzzed (mini-redis `Frame::check` before `Frame::parse`).
//!
//! All integers are big-endian ("network byte order"). Names follow the
//! protocol document (`doc/proto.md` of the NBD project).

use crate::limits::{
    META_QUERIES_MAX, OPTION_DATA_BYTES_MAX, REQUEST_HEADER_BYTES, STRING_BYTES_MAX,
};

// ---------------------------------------------------------------- magics

/// `NBDMAGIC`, first word of every handshake.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting and option requests.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------- handshake flags

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------- transmission flags

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------- options

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context this server knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------- commands

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// ---------------------------------------------------------------- errors (NBD values)

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Bytes of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes of an option request header: magic, option, length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const CHUNK_HEADER_BYTES: usize = 20;

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The server's first message.
pub fn greeting() -> [u8; GREETING_BYTES] {
    let mut g = [0u8; GREETING_BYTES];
    g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// What the client's 32-bit flags word allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientFlagsError {
    /// Non-fixed newstyle clients can only use `NBD_OPT_EXPORT_NAME` without
    /// error replies; this server requires fixed newstyle.
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client set unknown flags {0:#x}")]
    UnknownFlags(u32),
}

/// Checks the client flags word (the server must drop clients that set flags
/// it did not advertise).
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, ClientFlagsError> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(ClientFlagsError::UnknownFlags(flags & !known));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ClientFlagsError::NotFixedNewstyle(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

// ================================================================= options

/// An option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// A typed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName {
        name: String,
    },
    Abort,
    List,
    StartTls,
    Info(ExportRequest),
    Go(ExportRequest),
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// Any option this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unknown {
        option: u32,
    },
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    /// `NBD_INFO_*` types the client asks for.
    pub info: Vec<u16>,
}

/// Payload of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Why an option request is malformed. Each maps to an option error reply
/// (or, for `BadMagic`, to closing the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("bad option magic {0:#018x}")]
    BadMagic(u64),
    #[error("option {option}: {len} bytes of data exceed the {max}-byte limit")]
    TooLong { option: u32, len: u32, max: usize },
    #[error("option {option}: data ends inside {field}")]
    Truncated { option: u32, field: &'static str },
    #[error("option {option}: {extra} unexpected bytes after the data")]
    TrailingData { option: u32, extra: usize },
    #[error("option {option}: {field} is not valid UTF-8")]
    NotUtf8 { option: u32, field: &'static str },
    #[error("option {option}: {field} contains NUL")]
    ContainsNul { option: u32, field: &'static str },
    #[error("option {option}: {field} longer than {max} bytes")]
    StringTooLong {
        option: u32,
        field: &'static str,
        max: usize,
    },
    #[error("option {option}: {count} queries exceed the limit of {max}")]
    TooManyQueries { option: u32, count: u32, max: usize },
    #[error("option {option}: query {query:?} has no namespace")]
    QueryWithoutNamespace { option: u32, query: String },
}

impl OptionError {
    /// The option error reply type this error is answered with.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::TooLong { .. } | OptionError::TooManyQueries { .. } => REP_ERR_TOO_BIG,
            _ => REP_ERR_INVALID,
        }
    }
}

/// Checks the 16-byte option header.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, OptionError> {
    let magic = be_u64(&b[..8]);
    if magic != IHAVEOPT {
        return Err(OptionError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(&b[8..12]),
        len: be_u32(&b[12..16]),
    })
}

/// A bounds-checked reader over option data.
struct Cursor<'a> {
    option: u32,
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], OptionError> {
        if self.data.len() < n {
            return Err(OptionError::Truncated {
                option: self.option,
                field,
            });
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Ok(a)
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, OptionError> {
        Ok(be_u16(self.take(2, field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, OptionError> {
        Ok(be_u32(self.take(4, field)?))
    }
    fn string(&mut self, len: usize, field: &'static str) -> Result<String, OptionError> {
        if len > STRING_BYTES_MAX {
            return Err(OptionError::StringTooLong {
                option: self.option,
                field,
                max: STRING_BYTES_MAX,
            });
        }
        let raw = self.take(len, field)?;
        to_string(self.option, raw, field)
    }
    /// A string prefixed by its 32-bit length.
    fn lstring(&mut self, field: &'static str) -> Result<String, OptionError> {
        let len = self.u32(field)? as usize;
        self.string(len, field)
    }
    fn finish(self) -> Result<(), OptionError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(OptionError::TrailingData {
                option: self.option,
                extra: self.data.len(),
            })
        }
    }
}

fn to_string(option: u32, raw: &[u8], field: &'static str) -> Result<String, OptionError> {
    if raw.len() > STRING_BYTES_MAX {
        return Err(OptionError::StringTooLong {
            option,
            field,
            max: STRING_BYTES_MAX,
        });
    }
    let s = std::str::from_utf8(raw).map_err(|_| OptionError::NotUtf8 { option, field })?;
    if s.contains('\0') {
        return Err(OptionError::ContainsNul { option, field });
    }
    Ok(s.to_owned())
}

/// Parses the data of option `option`. Never panics; every input is either a
/// valid [`ClientOption`] or a precise [`OptionError`].
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    if data.len() > OPTION_DATA_BYTES_MAX {
        return Err(OptionError::TooLong {
            option,
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            max: OPTION_DATA_BYTES_MAX,
        });
    }
    let mut c = Cursor { option, data };
    let no_data = |c: Cursor<'_>, o: ClientOption| c.finish().map(|()| o);
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName {
            name: to_string(option, data, "export name")?,
        }),
        // The server should ignore data sent with ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(c, ClientOption::List),
        OPT_STARTTLS => no_data(c, ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(c, ClientOption::StructuredReply),
        OPT_INFO | OPT_GO => {
            let name = c.lstring("export name")?;
            let n = c.u16("information request count")? as usize;
            let mut info = Vec::with_capacity(n.min(c.data.len() / 2));
            for _ in 0..n {
                info.push(c.u16("information request")?);
            }
            c.finish()?;
            let req = ExportRequest { name, info };
            Ok(if option == OPT_GO {
                ClientOption::Go(req)
            } else {
                ClientOption::Info(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let export = c.lstring("export name")?;
            let count = c.u32("query count")?;
            if count as usize > META_QUERIES_MAX {
                return Err(OptionError::TooManyQueries {
                    option,
                    count,
                    max: META_QUERIES_MAX,
                });
            }
            let mut queries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let q = c.lstring("query")?;
                if !q.contains(':') {
                    return Err(OptionError::QueryWithoutNamespace { option, query: q });
                }
                queries.push(q);
            }
            c.finish()?;
            let req = MetaRequest { export, queries };
            Ok(if option == OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext(req)
            } else {
                ClientOption::ListMetaContext(req)
            })
        }
        _ => Ok(ClientOption::Unknown { option }),
    }
}

impl ClientOption {
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName { .. } => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => OPT_SET_META_CONTEXT,
            ClientOption::Unknown { option } => *option,
        }
    }

    /// The option's data (client side; tests and the round-trip property).
    pub fn encode_data(&self) -> Vec<u8> {
        let mut d = Vec::new();
        let lstr = |d: &mut Vec<u8>, s: &str| {
            d.extend_from_slice(&(s.len() as u32).to_be_bytes());
            d.extend_from_slice(s.as_bytes());
        };
        match self {
            ClientOption::ExportName { name } => d.extend_from_slice(name.as_bytes()),
            ClientOption::Info(r) | ClientOption::Go(r) => {
                lstr(&mut d, &r.name);
                d.extend_from_slice(&(r.info.len() as u16).to_be_bytes());
                for i in &r.info {
                    d.extend_from_slice(&i.to_be_bytes());
                }
            }
            ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => {
                lstr(&mut d, &r.export);
                d.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
                for q in &r.queries {
                    lstr(&mut d, q);
                }
            }
            _ => {}
        }
        d
    }

    /// The whole option request: header and data.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.encode_data();
        let mut v = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&self.code().to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(&data);
        v
    }
}

/// Appends one option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// One option reply, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("bad reply magic {0:#x}")]
    BadMagic(u64),
    #[error("reply of {0} bytes exceeds the limit")]
    TooLong(u32),
}

/// Client-side check of an option reply at the start of `b`: `Ok(None)` when
/// more bytes are needed, else the reply and the bytes it occupies.
pub fn parse_option_reply(b: &[u8]) -> Result<Option<(OptionReply, usize)>, ReplyError> {
    if b.len() < OPTION_REPLY_HEADER_BYTES {
        return Ok(None);
    }
    let magic = be_u64(&b[..8]);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ReplyError::BadMagic(magic));
    }
    let len = be_u32(&b[16..20]);
    if len as usize > OPTION_DATA_BYTES_MAX {
        return Err(ReplyError::TooLong(len));
    }
    let total = OPTION_REPLY_HEADER_BYTES + len as usize;
    if b.len() < total {
        return Ok(None);
    }
    Ok(Some((
        OptionReply {
            option: be_u32(&b[8..12]),
            reply: be_u32(&b[12..16]),
            data: b[OPTION_REPLY_HEADER_BYTES..total].to_vec(),
        },
        total,
    )))
}

// ================================================================= transmission

/// A transmission request header (the compact 28-byte form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    /// Raw command type; see [`RequestHeader::command`].
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_code(c: u16) -> Command {
        match c {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a request: the stream is out of sync and the connection must close.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("incomplete request header: {needed} more bytes needed")]
    Incomplete { needed: usize },
}

impl RequestHeader {
    /// Checks that `b` starts with a whole, well-framed request header.
    pub fn check(b: &[u8]) -> Result<(), RequestError> {
        if b.len() >= 4 {
            let magic = be_u32(&b[..4]);
            if magic != REQUEST_MAGIC {
                return Err(RequestError::BadMagic(magic));
            }
        }
        if b.len() < REQUEST_HEADER_BYTES {
            return Err(RequestError::Incomplete {
                needed: REQUEST_HEADER_BYTES - b.len(),
            });
        }
        Ok(())
    }

    /// Parses the header at the start of `b` (after [`RequestHeader::check`]
    /// or on its own: it repeats the checks).
    pub fn parse(b: &[u8]) -> Result<RequestHeader, RequestError> {
        Self::check(b)?;
        Ok(RequestHeader {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: be_u32(&b[24..28]),
        })
    }

    pub fn command(&self) -> Command {
        Command::from_code(self.kind)
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// Writes a simple reply into `out[..16]`.
pub fn encode_simple_reply(out: &mut [u8], error: u32, cookie: u64) -> usize {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    SIMPLE_REPLY_BYTES
}

/// Writes a structured reply chunk header into `out[..20]`.
pub fn encode_chunk_header(out: &mut [u8], flags: u16, ty: u16, cookie: u64, len: u32) -> usize {
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&ty.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    CHUNK_HEADER_BYTES
}

/// Writes a complete `NBD_REPLY_TYPE_ERROR` chunk (flag DONE) with `message`
/// cut to fit `out`, at a character boundary. Returns the bytes written.
pub fn encode_error_chunk(out: &mut [u8], cookie: u64, error: u32, message: &str) -> usize {
    let room = out.len().saturating_sub(CHUNK_HEADER_BYTES + 6);
    let mut cut = message.len().min(room).min(u16::MAX as usize);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let n = encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        (6 + msg.len()) as u32,
    );
    out[n..n + 4].copy_from_slice(&error.to_be_bytes());
    out[n + 4..n + 6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
    out[n + 6..n + 6 + msg.len()].copy_from_slice(msg);
    n + 6 + msg.len()
}

/// A reply header as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        len: u32,
    },
}

/// Client-side parse of the reply header at the start of `b`: `Ok(None)` when
/// more bytes are needed, else the header and its size.
pub fn parse_reply_header(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ReplyError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be_u32(&b[..4]) {
        SIMPLE_REPLY_MAGIC if b.len() >= SIMPLE_REPLY_BYTES => Ok(Some((
            ReplyHeader::Simple {
                error: be_u32(&b[4..8]),
                cookie: be_u64(&b[8..16]),
            },
            SIMPLE_REPLY_BYTES,
        ))),
        STRUCTURED_REPLY_MAGIC if b.len() >= CHUNK_HEADER_BYTES => Ok(Some((
            ReplyHeader::Chunk {
                flags: be_u16(&b[4..6]),
                ty: be_u16(&b[6..8]),
                cookie: be_u64(&b[8..16]),
                len: be_u32(&b[16..20]),
            },
            CHUNK_HEADER_BYTES,
        ))),
        SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC => Ok(None),
        m => Err(ReplyError::BadMagic(m as u64)),
    }
}

#[cfg(test)]
mod tests;
