//! The verifying writer of the kill tests (`common/writer.rs`) and its
//! NBD client against a real sanvirtd, and the block format and
//! verification rule on their own.

mod common;
use common::writer::*;
use common::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn nbd_addr(d: &Daemon) -> String {
    format!("{}:{}", d.ip, d.nbd_port)
}

/// A 64 MiB striped volume `v` over four 64 MiB mdisks (sparse files: it
/// reads zeros, which the writer expects of blocks it never wrote).
fn make_volume(d: &Daemon) {
    d.pool_of_four(64, "1MiB");
    d.ok(&[
        "volume",
        "create",
        "--name",
        "v",
        "--pool",
        "p0",
        "--size",
        "64MiB",
        "--striped",
    ]);
}

// ---------------------------------------------------------------------------
// The client and the verifier against a real daemon, no failure
// ---------------------------------------------------------------------------

/// The minimal NBD client against sanvirtd: handshake, pipelined writes
/// and reads answered out of order, FUA, flush, an error reply that leaves
/// the connection usable, an unknown export refused, DISC.
#[test]
fn nbd_client_against_sanvirtd() {
    let rt = runtime();
    let d = Daemon::start();
    make_volume(&d);
    let addr = nbd_addr(&d);
    rt.block_on(async {
        let err = NbdConn::connect(&addr, "nope")
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");

        let mut c = NbdConn::connect(&addr, "v").await.expect("connect");
        assert_eq!(c.export_size, 64 << 20);
        assert!(c.transmission_flags & TFLAG_SEND_FLUSH != 0);
        assert!(c.transmission_flags & TFLAG_SEND_FUA != 0);
        assert!(c.block_sizes.is_some());
        // 64 writes in flight, then 64 reads in flight.
        let mut blk = Vec::new();
        let mut want = std::collections::HashMap::new();
        for i in 0..64u64 {
            let cookie = c.cookie();
            encode_block(1, i * 3, 1, 4096, &mut blk);
            c.queue_write(cookie, i * 3 * 4096, &blk, i % 2 == 0);
            want.insert(cookie, ());
        }
        for _ in 0..64 {
            let r = c.next_reply().await.expect("write reply");
            assert_eq!(r.error, 0);
            assert!(want.remove(&r.cookie).is_some(), "unknown cookie");
        }
        let mut reads = std::collections::HashMap::new();
        for i in 0..64u64 {
            let cookie = c.cookie();
            c.queue_read(cookie, i * 3 * 4096, 4096);
            reads.insert(cookie, i * 3);
        }
        for _ in 0..64 {
            let r = c.next_reply().await.expect("read reply");
            assert_eq!(r.error, 0);
            let lba = reads.remove(&r.cookie).expect("known cookie");
            assert_eq!(
                decode_block(&r.data),
                Content::Block {
                    run: 1,
                    lba,
                    gen: 1
                }
            );
        }
        c.flush().await.expect("flush");
        // Beyond the end: an error reply, and the connection goes on.
        let e = c.read(64 << 20, 4096).await.unwrap_err();
        assert!(e.to_string().contains("error 22"), "{e}");
        assert_eq!(c.read(0, 4096).await.unwrap().len(), 4096);
        c.disconnect().await.expect("disc");
    });
}

