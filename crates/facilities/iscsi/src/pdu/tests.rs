use super::*;
use proptest::prelude::*;

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(h) = Bhs::parse(&bytes) {
            prop_assert_eq!(h.ahs_len % 4, 0);
            let _ = Request::parse(&h);
        } else {
            prop_assert!(bytes.len() < BHS_BYTES);
        }
    }

    #[test]
    fn lun_round_trip(lun in 0u64..16384) {
        prop_assert_eq!(decode_lun(encode_lun(lun)), lun);
    }

    #[test]
    fn data_in_round_trip(itt in any::<u32>(), off in any::<u32>(), len in 0u32..(1 << 24),
                          sn in any::<u32>(), status in proptest::option::of(any::<u8>())) {
        let mut b = [0u8; BHS_BYTES];
        DataIn { final_bit: true, status, residual_flags: 2, residual: 7, lun: encode_lun(3),
                 itt, data_sn: sn, offset: off, data_len: len, seq: Seq::default() }.encode(&mut b);
        let h = Bhs::parse(&b).unwrap();
        prop_assert_eq!(h.opcode, op::DATA_IN);
        prop_assert_eq!(h.data_len, len);
        prop_assert_eq!(h.itt(), itt);
        prop_assert_eq!(h.field32(36), sn);
        prop_assert_eq!(h.field32(40), off);
        prop_assert_eq!(h.flags & 1 != 0, status.is_some());
    }

    #[test]
    fn r2t_round_trip(itt in any::<u32>(), ttt in any::<u32>(), off in any::<u32>(), len in any::<u32>()) {
        let mut b = [0u8; BHS_BYTES];
        R2t { lun: [0; 8], itt, ttt, r2t_sn: 5, offset: off, len, seq: Seq::default() }.encode(&mut b);
        let h = Bhs::parse(&b).unwrap();
        prop_assert_eq!((h.opcode, h.itt(), h.field32(20), h.field32(40), h.field32(44)),
                        (op::R2T, itt, ttt, off, len));
    }

    #[test]
    fn sn_order_is_antisymmetric(a in any::<u32>(), b in any::<u32>()) {
        prop_assert!(!(sn_lt(a, b) && sn_lt(b, a)));
        prop_assert!(sn_le(a, a));
    }
}

#[test]
fn command_fields() {
    let mut b = [0u8; BHS_BYTES];
    b[0] = 0x41;
    b[1] = 0x80 | 0x40 | 0x01;
    b[8..16].copy_from_slice(&encode_lun(2));
    b[16..20].copy_from_slice(&9u32.to_be_bytes());
    b[20..24].copy_from_slice(&4096u32.to_be_bytes());
    b[32] = 0x28;
    let h = Bhs::parse(&b).unwrap();
    assert!(h.immediate);
    let Request::Command(c) = Request::parse(&h).unwrap() else {
        panic!("not a command")
    };
    assert!(c.read && !c.write && c.final_bit);
    assert_eq!(
        (c.itt, c.edtl, decode_lun(c.lun), c.cdb[0]),
        (9, 4096, 2, 0x28)
    );
    // Neither F nor W: refused.
    b[1] = 0x40;
    assert!(Request::parse(&Bhs::parse(&b).unwrap()).is_err());
    // Login with T and C: protocol error.
    b[0] = 0x43;
    b[1] = 0xc0;
    assert_eq!(
        Request::parse(&Bhs::parse(&b).unwrap())
            .unwrap_err()
            .reject_reason(),
        reject::PROTOCOL_ERROR
    );
}

#[test]
fn digest_is_crc32c_little_endian() {
    // RFC 7143 B.4: 32 bytes of zeros → CRC32C 0x8a9136aa, sent aa 36 91 8a.
    assert_eq!(
        digest_bytes(crc32c_of([&[0u8; 32][..]])),
        [0xaa, 0x36, 0x91, 0x8a]
    );
}
