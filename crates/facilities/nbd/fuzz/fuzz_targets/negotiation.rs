//! A whole handshake from arbitrary client bytes against two exports: the
//! negotiation either ends or errors, never panics, and every reply it
//! writes is a well-formed option reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sanvirt_facility::{DiskInfo, FrontEndDiskEvent};
use sanvirt_nbd::exports::Exports;
use sanvirt_nbd::negotiate::{Negotiation, Step};
use sanvirt_nbd::proto::*;
use sanvirt_nbd::NbdConfig;

fuzz_target!(|input: &[u8]| {
    let exports = Exports::default();
    for (disk, name) in [(1u64, "a"), (2, "b")] {
        exports.apply(FrontEndDiskEvent::Created {
            disk,
            name: name.into(),
            info: DiskInfo::simple(1 << 20),
        });
    }
    let cfg = NbdConfig::default();
    let mut neg = Negotiation::new(&exports, &cfg, ClientFlags { no_zeroes: true });
    let mut b = input;
    let mut out = Vec::new();
    while b.len() >= 16 {
        let mut hdr = [0u8; 16];
        hdr.copy_from_slice(&b[..16]);
        hdr[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        let h = parse_option_header(&hdr).expect("magic set");
        let len = (h.len as usize).min(b.len() - 16);
        let data = &b[16..16 + len];
        b = &b[16 + len..];
        out.clear();
        let step = match parse_option(h.option, data) {
            Ok(o) => neg.respond(o, &mut out),
            Err(e) => neg.refuse(h.option, &e, &mut out),
        };
        if h.option != OPT_EXPORT_NAME {
            let mut r = &out[..];
            while !r.is_empty() {
                let (_, n) = parse_option_reply(r)
                    .expect("well-formed")
                    .expect("complete");
                r = &r[n..];
            }
        }
        if !matches!(step, Step::Continue) {
            break;
        }
    }
});
