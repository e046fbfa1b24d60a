//! Parser properties: arbitrary bytes never panic a parser and yield either a
//! valid message or a precise error; encoding then parsing is the identity.

use proptest::prelude::*;

use super::*;

fn name() -> impl Strategy<Value = String> {
    // Valid protocol strings: UTF-8 without NUL.
    "[a-zA-Z0-9 _./:\u{e9}\u{4e2d}-]{0,40}"
}

fn query() -> impl Strategy<Value = String> {
    ("[a-z-]{1,10}", "[a-z:_-]{0,20}").prop_map(|(ns, leaf)| format!("{ns}:{leaf}"))
}

fn client_option() -> impl Strategy<Value = ClientOption> {
    let export_req = || {
        (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, info)| ExportRequest { name, info })
    };
    let meta_req = || {
        (name(), proptest::collection::vec(query(), 0..6))
            .prop_map(|(export, queries)| MetaRequest { export, queries })
    };
    prop_oneof![
        name().prop_map(|name| ClientOption::ExportName { name }),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        Just(ClientOption::StructuredReply),
        export_req().prop_map(ClientOption::Info),
        export_req().prop_map(ClientOption::Go),
        meta_req().prop_map(ClientOption::ListMetaContext),
        meta_req().prop_map(ClientOption::SetMetaContext),
        (12u32..).prop_map(|option| ClientOption::Unknown { option }),
    ]
}

fn request() -> impl Strategy<Value = RequestHeader> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, kind, cookie, offset, len)| RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            len,
        })
}

