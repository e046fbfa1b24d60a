//! Option payloads: the parser is total, and what it accepts re-encodes to
//! the same bytes (modulo ABORT, whose data is ignored).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sanvirt_nbd::proto::{parse_option, ClientOption};

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let option = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
    let data = &input[4..];
    if let Ok(opt) = parse_option(option, data) {
        if !matches!(opt, ClientOption::Abort | ClientOption::Unknown { .. }) {
            assert_eq!(opt.encode_data(), data, "re-encoding {opt:?}");
        }
    }
});