/// The writer and the verifier with no failure, and the verifier catching
/// a rollback: one block put back to an older generation behind the
/// writer's back must fail verification, naming the block.
#[test]
fn writer_verifies_and_catches_a_rolled_back_block() {
    let rt = runtime();
    let d = Daemon::start();
    make_volume(&d);
    let addr = nbd_addr(&d);
    let mut cfg = WriterConfig::new(vec![addr.clone()], "v", 256, 7);
    cfg.first_lba = 1000;
    cfg.flush_every = Some(100);
    let mut w = Writer::new(cfg);
    let rep = rt.block_on(w.run(Until::writes(3000))).expect("run");
    assert_eq!(rep.acked_writes, 3000);
    assert!(rep.flushes >= 29, "{rep:?}");
    assert_eq!((rep.unacked_writes, rep.connections), (0, 1), "{rep:?}");
    let v = rt.block_on(w.verify(&addr)).expect("verify");
    assert_eq!(v.acked + v.initial, 256);
    assert_eq!(v.unacked_landed, 0);
    // A block written at least twice, rolled back to its generation 1.
    let (i, rec) = w
        .records()
        .iter()
        .enumerate()
        .find(|(_, r)| r.acked >= 2)
        .expect("a block written twice");
    let lba = 1000 + i as u64;
    let acked = rec.acked;
    rt.block_on(async {
        let mut c = NbdConn::connect(&addr, "v").await.unwrap();
        let mut b = Vec::new();
        encode_block(w.run_id(), lba, 1, 4096, &mut b);
        c.write(lba * 4096, &b, false).await.unwrap();
        c.disconnect().await.unwrap();
    });
    match rt.block_on(w.verify(&addr)) {
        Err(VerifyFailure::Mismatch { errors, .. }) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(
                errors[0].to_string(),
                format!(
                    "LBA {lba}: expected generation {acked}, found generation 1 (lba {lba}, run \
                     {:#x}, crc ok) (older than the last acknowledged generation)",
                    w.run_id()
                )
            );
        }
        other => panic!("rollback not caught: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The block format and the verification rule, no server
// ---------------------------------------------------------------------------

mod format_and_rule {
    use super::common::writer::*;

    const RUN: u64 = 0xabcd_ef01_2345_6789;
    const BS: usize = 4096;

    fn block(run: u64, lba: u64, gen: u64) -> Vec<u8> {
        let mut v = Vec::new();
        encode_block(run, lba, gen, BS, &mut v);
        v
    }

    fn rec(acked: u64, maybe: &[u64], issued: u64) -> BlockRecord {
        BlockRecord {
            acked,
            maybe: maybe.to_vec(),
            issued,
        }
    }

    #[test]
    fn blocks_round_trip_and_differ() {
        let a = block(RUN, 7, 3);
        assert_eq!(a.len(), BS);
        assert_eq!(
            decode_block(&a),
            Content::Block {
                run: RUN,
                lba: 7,
                gen: 3
            }
        );
        assert_ne!(a, block(RUN, 7, 4));
        assert_ne!(a, block(RUN, 8, 3));
        assert_ne!(a, block(RUN + 1, 7, 3));
        assert_ne!(a[HEADER_BYTES..], block(RUN, 7, 4)[HEADER_BYTES..]);
        assert_eq!(decode_block(&[0u8; BS]), Content::Zeros);
        let mut f = vec![0u8; BS];
        f[100] = 1;
        assert!(matches!(decode_block(&f), Content::Foreign { .. }));
    }

    #[test]
    fn any_changed_byte_is_detected() {
        let good = block(RUN, 9, 2);
        for pos in [0, 9, 17, 25, 33, 37, 40, 41, 2048, BS - 1] {
            let mut b = good.clone();
            b[pos] ^= 0x10;
            assert!(
                !matches!(decode_block(&b), Content::Block { lba: 9, gen: 2, .. }),
                "flip at {pos} went unnoticed"
            );
        }
        // A torn block: the first half of generation 3, the rest of 2.
        let mut torn = block(RUN, 9, 3);
        torn[BS / 2..].copy_from_slice(&good[BS / 2..]);
        let e = check_block(RUN, 9, &rec(2, &[3], 3), &torn).unwrap_err();
        assert!(e.to_string().contains("torn"), "{e}");
    }

    #[test]
    fn the_rule() {
        let b = |g| block(RUN, 5, g);
        // Never written: zeros pass, a maybe-landed generation passes.
        assert_eq!(
            check_block(RUN, 5, &rec(0, &[], 0), &[0; BS]),
            Ok(Pass::Initial)
        );
        assert_eq!(
            check_block(RUN, 5, &rec(0, &[1], 1), &b(1)),
            Ok(Pass::Unacked(1))
        );
        assert_eq!(
            check_block(RUN, 5, &rec(0, &[1], 1), &[0; BS]),
            Ok(Pass::Initial)
        );
        // Acknowledged: that generation, or a later unacknowledged one.
        assert_eq!(check_block(RUN, 5, &rec(4, &[], 4), &b(4)), Ok(Pass::Acked));
        assert_eq!(
            check_block(RUN, 5, &rec(4, &[5, 6], 6), &b(6)),
            Ok(Pass::Unacked(6))
        );
        assert_eq!(
            check_block(RUN, 5, &rec(4, &[5, 6], 6), &b(4)),
            Ok(Pass::Acked)
        );
        // Errors, each with LBA, expectation and what was found.
        let e = check_block(RUN, 5, &rec(4, &[], 4), &b(3)).unwrap_err();
        assert_eq!(e.why, "older than the last acknowledged generation");
        assert_eq!(
            e.to_string(),
            format!(
                "LBA 5: expected generation 4, found generation 3 (lba 5, run {RUN:#x}, crc ok) \
                 (older than the last acknowledged generation)"
            )
        );
        let e = check_block(RUN, 5, &rec(4, &[6], 6), &[0; BS]).unwrap_err();
        assert_eq!(e.why, "an acknowledged write is lost");
        assert!(e
            .to_string()
            .contains("generation 4 or unacknowledged generation(s) [6]"));
        // Generation 5 was sent, then 6 was acknowledged: 5 is superseded.
        let e = check_block(RUN, 5, &rec(6, &[], 6), &b(5)).unwrap_err();
        assert_eq!(e.why, "older than the last acknowledged generation");
        let e = check_block(RUN, 5, &rec(4, &[], 5), &b(5)).unwrap_err();
        assert_eq!(e.why, "a generation superseded before it was acknowledged");
        let e = check_block(RUN, 5, &rec(4, &[], 4), &b(9)).unwrap_err();
        assert_eq!(e.why, "a generation never sent");
        let e = check_block(RUN, 5, &rec(4, &[], 4), &block(RUN, 6, 4)).unwrap_err();
        assert_eq!(e.why, "block of another LBA (misdirected)");
        let e = check_block(RUN, 5, &rec(4, &[], 4), &block(RUN ^ 1, 5, 4)).unwrap_err();
        assert_eq!(e.why, "written by another writer run");
        let e = check_block(RUN, 5, &rec(0, &[], 0), &b(1)).unwrap_err();
        assert_eq!(e.why, "a generation never sent");
        let mut bad = b(4);
        bad[3000] ^= 1;
        let e = check_block(RUN, 5, &rec(4, &[], 4), &bad).unwrap_err();
        assert!(e.to_string().contains("crc stored"), "{e}");
    }
}