/// The invariants an accepted option must satisfy.
fn assert_valid(opt: &ClientOption) {
    let strings: Vec<&str> = match opt {
        ClientOption::ExportName { name } => vec![name],
        ClientOption::Info(r) | ClientOption::Go(r) => vec![&r.name],
        ClientOption::ListMetaContext(r) | ClientOption::SetMetaContext(r) => {
            assert!(r.queries.len() <= META_QUERIES_MAX);
            assert!(r.queries.iter().all(|q| q.contains(':')));
            std::iter::once(r.export.as_str())
                .chain(r.queries.iter().map(String::as_str))
                .collect()
        }
        _ => vec![],
    };
    for s in strings {
        assert!(s.len() <= STRING_BYTES_MAX && !s.contains('\0'));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn option_parser_total(option in prop_oneof![1u32..12, any::<u32>()],
                           data in proptest::collection::vec(any::<u8>(), 0..300)) {
        match parse_option(option, &data) {
            Ok(opt) => {
                assert_valid(&opt);
                prop_assert_eq!(opt.code(), option);
            }
            Err(e) => {
                // A precise error names the option and maps to an error reply.
                prop_assert!(e.reply_type() & (1 << 31) != 0);
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn option_parser_structured_noise(opt in client_option(), cut in any::<prop::sample::Index>(),
                                      flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        // Damaged versions of valid options: truncated or with one bit flipped.
        let data = opt.encode_data();
        if !data.is_empty() {
            let _ = parse_option(opt.code(), &data[..cut.index(data.len())]);
            let mut d = data.clone();
            let i = flip.index(d.len());
            d[i] ^= 1 << bit;
            if let Ok(o) = parse_option(opt.code(), &d) {
                assert_valid(&o);
            }
        }
    }

    #[test]
    fn option_round_trip(opt in client_option()) {
        let wire = opt.encode();
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        hdr.copy_from_slice(&wire[..OPTION_HEADER_BYTES]);
        let h = parse_option_header(&hdr).expect("own header");
        prop_assert_eq!(h.len as usize, wire.len() - OPTION_HEADER_BYTES);
        let back = parse_option(h.option, &wire[OPTION_HEADER_BYTES..]);
        // ABORT ignores data; everything else must come back identical.
        prop_assert_eq!(back, Ok(opt));
    }

    #[test]
    fn option_header_total(b in proptest::array::uniform16(any::<u8>())) {
        match parse_option_header(&b) {
            Ok(_) => prop_assert_eq!(&b[..8], &IHAVEOPT.to_be_bytes()),
            Err(OptionError::BadMagic(m)) => prop_assert_ne!(m, IHAVEOPT),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn request_stream_total(stream in proptest::collection::vec(any::<u8>(), 0..400)) {
        // Frame a byte stream the way a connection does: header, payload,
        // next header. Every step is a header, a precise error, or a request
        // for more bytes.
        let mut b = &stream[..];
        loop {
            match RequestHeader::check(b) {
                Ok(()) => {
                    let h = RequestHeader::parse(b).expect("checked");
                    let enc = h.encode();
                    prop_assert_eq!(&enc[..], &b[..REQUEST_HEADER_BYTES]);
                    let skip = REQUEST_HEADER_BYTES + h.payload_len() as usize;
                    if skip >= b.len() { break; }
                    b = &b[skip..];
                }
                Err(RequestError::Incomplete { needed }) => {
                    prop_assert_eq!(needed, REQUEST_HEADER_BYTES - b.len());
                    break;
                }
                Err(RequestError::BadMagic(m)) => {
                    prop_assert_ne!(m, REQUEST_MAGIC);
                    break;
                }
            }
        }
    }

    #[test]
    fn request_stream_of_valid_requests(reqs in proptest::collection::vec(request(), 1..20)) {
        let mut wire = Vec::new();
        for r in &reqs {
            wire.extend_from_slice(&r.encode());
            wire.extend(std::iter::repeat_n(0xaa, r.payload_len().min(64) as usize));
        }
        let mut b = &wire[..];
        for r in &reqs {
            let h = RequestHeader::parse(b).expect("valid header");
            prop_assert_eq!(&h, r);
            prop_assert_eq!(Command::from_code(h.kind), h.command());
            b = &b[REQUEST_HEADER_BYTES + r.payload_len().min(64) as usize..];
        }
        prop_assert!(b.is_empty());
    }

    #[test]
    fn reply_headers_round_trip(error in any::<u32>(), cookie in any::<u64>(), flags in any::<u16>(),
                                ty in any::<u16>(), len in any::<u32>()) {
        let mut b = [0u8; 32];
        let n = encode_simple_reply(&mut b, error, cookie);
        prop_assert_eq!(parse_reply_header(&b[..n]), Ok(Some((ReplyHeader::Simple { error, cookie }, n))));
        prop_assert_eq!(parse_reply_header(&b[..n - 1]), Ok(None));
        let n = encode_chunk_header(&mut b, flags, ty, cookie, len);
        prop_assert_eq!(parse_reply_header(&b[..n]),
            Ok(Some((ReplyHeader::Chunk { flags, ty, cookie, len }, n))));
    }

    #[test]
    fn error_chunks_fit_and_parse(msg in "\\PC{0,200}", room in 26usize..160, cookie in any::<u64>()) {
        let mut b = vec![0u8; room];
        let n = encode_error_chunk(&mut b, cookie, NBD_EIO, &msg);
        prop_assert!(n <= room);
        let Some((ReplyHeader::Chunk { ty, len, flags, .. }, h)) = parse_reply_header(&b[..n]).expect("chunk") else {
            panic!("not a chunk");
        };
        prop_assert_eq!(ty, REPLY_TYPE_ERROR);
        prop_assert_eq!(flags, REPLY_FLAG_DONE);
        prop_assert_eq!(h + len as usize, n);
        let mlen = u16::from_be_bytes([b[h + 4], b[h + 5]]) as usize;
        prop_assert!(std::str::from_utf8(&b[h + 6..h + 6 + mlen]).is_ok());
        prop_assert!(msg.starts_with(std::str::from_utf8(&b[h + 6..h + 6 + mlen]).expect("utf8")));
    }

    #[test]
    fn option_reply_round_trip(option in any::<u32>(), reply in any::<u32>(),
                               data in proptest::collection::vec(any::<u8>(), 0..100)) {
        let mut out = Vec::new();
        encode_option_reply(&mut out, option, reply, &data);
        prop_assert_eq!(parse_option_reply(&out[..out.len() - 1]), Ok(None));
        prop_assert_eq!(parse_option_reply(&out),
            Ok(Some((OptionReply { option, reply, data }, out.len()))));
    }
}

#[test]
fn precise_errors() {
    let lstr = |s: &[u8]| {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    };
    assert_eq!(
        parse_option(OPT_LIST, &[1]),
        Err(OptionError::TrailingData {
            option: OPT_LIST,
            extra: 1
        })
    );
    assert_eq!(parse_option(OPT_ABORT, &[1, 2, 3]), Ok(ClientOption::Abort));
    assert_eq!(
        parse_option(OPT_GO, &[0, 0, 0, 9, b'a']),
        Err(OptionError::Truncated {
            option: OPT_GO,
            field: "export name"
        })
    );
    let mut go = lstr(b"a");
    go.extend_from_slice(&[0, 2, 0, 3]);
    assert_eq!(
        parse_option(OPT_GO, &go),
        Err(OptionError::Truncated {
            option: OPT_GO,
            field: "information request"
        })
    );
    assert_eq!(
        parse_option(OPT_EXPORT_NAME, &[0xff, 0xfe]),
        Err(OptionError::NotUtf8 {
            option: OPT_EXPORT_NAME,
            field: "export name"
        })
    );
    assert_eq!(
        parse_option(OPT_EXPORT_NAME, b"a\0b"),
        Err(OptionError::ContainsNul {
            option: OPT_EXPORT_NAME,
            field: "export name"
        })
    );
    let mut meta = lstr(b"x");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&lstr(b"nonamespace"));
    assert!(matches!(
        parse_option(OPT_SET_META_CONTEXT, &meta),
        Err(OptionError::QueryWithoutNamespace { .. })
    ));
    let mut many = lstr(b"x");
    many.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        parse_option(OPT_LIST_META_CONTEXT, &many),
        Err(OptionError::TooManyQueries { .. })
    ));
    let long = vec![b'a'; STRING_BYTES_MAX + 1];
    assert!(matches!(
        parse_option(OPT_EXPORT_NAME, &long),
        Err(OptionError::StringTooLong { .. })
    ));
    assert!(matches!(
        parse_option(OPT_INFO, &vec![0u8; OPTION_DATA_BYTES_MAX + 1]),
        Err(OptionError::TooLong { .. })
    ));
    assert_eq!(
        RequestHeader::check(&[0x25, 0x60, 0x95, 0x13, 0]),
        Err(RequestError::Incomplete { needed: 23 })
    );
    assert_eq!(
        RequestHeader::check(&[0, 0, 0, 0]),
        Err(RequestError::BadMagic(0))
    );
}

#[test]
fn greeting_bytes() {
    let g = greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}
