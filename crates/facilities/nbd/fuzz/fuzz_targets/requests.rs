//! A transmission byte stream framed as a connection frames it: headers,
//! payloads skipped, each header judged. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sanvirt_nbd::judge::{judge, ExportView};
use sanvirt_nbd::proto::RequestHeader;

fuzz_target!(|input: &[u8]| {
    let view = ExportView {
        size: 1 << 30,
        read_only: input.first().is_some_and(|b| b & 1 != 0),
        can_trim: true,
        can_write_zeroes: true,
        structured: input.first().is_some_and(|b| b & 2 != 0),
        block_status: input.first().is_some_and(|b| b & 4 != 0),
        online: true,
        payload_max: 32 << 20,
    };
    let mut b = input.get(1..).unwrap_or_default();
    while let Ok(h) = RequestHeader::parse(b) {
        let _ = judge(&h, &view);
        let skip = 28 + h.payload_len() as usize;
        if skip >= b.len() {
            break;
        }
        b = &b[skip..];
    }
});
