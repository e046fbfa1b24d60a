//! The handshake: fixed newstyle negotiation only.
//!
//! [`Negotiation`] is the deterministic core (option in, replies out, next
//! step), unit-tested without sockets; [`handshake`] drives it over a stream
//! with bounded reads.

use std::sync::Arc;

use sanvirt_facility::DiskInfo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::NbdConfig;
use crate::exports::{ExportState, Exports};
use crate::limits::{
    DISCARD_CHUNK_BYTES, OPTIONS_PER_SESSION_MAX, OPTION_DATA_BYTES_MAX, OPTION_DISCARD_BYTES_MAX,
};
use crate::proto::*;

/// Context id of `base:allocation` on every session.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What a session negotiated, handed to the transmission phase.
#[derive(Debug, Clone)]
pub struct Session {
    pub export: Arc<ExportState>,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub payload_max: u32,
    pub flags: u16,
}

/// The next step after an option.
#[derive(Debug)]
pub enum Step {
    Continue,
    /// End the session (after `NBD_OPT_ABORT`, or a hard disconnect where the
    /// protocol requires one).
    Close,
    Transmit(Session),
}

/// Transmission flags of an export on a session.
pub fn transmission_flags(info: &DiskInfo, read_only: bool, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        if info.can_unmap {
            f |= TFLAG_SEND_TRIM;
        }
        if info.can_write_zeroes {
            f |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if info.flush_covers_all_paths {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

/// Minimum, preferred and maximum block sizes, made to satisfy the
/// protocol's rules whatever the disk reports (powers of two, min ≤ 64 KiB,
/// preferred ≥ max(min, 512), maximum ≥ preferred).
pub fn block_sizes(info: &DiskInfo, payload_max: u32) -> (u32, u32, u32) {
    let min = match info.block_size_min {
        m if m.is_power_of_two() && m <= 65536 => m,
        _ => 1,
    };
    let floor = min.max(512);
    let pref = match info.block_size_preferred {
        p if p.is_power_of_two() && p >= floor => p,
        _ => floor.max(4096),
    };
    (min, pref, payload_max.max(pref))
}

pub struct Negotiation<'a> {
    exports: &'a Exports,
    config: &'a NbdConfig,
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` is selected.
    meta: Option<Arc<ExportState>>,
}

impl<'a> Negotiation<'a> {
    pub fn new(exports: &'a Exports, config: &'a NbdConfig, flags: ClientFlags) -> Self {
        Negotiation {
            exports,
            config,
            no_zeroes: flags.no_zeroes,
            structured: false,
            meta: None,
        }
    }

    fn payload_max(&self) -> u32 {
        self.config.payload_max_bytes
    }

    fn session(&self, export: Arc<ExportState>) -> Session {
        let info = export.info();
        let read_only = self.config.read_only;
        let block_status = self.meta.as_ref().is_some_and(|m| Arc::ptr_eq(m, &export));
        Session {
            flags: transmission_flags(&info, read_only, self.structured),
            structured: self.structured,
            block_status,
            read_only,
            can_trim: info.can_unmap,
            can_write_zeroes: info.can_write_zeroes,
            payload_max: self.payload_max(),
            export,
        }
    }

    /// Answers a malformed option.
    pub fn refuse(&mut self, option: u32, err: &OptionError, out: &mut Vec<u8>) -> Step {
        tracing::debug!(option, %err, "option refused");
        if option == OPT_EXPORT_NAME {
            // NBD_OPT_EXPORT_NAME cannot be answered with an error.
            return Step::Close;
        }
        if option == OPT_SET_META_CONTEXT {
            self.meta = None;
        }
        encode_option_reply(out, option, err.reply_type(), err.to_string().as_bytes());
        Step::Continue
    }

    /// Answers one well-formed option.
    pub fn respond(&mut self, opt: ClientOption, out: &mut Vec<u8>) -> Step {
        let code = opt.code();
        let err = |out: &mut Vec<u8>, ty: u32, msg: &str| {
            encode_option_reply(out, code, ty, msg.as_bytes());
            Step::Continue
        };
        match opt {
            ClientOption::ExportName { name } => {
                let Some(export) = self.exports.lookup(&name) else {
                    tracing::info!(%name, "NBD_OPT_EXPORT_NAME for an unknown export: closing");
                    return Step::Close;
                };
                let s = self.session(export);
                out.extend_from_slice(&s.export.size().to_be_bytes());
                out.extend_from_slice(&s.flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Step::Transmit(s)
            }
            ClientOption::Abort => {
                encode_option_reply(out, code, REP_ACK, &[]);
                Step::Close
            }
            ClientOption::List => {
                for name in self.exports.names() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    encode_option_reply(out, code, REP_SERVER, &d);
                }
                encode_option_reply(out, code, REP_ACK, &[]);
                Step::Continue
            }
            ClientOption::StartTls => err(out, REP_ERR_POLICY, "TLS is not offered by this server"),
            ClientOption::StructuredReply => {
                self.structured = true;
                encode_option_reply(out, code, REP_ACK, &[]);
                Step::Continue
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(export) = self.exports.lookup(&req.name) else {
                    let msg = if req.name.is_empty() {
                        "no default export: name one (NBD_OPT_LIST lists them)"
                    } else {
                        "unknown export"
                    };
                    return err(out, REP_ERR_UNKNOWN, msg);
                };
                let s = self.session(export);
                let mut info = Vec::with_capacity(16);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&s.export.size().to_be_bytes());
                info.extend_from_slice(&s.flags.to_be_bytes());
                encode_option_reply(out, code, REP_INFO, &info);
                if req.info.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(s.export.name().as_bytes());
                    encode_option_reply(out, code, REP_INFO, &d);
                }
                if req.info.contains(&INFO_DESCRIPTION) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(
                        format!("sanvirt front-end disk {}", s.export.disk()).as_bytes(),
                    );
                    encode_option_reply(out, code, REP_INFO, &d);
                }
                // Sent whether asked or not: the minimum block size may differ
                // from the protocol default of 1.
                let (min, pref, max) = block_sizes(&s.export.info(), self.payload_max());
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [min, pref, max] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                encode_option_reply(out, code, REP_INFO, &d);
                encode_option_reply(out, code, REP_ACK, &[]);
                if code == OPT_GO {
                    Step::Transmit(s)
                } else {
                    Step::Continue
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = code == OPT_SET_META_CONTEXT;
                if set {
                    self.meta = None;
                }
                if !self.structured {
                    return err(out, REP_ERR_INVALID, "negotiate structured replies first");
                }
                let Some(export) = self.exports.lookup(&req.export) else {
                    return err(out, REP_ERR_UNKNOWN, "unknown export");
                };
                let selected = if set {
                    req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                };
                if selected {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    encode_option_reply(out, code, REP_META_CONTEXT, &d);
                    if set {
                        self.meta = Some(export);
                    }
                }
                encode_option_reply(out, code, REP_ACK, &[]);
                Step::Continue
            }
            ClientOption::Unknown { option } => {
                tracing::debug!(option, "unsupported option");
                err(out, REP_ERR_UNSUP, "option not supported")
            }
        }
    }
}

/// Why a handshake ended without a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    ClientFlags(#[from] ClientFlagsError),
    #[error(transparent)]
    Option(OptionError),
    #[error("option payload of {0} bytes: disconnecting")]
    Flood(u32),
    #[error("more than {OPTIONS_PER_SESSION_MAX} options")]
    TooManyOptions,
}

/// Runs the handshake on `stream`. `Ok(None)` when the client ended it
/// (abort, unknown export with `NBD_OPT_EXPORT_NAME`).
pub async fn handshake<T: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut T,
    exports: &Exports,
    config: &NbdConfig,
) -> Result<Option<Session>, HandshakeError> {
    stream.write_all(&greeting()).await?;
    let flags = parse_client_flags(stream.read_u32().await?)?;
    let mut neg = Negotiation::new(exports, config, flags);
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(512);
    for _ in 0..OPTIONS_PER_SESSION_MAX {
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        stream.read_exact(&mut hdr).await?;
        let h = parse_option_header(&hdr).map_err(HandshakeError::Option)?;
        out.clear();
        let step = if h.len as usize > OPTION_DATA_BYTES_MAX {
            if h.len as u64 > OPTION_DISCARD_BYTES_MAX {
                return Err(HandshakeError::Flood(h.len));
            }
            discard(stream, h.len as u64).await?;
            let e = OptionError::TooLong {
                option: h.option,
                len: h.len,
                max: OPTION_DATA_BYTES_MAX,
            };
            neg.refuse(h.option, &e, &mut out)
        } else {
            data.resize(h.len as usize, 0);
            stream.read_exact(&mut data).await?;
            match parse_option(h.option, &data) {
                Ok(opt) => neg.respond(opt, &mut out),
                Err(e) => neg.refuse(h.option, &e, &mut out),
            }
        };
        if !out.is_empty() {
            let sent = stream.write_all(&out).await;
            // After ABORT the client may already be gone: that is fine.
            if !matches!(step, Step::Close) {
                sent?;
            }
        }
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(s) => return Ok(Some(s)),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// Reads and drops `n` bytes with bounded memory.
async fn discard<T: AsyncRead + Unpin>(stream: &mut T, mut n: u64) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    const _: () = assert!(4096 <= DISCARD_CHUNK_BYTES);
    while n > 0 {
        let want = n.min(chunk.len() as u64) as usize;
        stream.read_exact(&mut chunk[..want]).await?;
        n -= want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanvirt_facility::FrontEndDiskEvent;

    fn exports(names: &[&str]) -> Exports {
        let x = Exports::default();
        for (i, n) in names.iter().enumerate() {
            let mut info = DiskInfo::simple(1 << 20);
            info.can_unmap = true;
            x.apply(FrontEndDiskEvent::Created {
                disk: i as u64 + 1,
                name: (*n).into(),
                info,
            });
        }
        x
    }

    fn replies(mut b: &[u8]) -> Vec<OptionReply> {
        let mut v = Vec::new();
        while let Some((r, n)) = parse_option_reply(b).expect("well-formed replies") {
            v.push(r);
            b = &b[n..];
        }
        assert!(b.is_empty(), "trailing reply bytes");
        v
    }

    fn flags() -> ClientFlags {
        parse_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).expect("valid flags")
    }

    #[test]
    fn client_flags() {
        assert!(matches!(
            parse_client_flags(0),
            Err(ClientFlagsError::NotFixedNewstyle(0))
        ));
        assert!(parse_client_flags(1 | 4).is_err());
        assert_eq!(parse_client_flags(1), Ok(ClientFlags { no_zeroes: false }));
    }

    #[test]
    fn go_and_info() {
        let x = exports(&["disk-a"]);
        let cfg = NbdConfig::default();
        let mut n = Negotiation::new(&x, &cfg, flags());
        let mut out = Vec::new();
        let req = ExportRequest {
            name: "disk-a".into(),
            info: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
        };
        assert!(matches!(
            n.respond(ClientOption::Info(req.clone()), &mut out),
            Step::Continue
        ));
        let r = replies(&out);
        assert_eq!(r.len(), 5);
        assert!(r[..4]
            .iter()
            .all(|r| r.reply == REP_INFO && r.option == OPT_INFO));
        assert_eq!(r[0].data.len(), 12);
        assert_eq!(&r[0].data[2..10], &(1u64 << 20).to_be_bytes());
        let flags = u16::from_be_bytes([r[0].data[10], r[0].data[11]]);
        assert_ne!(flags & TFLAG_SEND_TRIM, 0);
        assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
        assert_eq!(flags & (TFLAG_READ_ONLY | TFLAG_SEND_DF), 0);
        assert_eq!(&r[1].data[2..], b"disk-a");
        let bs = &r[3].data;
        assert_eq!(bs.len(), 14);
        assert_eq!(&bs[2..6], &512u32.to_be_bytes());
        assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
        assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
        assert_eq!(r[4].reply, REP_ACK);

        out.clear();
        let go = ExportRequest {
            name: String::new(),
            info: vec![],
        };
        match n.respond(ClientOption::Go(go), &mut out) {
            Step::Transmit(s) => {
                assert_eq!(
                    &*s.export.name(),
                    "disk-a",
                    "default export is the only one"
                );
                assert!(!s.structured && !s.block_status);
            }
            other => panic!("expected transmission, got {other:?}"),
        }
    }

    #[test]
    fn unknown_things() {
        let x = exports(&["a", "b"]);
        let cfg = NbdConfig::default();
        let mut n = Negotiation::new(&x, &cfg, flags());
        let mut out = Vec::new();
        let go = |name: &str| {
            ClientOption::Go(ExportRequest {
                name: name.into(),
                info: vec![],
            })
        };
        assert!(matches!(n.respond(go("zz"), &mut out), Step::Continue));
        assert!(matches!(n.respond(go(""), &mut out), Step::Continue));
        assert!(matches!(
            n.respond(ClientOption::Unknown { option: 99 }, &mut out),
            Step::Continue
        ));
        assert!(matches!(
            n.respond(ClientOption::StartTls, &mut out),
            Step::Continue
        ));
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|r| r.reply).collect();
        assert_eq!(
            types,
            [
                REP_ERR_UNKNOWN,
                REP_ERR_UNKNOWN,
                REP_ERR_UNSUP,
                REP_ERR_POLICY
            ]
        );
        assert!(matches!(
            n.respond(ClientOption::ExportName { name: "zz".into() }, &mut out),
            Step::Close
        ));
    }

    #[test]
    fn list_and_abort() {
        let x = exports(&["a", "b"]);
        let cfg = NbdConfig::default();
        let mut n = Negotiation::new(&x, &cfg, flags());
        let mut out = Vec::new();
        n.respond(ClientOption::List, &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].reply, REP_SERVER);
        assert_eq!(&r[0].data, &[0, 0, 0, 1, b'a']);
        assert_eq!(r[2].reply, REP_ACK);
        out.clear();
        assert!(matches!(
            n.respond(ClientOption::Abort, &mut out),
            Step::Close
        ));
        assert_eq!(replies(&out)[0].reply, REP_ACK);
    }

    #[test]
    fn meta_contexts() {
        let x = exports(&["a", "b"]);
        let cfg = NbdConfig::default();
        let mut n = Negotiation::new(&x, &cfg, flags());
        let mut out = Vec::new();
        let set = |export: &str, q: &[&str]| {
            ClientOption::SetMetaContext(MetaRequest {
                export: export.into(),
                queries: q.iter().map(|s| s.to_string()).collect(),
            })
        };
        n.respond(set("a", &[META_BASE_ALLOCATION]), &mut out);
        assert_eq!(replies(&out)[0].reply, REP_ERR_INVALID, "structured first");
        out.clear();
        n.respond(ClientOption::StructuredReply, &mut out);
        n.respond(
            ClientOption::ListMetaContext(MetaRequest {
                export: "a".into(),
                queries: vec![],
            }),
            &mut out,
        );
        n.respond(
            set("a", &["qemu:allocation-depth", META_BASE_ALLOCATION]),
            &mut out,
        );
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|r| r.reply).collect();
        assert_eq!(
            types,
            [
                REP_ACK,
                REP_META_CONTEXT,
                REP_ACK,
                REP_META_CONTEXT,
                REP_ACK
            ]
        );
        assert_eq!(&r[3].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&r[3].data[4..], META_BASE_ALLOCATION.as_bytes());
        out.clear();
        let go = |name: &str| {
            ClientOption::Go(ExportRequest {
                name: name.into(),
                info: vec![],
            })
        };
        let mut n2 = Negotiation {
            meta: n.meta.clone(),
            ..Negotiation::new(&x, &cfg, flags())
        };
        n2.structured = true;
        match n2.respond(go("b"), &mut out) {
            Step::Transmit(s) => assert!(!s.block_status, "contexts belong to export a"),
            other => panic!("{other:?}"),
        }
        match n.respond(go("a"), &mut out) {
            Step::Transmit(s) => {
                assert!(s.block_status && s.structured);
                assert_ne!(s.flags & TFLAG_SEND_DF, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn block_sizes_are_sane() {
        let mut i = DiskInfo::simple(1 << 20);
        assert_eq!(block_sizes(&i, 1 << 25), (512, 4096, 1 << 25));
        i.block_size_min = 3;
        i.block_size_preferred = 0;
        assert_eq!(block_sizes(&i, 1 << 25), (1, 4096, 1 << 25));
        i.block_size_min = 65536;
        i.block_size_preferred = 4096;
        assert_eq!(block_sizes(&i, 4096), (65536, 65536, 65536));
    }
}
