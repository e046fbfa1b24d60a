//! Command-level tests against the in-memory back end.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use proptest::prelude::*;
use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::{DiskInfo, IoError, PathState};

use crate::cdb::BLOCK_SIZE;
use crate::sense::key;
use crate::*;

const DISK_BYTES: u64 = 4 << 20;
const BLOCKS: u64 = DISK_BYTES / BLOCK_SIZE as u64;
const INIT: &str = "iqn.2024-01.org.test:host1";

mod alua;
mod cluster_pr;

/// An in-memory PR store that behaves like the replicated configuration:
/// compare-and-set on `config_generation` per disk, which it advances.
#[derive(Default)]
struct MemPr {
    log: Mutex<Vec<(DiskId, PrState)>>,
    states: Mutex<std::collections::HashMap<DiskId, PrState>>,
    fail: Mutex<bool>,
    /// Targets the configuration hands every committed state to, as the
    /// daemon's `reconfigure_io` does on every node.
    targets: Mutex<Vec<std::sync::Weak<ScsiTarget<MemDisks>>>>,
    /// Deliver to `targets` before `persist` returns (the node that
    /// submitted applies the change before its submit returns).
    deliver: std::sync::atomic::AtomicBool,
}

impl MemPr {
    fn state(&self, disk: DiskId) -> PrState {
        self.states.lock().get(&disk).cloned().unwrap_or_default()
    }

    /// What `reconfigure_io` does on every node after a change.
    fn deliver_to_all(&self, disk: DiskId) {
        let state = self.state(disk);
        let targets: Vec<_> = self
            .targets
            .lock()
            .iter()
            .filter_map(|t| t.upgrade())
            .collect();
        for t in targets {
            t.set_reservations(disk, state.clone());
        }
    }
}

impl PrStore for MemPr {
    fn persist(
        &self,
        disk: DiskId,
        expected_generation: u64,
        state: PrState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PrPersistError>> + Send + '_>>
    {
        Box::pin(async move {
            // A round trip to the configuration: concurrent PR OUTs of
            // other targets compute meanwhile.
            tokio::task::yield_now().await;
            if *self.fail.lock() {
                return Err(PrPersistError::Failed("store down".into()));
            }
            state.validate().map_err(PrPersistError::Failed)?;
            let stored = {
                let mut states = self.states.lock();
                let stored = states.entry(disk).or_default();
                if stored.config_generation != expected_generation {
                    return Err(PrPersistError::Conflict(Box::new(stored.clone())));
                }
                *stored = PrState {
                    config_generation: expected_generation + 1,
                    ..state
                };
                stored.clone()
            };
            self.log.lock().push((disk, stored.clone()));
            if self.deliver.load(std::sync::atomic::Ordering::Relaxed) {
                self.deliver_to_all(disk);
            }
            Ok(())
        })
    }
}

fn identity() -> TargetIdentity {
    TargetIdentity {
        vendor: "SANVIRT".into(),
        product: "volume".into(),
        revision: "0001".into(),
        naa_company_id: 0x001405,
        cluster_uid: 0xABCDEF012,
    }
}

struct T<S: IoServer = MemDisks> {
    t: Arc<ScsiTarget<S>>,
    pr: Arc<MemPr>,
    pool: Arc<BufferPool>,
}

fn nexus(init: &str, isid: u8) -> Arc<Nexus> {
    Arc::new(Nexus {
        initiator_name: init.into(),
        initiator_port: format!("{init},i,0x0000000000{isid:02x}").into(),
        relative_target_port: 1,
        target_port_group: 1,
    })
}

fn access(map: &[(&str, &[(u64, DiskId)])]) -> AccessMap {
    let mut a = AccessMap::default();
    for (i, luns) in map {
        a.initiators.insert(
            (*i).into(),
            luns.iter().copied().collect::<BTreeMap<_, _>>(),
        );
    }
    a
}

fn setup() -> T {
    let pool = BufferPool::new(8192, 2048);
    let pr = Arc::new(MemPr::default());
    let server = MemDisks::new(&[(1, DISK_BYTES), (2, DISK_BYTES)]);
    let t = ScsiTarget::new(
        server,
        Arc::clone(&pool),
        identity(),
        pr.clone() as Arc<dyn PrStore>,
    );
    t.set_access(access(&[(INIT, &[(0, 1), (1, 2)])]));
    T { t, pr, pool }
}

struct Out {
    status: u8,
    sense: Option<Sense>,
    data: Vec<u8>,
}

impl Out {
    fn good(&self) -> bool {
        self.status == status::GOOD
    }
    fn ksa(&self) -> (u8, u8, u8) {
        let s = self.sense.expect("sense");
        (s.key, s.asc, s.ascq)
    }
}

impl<S: IoServer> T<S> {
    async fn cmd(
        &self,
        n: &Arc<Nexus>,
        lun: u64,
        cdb: &[u8],
        out: Option<&[u8]>,
        in_len: u32,
    ) -> Out {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let data_out = out.map(|d| {
            let mut b = self.pool.alloc(d.len()).unwrap();
            b.copy_from_slice(0, d);
            b
        });
        let o = self
            .t
            .execute(ScsiTask {
                nexus: Arc::clone(n),
                lun,
                cdb: c,
                cdb_len: cdb.len() as u8,
                attr: TaskAttr::Simple,
                tag: 1,
                data_out,
                data_in_len: in_len,
            })
            .await;
        let data = o.data_in.as_ref().map(|b| b.to_vec()).unwrap_or_default();
        assert!(data.len() <= in_len as usize, "data-in longer than allowed");
        if o.status == status::CHECK_CONDITION {
            assert!(o.sense.is_some());
        }
        Out {
            status: o.status,
            sense: o.sense,
            data,
        }
    }

    /// Clears the power-on unit attention of `n` on `lun`.
    async fn ready(&self, n: &Arc<Nexus>, lun: u64) {
        for _ in 0..4 {
            if self.cmd(n, lun, &[0, 0, 0, 0, 0, 0], None, 0).await.good() {
                return;
            }
        }
        panic!("unit attentions do not clear");
    }

    async fn write10(&self, n: &Arc<Nexus>, lun: u64, lba: u32, data: &[u8]) -> Out {
        let blocks = (data.len() / 512) as u16;
        let mut c = [0x2A, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.cmd(n, lun, &c, Some(data), 0).await
    }

    async fn read10(&self, n: &Arc<Nexus>, lun: u64, lba: u32, blocks: u16) -> Out {
        let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.cmd(n, lun, &c, None, blocks as u32 * 512).await
    }

    async fn pr_out(&self, n: &Arc<Nexus>, sa: u8, ty: u8, key: u64, sa_key: u64) -> Out {
        let mut p = [0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        let c = [0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0];
        self.cmd(n, 0, &c, Some(&p), 0).await
    }
}

fn pattern(blocks: usize, seed: u8) -> Vec<u8> {
    (0..blocks * 512)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn execute_future_is_send() {
    fn is_send<F: std::future::Future + Send>(_: &F) {}
    let t = setup();
    let n = nexus(INIT, 1);
    let f = t.t.execute(ScsiTask {
        nexus: n,
        lun: 0,
        cdb: [0; 16],
        cdb_len: 6,
        attr: TaskAttr::Simple,
        tag: 0,
        data_out: None,
        data_in_len: 0,
    });
    is_send(&f);
    let _ = f.await;
}

#[tokio::test]
async fn first_command_reports_power_on_then_clears() {
    let t = setup();
    let n = nexus(INIT, 1);
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.status, status::CHECK_CONDITION);
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x29, 0x00));
    assert!(t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await.good());
}

#[tokio::test]
async fn inquiry_does_not_consume_unit_attention() {
    let t = setup();
    let n = nexus(INIT, 1);
    assert!(t.cmd(&n, 0, &[0x12, 0, 0, 0, 96, 0], None, 96).await.good());
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x29, 0x00));
}

#[tokio::test]
async fn unmapped_initiator_sees_nothing() {
    let t = setup();
    let n = nexus("iqn.2024-01.org.test:stranger", 1);
    let o = t
        .cmd(&n, 0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None, 256)
        .await;
    assert!(o.good());
    assert_eq!(&o.data[0..4], &[0, 0, 0, 0]);
    let o = t.cmd(&n, 0, &[0x12, 0, 0, 0, 96, 0], None, 96).await;
    assert!(o.good());
    assert_eq!(o.data[0], 0x7F, "peripheral qualifier 3, type 1Fh");
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x25, 0x00));
    let o = t.cmd(&n, 0, &[0x03, 0, 0, 0, 18, 0], None, 18).await;
    assert!(o.good());
    assert_eq!(Sense::decode(&o.data).map(|s| s.asc), Some(0x25));
    // A mapped initiator addressing a LUN it does not have.
    let m = nexus(INIT, 1);
    let o = t.read10(&m, 7, 0, 1).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x25, 0x00));
}

#[tokio::test]
async fn report_luns_and_mapping_change() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t
        .cmd(&n, 0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], None, 256)
        .await;
    assert!(o.good());
    assert_eq!(&o.data[0..4], &16u32.to_be_bytes());
    assert_eq!(o.data[9], 0);
    assert_eq!(o.data[17], 1);
    t.t.set_access(access(&[(INIT, &[(0, 1)])]));
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x3F, 0x0E));
    assert!(t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await.good());
    assert_eq!(t.t.visible_luns(INIT), vec![0]);
}

#[tokio::test]
async fn standard_inquiry_and_truncation() {
    let t = setup();
    let n = nexus(INIT, 1);
    let o = t.cmd(&n, 0, &[0x12, 0, 0, 0, 255, 0], None, 255).await;
    assert!(o.good());
    assert_eq!(o.data[0], 0);
    assert_eq!(o.data[2], 6);
    assert_eq!(o.data[4] as usize + 5, o.data.len());
    assert_eq!(&o.data[8..16], b"SANVIRT ");
    let o = t.cmd(&n, 0, &[0x12, 0, 0, 0, 5, 0], None, 255).await;
    assert_eq!(o.data.len(), 5);
    let o = t.cmd(&n, 0, &[0x12, 0, 0, 0, 255, 0], None, 10).await;
    assert_eq!(o.data.len(), 10, "never more than the expected length");
    let o = t.cmd(&n, 0, &[0x12, 0x02, 0, 0, 255, 0], None, 255).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
}

#[tokio::test]
async fn vpd_pages() {
    let t = setup();
    let n = nexus(INIT, 1);
    let o = t.cmd(&n, 0, &[0x12, 1, 0x00, 0, 255, 0], None, 255).await;
    assert_eq!(&o.data[4..], &pages::VPD_PAGES);
    assert!(o.data[4..].windows(2).all(|w| w[0] < w[1]));
    let o = t.cmd(&n, 0, &[0x12, 1, 0x80, 0, 255, 0], None, 255).await;
    assert_eq!(&o.data[4..], pages::serial(&identity(), 1).as_bytes());
    let o = t.cmd(&n, 0, &[0x12, 1, 0x83, 0, 255, 0], None, 255).await;
    assert_eq!(o.data[1], 0x83);
    assert_eq!(o.data[5] & 0x0F, 3, "first designator is NAA");
    assert_eq!(&o.data[8..24], &pages::naa_id(&identity(), 1));
    // The same volume through another target with the same identity (another
    // node) reports the same NAA; another volume a different one.
    let other = setup();
    let o2 = other
        .cmd(&n, 0, &[0x12, 1, 0x83, 0, 255, 0], None, 255)
        .await;
    assert_eq!(&o2.data[8..24], &o.data[8..24]);
    let o3 = t.cmd(&n, 1, &[0x12, 1, 0x83, 0, 255, 0], None, 255).await;
    assert_ne!(&o3.data[8..24], &o.data[8..24]);
    // Block limits.
    let o = t.cmd(&n, 0, &[0x12, 1, 0xB0, 0, 255, 0], None, 255).await;
    assert_eq!(u16::from_be_bytes([o.data[2], o.data[3]]), 0x3C);
    assert_eq!(o.data[5], cdb::CAW_BLOCKS_MAX);
    assert_eq!(
        u32::from_be_bytes(o.data[8..12].try_into().unwrap()),
        cdb::TRANSFER_BLOCKS_MAX
    );
    assert!(
        u32::from_be_bytes(o.data[20..24].try_into().unwrap()) > 0,
        "unmap supported"
    );
    let o = t.cmd(&n, 0, &[0x12, 1, 0xB1, 0, 255, 0], None, 255).await;
    assert_eq!(u16::from_be_bytes([o.data[4], o.data[5]]), 1);
    let o = t.cmd(&n, 0, &[0x12, 1, 0xB2, 0, 255, 0], None, 255).await;
    assert_eq!(o.data[5] & 0xE4, 0xE4, "LBPU LBPWS LBPWS10 LBPRZ");
    let o = t.cmd(&n, 0, &[0x12, 1, 0x8F, 0, 255, 0], None, 255).await;
    assert_eq!(
        &o.data[4..6],
        &[0, 1],
        "supported commands descriptor first"
    );
    let o = t.cmd(&n, 0, &[0x12, 1, 0xC7, 0, 255, 0], None, 255).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
}

#[tokio::test]
async fn read_capacity() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t
        .cmd(&n, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 8)
        .await;
    assert_eq!(
        u32::from_be_bytes(o.data[0..4].try_into().unwrap()) as u64,
        BLOCKS - 1
    );
    assert_eq!(u32::from_be_bytes(o.data[4..8].try_into().unwrap()), 512);
    let o = t
        .cmd(
            &n,
            0,
            &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            None,
            32,
        )
        .await;
    assert_eq!(
        u64::from_be_bytes(o.data[0..8].try_into().unwrap()),
        BLOCKS - 1
    );
    assert_eq!(o.data[13] & 0x0F, 3, "4096-byte physical blocks");
    assert_eq!(o.data[14] & 0xC0, 0xC0, "LBPME and LBPRZ for a thin volume");
    let o = t
        .cmd(
            &n,
            0,
            &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0],
            None,
            32,
        )
        .await;
    assert_eq!(o.data.len(), 12);
}

#[tokio::test]
async fn capacity_change_unit_attention() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let mut info = DiskInfo::simple(DISK_BYTES * 2);
    info.can_unmap = true;
    t.t.disk_event(&FrontEndDiskEvent::Resized { disk: 1, info });
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x2A, 0x09));
    let o = t
        .cmd(&n, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 8)
        .await;
    assert_eq!(
        u32::from_be_bytes(o.data[0..4].try_into().unwrap()) as u64,
        BLOCKS * 2 - 1
    );
}

#[tokio::test]
async fn write_read_round_trip_all_sizes() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let d = pattern(8, 3);
    assert!(t.write10(&n, 0, 100, &d).await.good());
    let o = t.read10(&n, 0, 100, 8).await;
    assert!(o.good());
    assert_eq!(o.data, d);
    // READ(6), READ(12), READ(16) of the same blocks.
    let o = t.cmd(&n, 0, &[0x08, 0, 0, 100, 8, 0], None, 4096).await;
    assert_eq!(o.data, d);
    let o = t
        .cmd(
            &n,
            0,
            &[0xA8, 0, 0, 0, 0, 100, 0, 0, 0, 8, 0, 0],
            None,
            4096,
        )
        .await;
    assert_eq!(o.data, d);
    let o = t
        .cmd(
            &n,
            0,
            &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 100, 0, 0, 0, 8, 0, 0],
            None,
            4096,
        )
        .await;
    assert_eq!(o.data, d);
    // WRITE(16) with FUA and DPO, WRITE(6), WRITE(12).
    let e = pattern(2, 9);
    let o = t
        .cmd(
            &n,
            0,
            &[0x8A, 0x18, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 2, 0, 0],
            Some(&e),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 7, 2).await.data, e);
    assert!(t
        .cmd(&n, 0, &[0x0A, 0, 0, 20, 2, 0], Some(&e), 0)
        .await
        .good());
    assert_eq!(t.read10(&n, 0, 20, 2).await.data, e);
    assert!(t
        .cmd(
            &n,
            0,
            &[0xAA, 0, 0, 0, 0, 30, 0, 0, 0, 2, 0, 0],
            Some(&e),
            0
        )
        .await
        .good());
    assert_eq!(t.read10(&n, 0, 30, 2).await.data, e);
    // Zero blocks is a no-op.
    assert!(t.read10(&n, 0, 0, 0).await.good());
}

#[tokio::test]
async fn data_path_does_not_copy() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let d = pattern(16, 1);
    let mut b = t.pool.alloc(d.len()).unwrap();
    b.copy_from_slice(0, &d);
    let before = t.pool.stats();
    let mut cdb = [0u8; 16];
    cdb[..10].copy_from_slice(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 16, 0]);
    let o =
        t.t.execute(ScsiTask {
            nexus: Arc::clone(&n),
            lun: 0,
            cdb,
            cdb_len: 10,
            attr: TaskAttr::Simple,
            tag: 1,
            data_out: Some(b),
            data_in_len: 0,
        })
        .await;
    assert!(o.status == status::GOOD);
    cdb[0] = 0x28;
    let o =
        t.t.execute(ScsiTask {
            nexus: Arc::clone(&n),
            lun: 0,
            cdb,
            cdb_len: 10,
            attr: TaskAttr::Simple,
            tag: 2,
            data_out: None,
            data_in_len: 8192,
        })
        .await;
    assert_eq!(o.data_in.as_ref().map(|b| b.len()), Some(8192));
    let after = t.pool.stats();
    assert_eq!(after.explicit_copies, before.explicit_copies);
    assert_eq!(after.cow_copies, before.cow_copies);
}

#[tokio::test]
async fn out_of_range_and_protect_fields() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t.read10(&n, 0, BLOCKS as u32, 1).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    let o = t.read10(&n, 0, BLOCKS as u32 - 1, 2).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    let o = t
        .cmd(
            &n,
            0,
            &[
                0x88, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 1, 0, 0,
            ],
            None,
            512,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    let o = t
        .cmd(&n, 0, &[0x28, 0x40, 0, 0, 0, 0, 0, 0, 1, 0], None, 512)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    assert_eq!(o.sense.unwrap().field_pointer.unwrap().byte, 1);
    let o = t
        .cmd(&n, 0, &[0xC1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 0)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x20, 0));
}

#[tokio::test]
async fn short_data_out_writes_what_arrived() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    t.write10(&n, 0, 0, &[0xAA; 1024]).await;
    // Two blocks asked for, one delivered: the one is written (FCP-4 (a)).
    let o = t
        .cmd(
            &n,
            0,
            &[0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0],
            Some(&[0xAB; 512]),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 0, 1).await.data, vec![0xAB; 512]);
    assert_eq!(t.read10(&n, 0, 1, 1).await.data, vec![0xAA; 512]);
    // No Data-Out at all: nothing written, GOOD.
    let o = t
        .cmd(&n, 0, &[0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0], None, 0)
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 1, 1).await.data, vec![0xAA; 512]);
    // Longer than the CDB asks: only the CDB's length is written.
    let o = t
        .cmd(
            &n,
            0,
            &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            Some(&[0xCD; 1024]),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 0, 1).await.data, vec![0xCD; 512]);
    assert_eq!(t.read10(&n, 0, 1, 1).await.data, vec![0xAA; 512]);
    // Commands that need all their data refuse a short transfer.
    let o = t
        .cmd(
            &n,
            0,
            &[0x2F, 0x02, 0, 0, 0, 0, 0, 0, 2, 0],
            Some(&[0xCD; 512]),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x0E, 0x03));
}

#[tokio::test]
async fn verify_bytchk() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let d = pattern(4, 5);
    t.write10(&n, 0, 10, &d).await;
    assert!(t
        .cmd(&n, 0, &[0x2F, 0, 0, 0, 0, 10, 0, 0, 4, 0], None, 0)
        .await
        .good());
    assert!(t
        .cmd(&n, 0, &[0x2F, 0x02, 0, 0, 0, 10, 0, 0, 4, 0], Some(&d), 0)
        .await
        .good());
    let mut bad = d.clone();
    bad[1000] ^= 1;
    let o = t
        .cmd(&n, 0, &[0x2F, 0x02, 0, 0, 0, 10, 0, 0, 4, 0], Some(&bad), 0)
        .await;
    assert_eq!(o.ksa(), (key::MISCOMPARE, 0x1D, 0));
    assert_eq!(o.sense.unwrap().information, Some(1000));
    // BYTCHK 3: one block compared with every block.
    let same = vec![0x5Au8; 512 * 3];
    t.write10(&n, 0, 50, &same).await;
    assert!(t
        .cmd(
            &n,
            0,
            &[0x2F, 0x06, 0, 0, 0, 50, 0, 0, 3, 0],
            Some(&[0x5A; 512]),
            0
        )
        .await
        .good());
    let o = t
        .cmd(
            &n,
            0,
            &[0x2F, 0x06, 0, 0, 0, 50, 0, 0, 4, 0],
            Some(&[0x5A; 512]),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::MISCOMPARE, 0x1D, 0));
    assert_eq!(o.sense.unwrap().information, Some(1536));
    let o = t
        .cmd(
            &n,
            0,
            &[0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            None,
            0,
        )
        .await;
    assert!(o.good(), "zero blocks");
    let o = t
        .cmd(&n, 0, &[0xAF, 0x04, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], None, 0)
        .await;
    assert_eq!(
        o.ksa(),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "BYTCHK 2 is reserved"
    );
}

#[tokio::test]
async fn write_and_verify() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let d = pattern(3, 8);
    assert!(t
        .cmd(&n, 0, &[0x2E, 0x02, 0, 0, 0, 40, 0, 0, 3, 0], Some(&d), 0)
        .await
        .good());
    assert_eq!(t.read10(&n, 0, 40, 3).await.data, d);
    let o = t
        .cmd(
            &n,
            0,
            &[0x8E, 0, 0, 0, 0, 0, 0, 0, 0, 60, 0, 0, 0, 3, 0, 0],
            Some(&d),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 60, 3).await.data, d);
}

#[tokio::test]
async fn synchronize_cache_and_prefetch() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    assert!(t
        .cmd(&n, 0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 0)
        .await
        .good());
    assert!(t
        .cmd(
            &n,
            0,
            &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0],
            None,
            0
        )
        .await
        .good());
    let o = t
        .cmd(&n, 0, &[0x35, 0, 0xFF, 0, 0, 0, 0, 0, 1, 0], None, 0)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    assert!(t
        .cmd(&n, 0, &[0x34, 0, 0, 0, 0, 0, 0, 1, 0, 0], None, 0)
        .await
        .good());
    let o = t
        .cmd(
            &n,
            0,
            &[0x90, 0, 0, 0, 0, 0, 0, 0, 0x7F, 0xFF, 0, 0, 0, 1, 0, 0],
            None,
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
}

#[tokio::test]
async fn mode_sense_pages() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t.cmd(&n, 0, &[0x1A, 0, 0x3F, 0, 255, 0], None, 255).await;
    assert!(o.good());
    assert_eq!(o.data[0] as usize + 1, o.data.len());
    assert_eq!(o.data[2] & 0x10, 0x10, "DPOFUA");
    assert_eq!(o.data[3], 8, "one block descriptor");
    let mut codes = Vec::new();
    let mut i = 4 + 8;
    while i < o.data.len() {
        codes.push(o.data[i] & 0x3F);
        i += 2 + o.data[i + 1] as usize;
    }
    assert_eq!(codes, pages::MODE_PAGES.to_vec());
    // MODE SENSE(10) with LLBAA: a 16-byte block descriptor.
    let o = t
        .cmd(&n, 0, &[0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(u16::from_be_bytes([o.data[6], o.data[7]]), 16);
    assert_eq!(o.data[8 + 16] & 0x3F, 0x08);
    assert_eq!(o.data[8 + 16 + 2] & 0x04, 0x04, "WCE");
    // Changeable values of the control page: D_SENSE and SWP.
    let o = t
        .cmd(&n, 0, &[0x1A, 0x08, 0x4A, 0, 255, 0], None, 255)
        .await;
    assert_eq!(o.data[4 + 2], 0x04);
    assert_eq!(o.data[4 + 4], 0x08);
    let o = t.cmd(&n, 0, &[0x1A, 0, 0x33, 0, 255, 0], None, 255).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    // Truncated to the allocation length; the length field still says all.
    let o = t.cmd(&n, 0, &[0x1A, 0, 0x3F, 0, 4, 0], None, 255).await;
    assert_eq!(o.data.len(), 4);
    assert!(o.data[0] > 3);
}

async fn set_control(t: &T, n: &Arc<Nexus>, d_sense: bool, swp: bool) -> Out {
    let o = t.cmd(n, 0, &[0x1A, 0x08, 0x0A, 0, 255, 0], None, 255).await;
    let mut p = o.data.clone();
    p[0] = 0;
    p[2] &= 0x7F; // WP is reserved in MODE SELECT; DPOFUA too
    p[2] = 0;
    p[4 + 2] = (p[4 + 2] & !0x04) | if d_sense { 0x04 } else { 0 };
    p[4 + 4] = (p[4 + 4] & !0x08) | if swp { 0x08 } else { 0 };
    t.cmd(n, 0, &[0x15, 0x10, 0, 0, p.len() as u8, 0], Some(&p), 0)
        .await
}

#[tokio::test]
async fn mode_select_d_sense_switches_sense_format() {
    let t = setup();
    let n = nexus(INIT, 1);
    let other = nexus(INIT, 2);
    t.ready(&n, 0).await;
    t.ready(&other, 0).await;
    assert!(set_control(&t, &n, true, false).await.good());
    let o = t.read10(&n, 0, BLOCKS as u32, 1).await;
    let s = o.sense.unwrap();
    let bytes = t.t.encode_sense(&n, 0, &s);
    assert_eq!(bytes[0], 0x72, "descriptor format");
    assert_eq!(Sense::decode(&bytes), Some(s));
    // The other nexus learns the mode parameters changed.
    let o = t.cmd(&other, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x2A, 0x01));
    assert!(set_control(&t, &n, false, false).await.good());
    assert_eq!(t.t.encode_sense(&n, 0, &s)[0], 0x70);
}

#[tokio::test]
async fn mode_select_swp_write_protects() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    assert!(set_control(&t, &n, false, true).await.good());
    let o = t.cmd(&n, 0, &[0x1A, 0, 0x0A, 0, 255, 0], None, 255).await;
    assert_eq!(o.data[2] & 0x80, 0x80, "WP in the header");
    assert!(t.read10(&n, 0, 0, 1).await.good());
    let o = t.write10(&n, 0, 0, &[1; 512]).await;
    assert_eq!(o.ksa(), (key::DATA_PROTECT, 0x27, 0x02));
    assert!(set_control(&t, &n, false, false).await.good());
    assert!(t.write10(&n, 0, 0, &[1; 512]).await.good());
}

#[tokio::test]
async fn mode_select_rejects_bad_lists() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    // Unchangeable bit (QERR) in the control page.
    let mut p = vec![
        0u8, 0, 0, 0, 0x0A, 0x0A, 0, 0x12, 0, 0x40, 0, 0, 0xFF, 0xFF, 0, 0,
    ];
    let o = t
        .cmd(&n, 0, &[0x15, 0x10, 0, 0, p.len() as u8, 0], Some(&p), 0)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x26, 0));
    // A page running past the list.
    p.truncate(10);
    let o = t
        .cmd(&n, 0, &[0x15, 0x10, 0, 0, p.len() as u8, 0], Some(&p), 0)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x1A, 0));
    // SP: saving is not supported.
    let o = t.cmd(&n, 0, &[0x15, 0x11, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x39, 0));
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    params::encode_unmap(
        &ranges
            .iter()
            .map(|&(lba, blocks)| params::UnmapRange { lba, blocks })
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn unmap_zeroes_ranges() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    t.write10(&n, 0, 0, &pattern(16, 2)).await;
    let p = unmap_list(&[(2, 3), (10, 2)]);
    let o = t
        .cmd(
            &n,
            0,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, p.len() as u8, 0],
            Some(&p),
            0,
        )
        .await;
    assert!(o.good());
    let d = t.read10(&n, 0, 0, 16).await.data;
    let orig = pattern(16, 2);
    for b in 0..16 {
        let blk = &d[b * 512..b * 512 + 512];
        if (2..5).contains(&b) || (10..12).contains(&b) {
            assert!(blk.iter().all(|&x| x == 0), "block {b} unmapped");
        } else {
            assert_eq!(blk, &orig[b * 512..b * 512 + 512]);
        }
    }
    let p = unmap_list(&[(BLOCKS - 1, 2)]);
    let o = t
        .cmd(
            &n,
            0,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, p.len() as u8, 0],
            Some(&p),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    let o = t
        .cmd(
            &n,
            0,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0],
            Some(&[0, 2, 0, 0]),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x1A, 0));
    assert!(t
        .cmd(&n, 0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 0)
        .await
        .good());
}

#[tokio::test]
async fn write_same_variants() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let block: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let o = t
        .cmd(&n, 0, &[0x41, 0, 0, 0, 0, 8, 0, 0, 5, 0], Some(&block), 0)
        .await;
    assert!(o.good());
    let d = t.read10(&n, 0, 8, 5).await.data;
    for b in 0..5 {
        assert_eq!(&d[b * 512..b * 512 + 512], &block[..]);
    }
    // WRITE SAME(16) with UNMAP and a zero block deallocates.
    let o = t
        .cmd(
            &n,
            0,
            &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0],
            Some(&[0; 512]),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 8, 2).await.data, vec![0; 1024]);
    assert_eq!(&t.read10(&n, 0, 10, 1).await.data, &block);
    // UNMAP deallocates whatever the block holds (LBPRZ: reads zeros).
    t.write10(&n, 0, 12, &[0xFF; 512]).await;
    let o = t
        .cmd(
            &n,
            0,
            &[0x41, 0x08, 0, 0, 0, 12, 0, 0, 1, 0],
            Some(&[0xFF; 512]),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 12, 1).await.data, vec![0; 512]);
    // NDOB: no Data-Out, zeros.
    let o = t
        .cmd(
            &n,
            0,
            &[0x93, 0x01, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 3, 0, 0],
            None,
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(t.read10(&n, 0, 10, 3).await.data, vec![0; 1536]);
    // Beyond the end; wrong Data-Out sizes.
    let o = t
        .cmd(
            &n,
            0,
            &[0x41, 0, 0, 0, 0x1F, 0xFF, 0, 0, 2, 0],
            Some(&block),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    let o = t
        .cmd(
            &n,
            0,
            &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            Some(&block[..256]),
            0,
        )
        .await;
    assert_eq!(o.status, status::CHECK_CONDITION);
    let o = t
        .cmd(
            &n,
            0,
            &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            Some(&[0; 1024]),
            0,
        )
        .await;
    assert_eq!(o.status, status::CHECK_CONDITION);
    // Zero blocks: to the end of the medium.
    let o = t
        .cmd(
            &n,
            0,
            &[0x41, 0, 0, 0, 0x1F, 0xF0, 0, 0, 0, 0],
            Some(&block),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(&t.read10(&n, 0, BLOCKS as u32 - 1, 1).await.data, &block);
    // A chunked (multi-request) pattern write.
    let o = t
        .cmd(
            &n,
            0,
            &[0x41, 0, 0, 0, 0, 0, 0, 0x10, 0, 0],
            Some(&block),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(&t.read10(&n, 0, 4095, 1).await.data, &block);
}

fn caw_cdb(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

#[tokio::test]
async fn compare_and_write() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let old = pattern(2, 1);
    let new = pattern(2, 2);
    t.write10(&n, 0, 5, &old).await;
    let both = [old.clone(), new.clone()].concat();
    assert!(t.cmd(&n, 0, &caw_cdb(5, 2), Some(&both), 0).await.good());
    assert_eq!(t.read10(&n, 0, 5, 2).await.data, new);
    // Miscompare: offset of the first difference, nothing written.
    let o = t.cmd(&n, 0, &caw_cdb(5, 2), Some(&both), 0).await;
    assert_eq!(o.ksa(), (key::MISCOMPARE, 0x1D, 0));
    let first = old.iter().zip(&new).position(|(a, b)| a != b).unwrap();
    assert_eq!(o.sense.unwrap().information, Some(first as u64));
    assert_eq!(t.read10(&n, 0, 5, 2).await.data, new);
    // Wrong Data-Out size; beyond the end; too long.
    let o = t.cmd(&n, 0, &caw_cdb(5, 1), Some(&both), 0).await;
    assert_eq!(o.status, status::CHECK_CONDITION);
    let o = t.cmd(&n, 0, &caw_cdb(BLOCKS, 1), Some(&[0; 1024]), 0).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
    let big = vec![0u8; 255 * 1024];
    let o = t.cmd(&n, 0, &caw_cdb(0, 255), Some(&big), 0).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    // 256 blocks wrap to 0 in the CDB's one byte: data with zero blocks.
    let o = t
        .cmd(&n, 0, &caw_cdb(0, 0), Some(&vec![0u8; 256 * 1024]), 0)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    assert!(t.cmd(&n, 0, &caw_cdb(0, 0), None, 0).await.good());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_write_is_atomic_under_contention() {
    // Many initiators race to bump a counter block with CAW; each success
    // must have seen the value it replaced, so the final value equals the
    // number of successes.
    let t = Arc::new(setup());
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let mut tasks = Vec::new();
    for w in 0..4u8 {
        let t = Arc::clone(&t);
        tasks.push(tokio::spawn(async move {
            let n = nexus(INIT, 10 + w);
            t.ready(&n, 0).await;
            let mut wins = 0u64;
            for _ in 0..50 {
                let cur = t.read10(&n, 0, 0, 1).await.data;
                let v = u64::from_le_bytes(cur[..8].try_into().unwrap());
                let mut next = vec![0u8; 512];
                next[..8].copy_from_slice(&(v + 1).to_le_bytes());
                // Plain writes elsewhere in the range lock's way.
                t.write10(&n, 0, 1, &[w; 512]).await;
                let o = t
                    .cmd(&n, 0, &caw_cdb(0, 1), Some(&[cur, next].concat()), 0)
                    .await;
                if o.good() {
                    wins += 1;
                } else {
                    assert_eq!(o.ksa(), (key::MISCOMPARE, 0x1D, 0));
                }
            }
            wins
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let d = t.read10(&n, 0, 0, 1).await.data;
    assert_eq!(u64::from_le_bytes(d[..8].try_into().unwrap()), total);
    assert!(total > 0);
}

#[tokio::test]
async fn orwrite() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    t.write10(&n, 0, 3, &[0x0F; 1024]).await;
    let mut c = [0u8; 16];
    c[0] = 0x8B;
    c[9] = 3;
    c[13] = 2;
    assert!(t.cmd(&n, 0, &c, Some(&[0xF0; 1024]), 0).await.good());
    assert_eq!(t.read10(&n, 0, 3, 2).await.data, vec![0xFF; 1024]);
    c[2] = 0xFF;
    let o = t.cmd(&n, 0, &c, Some(&[0xF0; 1024]), 0).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
}

#[tokio::test]
async fn get_lba_status() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t
        .cmd(
            &n,
            0,
            &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 24, 0, 0],
            None,
            24,
        )
        .await;
    assert!(o.good());
    assert_eq!(u32::from_be_bytes(o.data[0..4].try_into().unwrap()), 20);
    assert_eq!(u64::from_be_bytes(o.data[8..16].try_into().unwrap()), 8);
    assert_eq!(
        u32::from_be_bytes(o.data[16..20].try_into().unwrap()) as u64,
        BLOCKS - 8
    );
    assert_eq!(o.data[20] & 0x0F, 0, "mapped");
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&BLOCKS.to_be_bytes());
    c[13] = 24;
    let o = t.cmd(&n, 0, &c, None, 24).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x21, 0));
}

#[tokio::test]
async fn report_supported_opcodes_and_tmfs() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t
        .cmd(
            &n,
            0,
            &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0],
            None,
            65535,
        )
        .await;
    assert!(o.good());
    let len = u32::from_be_bytes(o.data[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, cdb::SUPPORTED.len() * 8);
    // One command, with its usage data.
    let o = t
        .cmd(
            &n,
            0,
            &[0xA3, 0x0C, 0x01, 0x2A, 0, 0, 0, 0, 1, 0, 0, 0],
            None,
            256,
        )
        .await;
    assert_eq!(o.data[1] & 7, 3);
    assert_eq!(o.data[4], 0x2A);
    // A service-action command asked for without its service action.
    let o = t
        .cmd(
            &n,
            0,
            &[0xA3, 0x0C, 0x01, 0x9E, 0, 0, 0, 0, 1, 0, 0, 0],
            None,
            256,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    // With RCTD: timeouts descriptors follow.
    let o = t
        .cmd(
            &n,
            0,
            &[0xA3, 0x0C, 0x80, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0],
            None,
            65535,
        )
        .await;
    assert_eq!(
        u32::from_be_bytes(o.data[0..4].try_into().unwrap()) as usize,
        cdb::SUPPORTED.len() * 20
    );
    let o = t
        .cmd(&n, 0, &[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], None, 4)
        .await;
    assert!(o.good());
    assert_eq!(o.data[0] & 0x88, 0x88, "ATS and LURS");
}

#[tokio::test]
async fn report_target_port_groups() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t
        .cmd(
            &n,
            0,
            &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            None,
            256,
        )
        .await;
    assert!(o.good());
    assert_eq!(o.data[4] & 0x0F, 0, "active/optimized");
    assert_eq!(u16::from_be_bytes([o.data[6], o.data[7]]), 1);
    assert_eq!(u16::from_be_bytes([o.data[14], o.data[15]]), 1);
}

#[tokio::test]
async fn start_stop_and_prevent_allow() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    assert!(t.cmd(&n, 0, &[0x1B, 0, 0, 0, 0, 0], None, 0).await.good());
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::NOT_READY, 0x04, 0x02));
    assert!(t.cmd(&n, 0, &[0x1B, 0, 0, 0, 1, 0], None, 0).await.good());
    assert!(t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await.good());
    assert!(t.cmd(&n, 0, &[0x1E, 0, 0, 0, 1, 0], None, 0).await.good());
    let o = t.cmd(&n, 0, &[0x1B, 0, 0, 0, 2, 0], None, 0).await;
    assert_eq!(
        o.ksa(),
        (key::ILLEGAL_REQUEST, 0x53, 0x02),
        "eject prevented"
    );
    t.t.nexus_lost(&n);
    assert!(t.cmd(&n, 0, &[0x1B, 0, 0, 0, 1, 0], None, 0).await.status == status::CHECK_CONDITION);
    assert!(
        t.cmd(&n, 0, &[0x1B, 0, 0, 0, 3, 0], None, 0).await.good(),
        "load after nexus loss"
    );
}

#[tokio::test]
async fn request_sense_reports_pending_unit_attention() {
    let t = setup();
    let n = nexus(INIT, 1);
    let o = t.cmd(&n, 0, &[0x03, 0, 0, 0, 18, 0], None, 18).await;
    assert!(o.good());
    let s = Sense::decode(&o.data).unwrap();
    assert_eq!((s.key, s.asc), (key::UNIT_ATTENTION, 0x29));
    let o = t.cmd(&n, 0, &[0x03, 1, 0, 0, 18, 0], None, 18).await;
    assert_eq!(o.data[0], 0x72);
    assert_eq!(o.data[1], key::NO_SENSE);
    assert!(t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await.good());
}

#[tokio::test]
async fn disk_offline_is_not_ready() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    t.t.disk_path_event(&DiskPathEvent {
        disk: 1,
        node: 1,
        state: PathState::Offline {
            reason: "gone".into(),
        },
    });
    let o = t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::NOT_READY, 0x04, 0x03));
    assert!(t.cmd(&n, 0, &[0x12, 0, 0, 0, 36, 0], None, 36).await.good());
    t.t.disk_path_event(&DiskPathEvent {
        disk: 1,
        node: 1,
        state: PathState::Online,
    });
    assert!(t.cmd(&n, 0, &[0, 0, 0, 0, 0, 0], None, 0).await.good());
}

#[test]
fn io_errors_map_to_sense() {
    let d = 1;
    let cases = [
        (
            IoError::NoSuchDisk { disk: d },
            (key::ILLEGAL_REQUEST, 0x25, 0),
        ),
        (
            IoError::OutOfRange {
                disk: d,
                offset: 0,
                len: 1,
                size: 0,
            },
            (key::ILLEGAL_REQUEST, 0x21, 0),
        ),
        (
            IoError::Unavailable {
                disk: d,
                reason: "x".into(),
            },
            (key::NOT_READY, 0x04, 0x03),
        ),
        (
            IoError::NoSpace { disk: d },
            (key::DATA_PROTECT, 0x27, 0x07),
        ),
        (
            IoError::Medium {
                disk: d,
                offset: 4096,
                errno: 5,
                errno_text: "EIO".into(),
            },
            (key::MEDIUM_ERROR, 0x11, 0),
        ),
        (
            IoError::NotSupported {
                disk: d,
                op: sanvirt_facility::IoOp::Unmap,
            },
            (key::ILLEGAL_REQUEST, 0x20, 0),
        ),
    ];
    for (e, want) in cases {
        let s = io_error_sense(&e, false);
        assert_eq!((s.key, s.asc, s.ascq), want, "{e}");
    }
    let s = io_error_sense(
        &IoError::Medium {
            disk: d,
            offset: 4096,
            errno: 5,
            errno_text: "EIO".into(),
        },
        true,
    );
    assert_eq!(
        (s.key, s.asc, s.information),
        (key::MEDIUM_ERROR, 0x0C, Some(8))
    );
}

// ---- reservations ----

#[tokio::test]
async fn spc2_reserve_release() {
    let t = setup();
    let a = nexus(INIT, 1);
    let b = nexus(INIT, 2);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;
    assert!(t.cmd(&a, 0, &[0x16, 0, 0, 0, 0, 0], None, 0).await.good());
    assert!(t.cmd(&a, 0, &[0x16, 0, 0, 0, 0, 0], None, 0).await.good());
    assert_eq!(
        t.cmd(&b, 0, &[0x16, 0, 0, 0, 0, 0], None, 0).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        t.read10(&b, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        t.cmd(&b, 0, &[0x1A, 0, 0x3F, 0, 255, 0], None, 255)
            .await
            .status,
        status::RESERVATION_CONFLICT
    );
    assert!(t.cmd(&b, 0, &[0x12, 0, 0, 0, 36, 0], None, 36).await.good());
    assert!(
        t.cmd(&b, 0, &[0x17, 0, 0, 0, 0, 0], None, 0).await.good(),
        "release by non-holder"
    );
    assert_eq!(
        t.read10(&b, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    // Nexus loss releases it.
    t.t.nexus_lost(&a);
    assert!(t.read10(&b, 0, 0, 1).await.good());
    // LUN reset releases it and reports 29/03.
    assert!(t
        .cmd(&b, 0, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 0)
        .await
        .good());
    assert_eq!(
        t.t.task_management(&b, Tmf::LunReset { lun: 0 }).await,
        TmfResponse::Complete
    );
    let o = t.cmd(&a, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(
        o.ksa(),
        (key::UNIT_ATTENTION, 0x29, 0x00),
        "a comes back as a new nexus"
    );
    let o = t.cmd(&b, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(
        o.ksa(),
        (key::UNIT_ATTENTION, 0x29, 0x03),
        "b sees the LUN reset"
    );
    assert!(t.cmd(&a, 0, &[0x16, 0, 0, 0, 0, 0], None, 0).await.good());
    assert_eq!(
        t.t.task_management(&a, Tmf::LunReset { lun: 9 }).await,
        TmfResponse::NoSuchLun
    );
}

#[tokio::test]
async fn persistent_reservation_flow() {
    let t = setup();
    let a = nexus(INIT, 1);
    let b = nexus(INIT, 2);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;
    assert!(t.pr_out(&a, 0, 0, 0, 0xA).await.good());
    assert!(
        t.pr_out(&b, 6, 0, 0, 0xB).await.good(),
        "register and ignore"
    );
    assert_eq!(t.pr.log.lock().len(), 2, "each change persisted");
    // READ KEYS.
    let o = t
        .cmd(&a, 0, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(u32::from_be_bytes(o.data[4..8].try_into().unwrap()), 16);
    assert_eq!(&o.data[8..16], &0xAu64.to_be_bytes());
    // Wrong key: conflict.
    assert_eq!(
        t.pr_out(&a, 1, 1, 0xB, 0).await.status,
        status::RESERVATION_CONFLICT
    );
    // Write Exclusive by a.
    assert!(t.pr_out(&a, 1, 1, 0xA, 0).await.good());
    let o = t
        .cmd(&b, 0, &[0x5E, 1, 0, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(u32::from_be_bytes(o.data[4..8].try_into().unwrap()), 16);
    assert_eq!(&o.data[8..16], &0xAu64.to_be_bytes());
    assert_eq!(o.data[21] & 0x0F, 1);
    assert!(t.read10(&b, 0, 0, 1).await.good());
    assert_eq!(
        t.write10(&b, 0, 0, &[0; 512]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert!(t.write10(&a, 0, 0, &[0; 512]).await.good());
    // b preempts a: a's registration goes, a learns it.
    assert!(t.pr_out(&b, 4, 3, 0xB, 0xA).await.good());
    let o = t.cmd(&a, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x2A, 0x05));
    assert_eq!(
        t.read10(&a, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    let st = t.t.reservations(1).unwrap();
    assert_eq!(st.registrations.len(), 1);
    assert_eq!(st.reservation.as_ref().unwrap().pr_type, 3);
    assert_eq!(t.pr.log.lock().last().unwrap().1, st);
    // READ FULL STATUS names b as holder.
    let o = t
        .cmd(&b, 0, &[0x5E, 3, 0, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(&o.data[8..16], &0xBu64.to_be_bytes());
    assert_eq!(o.data[20] & 1, 1);
    // CLEAR.
    assert!(t.pr_out(&b, 3, 0, 0xB, 0).await.good());
    assert!(t.read10(&a, 0, 0, 1).await.good());
    assert!(t.t.reservations(1).unwrap().registrations.is_empty());
}

#[tokio::test]
async fn persistent_reservation_report_capabilities_and_bad_lists() {
    let t = setup();
    let a = nexus(INIT, 1);
    t.ready(&a, 0).await;
    let o = t
        .cmd(&a, 0, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], None, 8)
        .await;
    assert!(o.good());
    assert_eq!(u16::from_be_bytes([o.data[0], o.data[1]]), 8);
    assert_eq!(o.data[3] & 0x80, 0x80, "TMV");
    assert_eq!(o.data[4], 0xEA);
    assert_eq!(o.data[5], 0x01);
    let o = t
        .cmd(&a, 0, &[0x5E, 4, 0, 0, 0, 0, 0, 0, 8, 0], None, 8)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    let o = t
        .cmd(
            &a,
            0,
            &[0x5F, 0, 0, 0, 0, 0, 0, 0, 20, 0],
            Some(&[0; 20]),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x1A, 0));
    assert!(t.pr_out(&a, 0, 0, 0, 1).await.good());
    let o = t.pr_out(&a, 1, 2, 1, 0).await;
    assert_eq!(
        o.ksa(),
        (key::ILLEGAL_REQUEST, 0x24, 0),
        "type 2 is not defined"
    );
}

#[tokio::test]
async fn persistent_reservation_not_changed_when_store_fails() {
    let t = setup();
    let a = nexus(INIT, 1);
    t.ready(&a, 0).await;
    *t.pr.fail.lock() = true;
    let o = t.pr_out(&a, 0, 0, 0, 1).await;
    assert_eq!(o.status, status::CHECK_CONDITION);
    assert!(t.t.reservations(1).unwrap().registrations.is_empty());
}

#[tokio::test]
async fn reservations_from_configuration() {
    let t = setup();
    let a = nexus(INIT, 1);
    let b = nexus(INIT, 2);
    let state = PrState {
        generation: 4,
        registrations: vec![PrRegistration {
            nexus: a.pr_nexus(),
            key: 7,
        }],
        reservation: Some(PrReservation {
            holder: a.pr_nexus(),
            pr_type: 3,
            key: 7,
        }),
        aptpl: true,
        config_generation: 3,
        ..PrState::default()
    };
    t.t.set_reservations(1, state);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;
    assert_eq!(
        t.read10(&b, 0, 0, 1).await.status,
        status::RESERVATION_CONFLICT
    );
    assert!(t.read10(&a, 0, 0, 1).await.good());
    // Other volumes are not affected.
    t.ready(&b, 1).await;
    assert!(t.read10(&b, 1, 0, 1).await.good());
}

#[tokio::test]
async fn register_and_move_through_the_target() {
    let t = setup();
    let a = nexus(INIT, 1);
    let b = nexus(INIT, 2);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;
    assert!(t.pr_out(&a, 0, 0, 0, 1).await.good());
    assert!(t.pr_out(&a, 1, 1, 1, 0).await.good());
    let tid = params::encode_transport_id(&b.initiator_port);
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&1u64.to_be_bytes());
    p[8..16].copy_from_slice(&2u64.to_be_bytes());
    p[17] = 0x02; // UNREG
    p[18..20].copy_from_slice(&1u16.to_be_bytes());
    p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
    p.extend_from_slice(&tid);
    let o = t
        .cmd(
            &a,
            0,
            &[0x5F, 7, 1, 0, 0, 0, 0, 0, p.len() as u8, 0],
            Some(&p),
            0,
        )
        .await;
    assert!(o.good());
    assert!(t.write10(&b, 0, 0, &[0; 512]).await.good());
    assert_eq!(
        t.write10(&a, 0, 0, &[0; 512]).await.status,
        status::RESERVATION_CONFLICT
    );
}

#[tokio::test]
async fn target_reset_unit_attention() {
    let t = setup();
    let a = nexus(INIT, 1);
    t.ready(&a, 0).await;
    t.ready(&a, 1).await;
    assert_eq!(
        t.t.task_management(&a, Tmf::TargetWarmReset).await,
        TmfResponse::Complete
    );
    for lun in [0, 1] {
        let o = t.cmd(&a, lun, &[0, 0, 0, 0, 0, 0], None, 0).await;
        assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x29, 0x00));
    }
}

// ---- EXTENDED COPY ----

fn xcopy_list(t: &T, list_id: u8, segs: Vec<params::XcopySegment>, targets: &[DiskId]) -> Vec<u8> {
    let _ = t;
    params::encode_xcopy(&params::XcopyList {
        list_id,
        list_id_usage: 0,
        targets: targets
            .iter()
            .map(|&d| params::XcopyTarget {
                designator_type: 3,
                designator: pages::naa_id(&identity(), d).to_vec(),
                block_len: 512,
            })
            .collect(),
        segments: segs,
    })
}

fn xcopy_cdb(len: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

#[tokio::test]
async fn extended_copy_between_volumes() {
    let t = setup();
    let a = nexus(INIT, 1);
    t.ready(&a, 0).await;
    t.ready(&a, 1).await;
    let d = pattern(300, 4);
    for (i, chunk) in d.chunks(64 * 512).enumerate() {
        t.write10(&a, 0, (i * 64) as u32, chunk).await;
    }
    let seg = params::XcopySegment {
        src: 0,
        dst: 1,
        blocks: 300,
        src_lba: 0,
        dst_lba: 1000,
    };
    let p = xcopy_list(&t, 5, vec![seg], &[1, 2]);
    let o = t.cmd(&a, 0, &xcopy_cdb(p.len()), Some(&p), 0).await;
    assert!(o.good(), "{:?}", o.sense);
    let mut got = Vec::new();
    for i in 0..5 {
        got.extend(t.read10(&a, 1, 1000 + i * 60, 60).await.data);
    }
    assert_eq!(got, d);
    // Copy status for list 5.
    let mut c = [0u8; 16];
    c[0] = 0x84;
    c[2] = 5;
    c[13] = 60;
    let o = t.cmd(&a, 0, &c, None, 60).await;
    assert!(o.good());
    assert_eq!(o.data[4] & 0x7F, 1, "completed without errors");
    assert_eq!(u16::from_be_bytes([o.data[5], o.data[6]]), 1);
    c[2] = 6;
    let o = t.cmd(&a, 0, &c, None, 60).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    // Operating parameters.
    c[1] = 3;
    let o = t.cmd(&a, 0, &c, None, 60).await;
    assert_eq!(
        u16::from_be_bytes([o.data[8], o.data[9]]) as usize,
        params::XCOPY_TARGETS_MAX
    );
}

#[tokio::test]
async fn extended_copy_errors() {
    let t = setup();
    let a = nexus(INIT, 1);
    t.ready(&a, 0).await;
    // Unknown target volume.
    let seg = params::XcopySegment {
        src: 0,
        dst: 0,
        blocks: 1,
        src_lba: 0,
        dst_lba: 1,
    };
    let p = xcopy_list(&t, 1, vec![seg], &[99]);
    let o = t.cmd(&a, 0, &xcopy_cdb(p.len()), Some(&p), 0).await;
    assert_eq!(o.ksa(), (key::COPY_ABORTED, 0x0D, 0x02));
    // Index beyond the target list, and beyond the end of the volume.
    let seg = params::XcopySegment {
        src: 0,
        dst: 1,
        blocks: 1,
        src_lba: 0,
        dst_lba: 1,
    };
    let p = xcopy_list(&t, 1, vec![seg], &[1]);
    let o = t.cmd(&a, 0, &xcopy_cdb(p.len()), Some(&p), 0).await;
    assert_eq!(o.sense.unwrap().key, key::COPY_ABORTED);
    let seg = params::XcopySegment {
        src: 0,
        dst: 0,
        blocks: 2,
        src_lba: 0,
        dst_lba: BLOCKS - 1,
    };
    let p = xcopy_list(&t, 1, vec![seg], &[1]);
    let o = t.cmd(&a, 0, &xcopy_cdb(p.len()), Some(&p), 0).await;
    assert_eq!(o.sense.unwrap().key, key::COPY_ABORTED);
    // Truncated list; empty list.
    let o = t
        .cmd(&a, 0, &xcopy_cdb(p.len() - 1), Some(&p[..p.len() - 1]), 0)
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x1A, 0));
    assert!(t.cmd(&a, 0, &xcopy_cdb(0), None, 0).await.good());
}

// ---- sense encodings ----

fn arb_sense() -> impl Strategy<Value = Sense> {
    (
        0u8..16,
        any::<u8>(),
        any::<u8>(),
        proptest::option::of((any::<bool>(), any::<u16>(), proptest::option::of(0u8..8))),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(key, asc, ascq, fp, info)| Sense {
            key,
            asc,
            ascq,
            field_pointer: fp.map(|(in_cdb, byte, bit)| FieldPointer { in_cdb, byte, bit }),
            information: info.map(u64::from),
        })
}

proptest! {
    #[test]
    fn sense_round_trips_in_both_formats(s in arb_sense()) {
        prop_assert_eq!(Sense::decode(&s.to_fixed()), Some(s));
        prop_assert_eq!(Sense::decode(&s.to_descriptor()), Some(s));
        prop_assert!(s.to_descriptor().len() <= sense::DESCRIPTOR_SENSE_LEN_MAX);
    }

    #[test]
    fn sense_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = Sense::decode(&b);
    }
}

#[tokio::test]
async fn arbitrary_cdbs_never_panic_the_target() {
    // A deterministic sweep of opcodes with junk fields: every outcome is a
    // well-formed status, never a panic.
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for op in 0..=255u8 {
        for _ in 0..4 {
            let mut c = [0u8; 16];
            for b in c.iter_mut().skip(1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            c[0] = op;
            // Keep transfers small so the sweep stays fast.
            let _ = t.cmd(&n, 0, &c, Some(&[0u8; 64]), 4096).await;
        }
    }
}

// ---- fully provisioned volumes ----

/// MemDisks reporting no unmap support (a fully provisioned volume).
struct Thick(MemDisks);

impl sanvirt_facility::IoServer for Thick {
    fn submit(
        &self,
        req: sanvirt_facility::IoRequest,
    ) -> impl std::future::Future<Output = sanvirt_facility::IoResult> + Send {
        self.0.submit(req)
    }
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.0.disk_info(disk).map(|mut i| {
            i.can_unmap = false;
            i.unmap_zeroes = false;
            i
        })
    }
    fn bind_client(&self, client: std::sync::Weak<dyn sanvirt_facility::IoClient>) {
        self.0.bind_client(client)
    }
}

#[tokio::test]
async fn thick_volume_refuses_unmap() {
    let pool = BufferPool::new(1024, 256);
    let t = ScsiTarget::new(
        Thick(MemDisks::new(&[(1, DISK_BYTES)])),
        Arc::clone(&pool),
        identity(),
        Arc::new(MemPr::default()) as Arc<dyn PrStore>,
    );
    t.set_access(access(&[(INIT, &[(0, 1)])]));
    let h = T {
        t,
        pr: Arc::new(MemPr::default()),
        pool,
    };
    let n = nexus(INIT, 1);
    h.ready(&n, 0).await;
    let o = h
        .cmd(
            &n,
            0,
            &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            None,
            32,
        )
        .await;
    assert_eq!(o.data[14] & 0xC0, 0, "no LBPME / LBPRZ");
    let o = h.cmd(&n, 0, &[0x12, 1, 0xB2, 0, 255, 0], None, 255).await;
    assert_eq!(o.data[5] & 0xE0, 0, "no LBPU / LBPWS");
    let o = h.cmd(&n, 0, &[0x12, 1, 0xB0, 0, 255, 0], None, 255).await;
    assert_eq!(&o.data[20..28], &[0; 8], "no unmap limits");
    let p = unmap_list(&[(0, 1)]);
    let o = h
        .cmd(
            &n,
            0,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, p.len() as u8, 0],
            Some(&p),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x20, 0));
    let o = h
        .cmd(
            &n,
            0,
            &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 1, 0],
            Some(&[0; 512]),
            0,
        )
        .await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x24, 0));
    // WRITE SAME without UNMAP still zeroes.
    h.write10(&n, 0, 0, &[7; 512]).await;
    let o = h
        .cmd(
            &n,
            0,
            &[0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            Some(&[0; 512]),
            0,
        )
        .await;
    assert!(o.good());
    assert_eq!(h.read10(&n, 0, 0, 1).await.data, vec![0; 512]);
}

#[tokio::test]
async fn persistent_reserve_conflicts_with_spc2_reservation() {
    let t = setup();
    let a = nexus(INIT, 1);
    let b = nexus(INIT, 2);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;
    assert!(t.cmd(&a, 0, &[0x16, 0, 0, 0, 0, 0], None, 0).await.good());
    assert_eq!(
        t.pr_out(&b, 0, 0, 0, 5).await.status,
        status::RESERVATION_CONFLICT
    );
    let o = t
        .cmd(&b, 0, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(o.status, status::RESERVATION_CONFLICT);
    assert!(t.pr_out(&a, 0, 0, 0, 5).await.good(), "the holder may");
}

#[test]
fn transfer_lengths_for_the_transport() {
    let t = setup();
    let n = nexus(INIT, 1);
    assert_eq!(
        t.t.data_out_len(&n, 0, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
            .ok(),
        Some(4096)
    );
    assert_eq!(
        t.t.data_out_len(&n, 0, &[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0])
            .ok(),
        Some(2048)
    );
    assert_eq!(
        t.t.data_out_len(&n, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
            .ok(),
        Some(0)
    );
    let e =
        t.t.data_out_len(&n, 0, &[0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err();
    assert_eq!(e.sense.map(|s| s.asc), Some(0x20));
    let e =
        t.t.data_out_len(&n, 9, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
            .unwrap_err();
    assert_eq!(e.sense.map(|s| s.asc), Some(0x25));
    assert_eq!(t.t.data_in_len(&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), 4096);
    assert_eq!(t.t.data_in_len(&[0x12, 0, 0, 0, 96, 0]), 96);
}

#[tokio::test]
async fn mode_sense10_and_page_controls() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    // Default values equal the initial current values; saved = default.
    let cur = t
        .cmd(&n, 0, &[0x5A, 0x08, 0x08, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    let def = t
        .cmd(&n, 0, &[0x5A, 0x08, 0x88, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    let sav = t
        .cmd(&n, 0, &[0x5A, 0x08, 0xC8, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(cur.data, def.data);
    assert_eq!(def.data, sav.data);
    assert_eq!(
        u16::from_be_bytes([cur.data[0], cur.data[1]]) as usize + 2,
        cur.data.len()
    );
    // Clear WCE through MODE SELECT(10): every write becomes FUA, and the
    // current page reports it.
    let mut p = cur.data.clone();
    p[0] = 0;
    p[1] = 0;
    p[3] = 0;
    p[8 + 2] &= !0x04;
    let o = t
        .cmd(
            &n,
            0,
            &[0x55, 0x10, 0, 0, 0, 0, 0, 0, p.len() as u8, 0],
            Some(&p),
            0,
        )
        .await;
    assert!(o.good(), "{:?}", o.sense);
    let cur = t
        .cmd(&n, 0, &[0x5A, 0x08, 0x08, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(cur.data[8 + 2] & 0x04, 0);
    assert!(t.write10(&n, 0, 0, &[1; 512]).await.good());
    // A LUN reset restores the defaults.
    t.t.task_management(&n, Tmf::LunReset { lun: 0 }).await;
    t.ready(&n, 0).await;
    let cur = t
        .cmd(&n, 0, &[0x5A, 0x08, 0x08, 0, 0, 0, 0, 1, 0, 0], None, 256)
        .await;
    assert_eq!(cur.data[8 + 2] & 0x04, 0x04);
}

#[tokio::test]
async fn deleted_volume_is_gone() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 1).await;
    t.t.disk_event(&FrontEndDiskEvent::Deleted { disk: 2 });
    t.t.server().remove(2, "deleted");
    let o = t.read10(&n, 1, 0, 1).await;
    assert_eq!(o.ksa(), (key::ILLEGAL_REQUEST, 0x25, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_aborts_the_preempted_nexus_tasks() {
    let t = Arc::new(setup());
    let a = nexus(INIT, 1);
    let b = nexus(INIT, 2);
    t.ready(&a, 0).await;
    t.ready(&b, 0).await;
    assert!(t.pr_out(&a, 0, 0, 0, 0xA).await.good());
    assert!(t.pr_out(&b, 0, 0, 0, 0xB).await.good());
    assert!(
        t.pr_out(&b, 1, 5, 0xB, 0).await.good(),
        "WE registrants only"
    );
    // Hold the range so b's write stays in flight.
    let lu = t.t.lu(1).unwrap();
    let guard = lu.ranges.lock(0, 8, true).await;
    let t2 = Arc::clone(&t);
    let b2 = Arc::clone(&b);
    let write = tokio::spawn(async move { t2.write10(&b2, 0, 0, &[9; 512]).await.status });
    while lu.ranges.holders() < 1 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // a preempts b's registration and reservation, aborting its tasks.
    assert!(t.pr_out(&a, 5, 1, 0xA, 0xB).await.good());
    drop(guard);
    assert_eq!(write.await.unwrap(), status::TASK_ABORTED);
    assert_eq!(
        t.read10(&a, 0, 0, 1).await.data,
        vec![0; 512],
        "nothing written"
    );
    let o = t.cmd(&b, 0, &[0, 0, 0, 0, 0, 0], None, 0).await;
    assert_eq!(o.ksa(), (key::UNIT_ATTENTION, 0x2A, 0x05));
    // a's own tasks are unaffected.
    assert!(t.write10(&a, 0, 0, &[1; 512]).await.good());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Commands that take parameter lists, with arbitrary lists: the target
    /// answers each with a well-formed outcome (never a panic), and GOOD
    /// leaves the persistent-reservation state well formed.
    #[test]
    fn parameter_lists_never_panic_the_target(
        which in 0usize..5,
        sa in 0u8..8,
        ty in 0u8..9,
        list in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let t = setup();
            let n = nexus(INIT, 1);
            t.ready(&n, 0).await;
            let len = list.len();
            let cdb: Vec<u8> = match which {
                0 => vec![0x42, 0, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0],
                1 => vec![0x15, 0x10, 0, 0, len.min(255) as u8, 0],
                2 => vec![0x55, 0x10, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0],
                3 => vec![0x5F, sa, ty, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0],
                _ => {
                    let mut c = vec![0u8; 16];
                    c[0] = 0x83;
                    c[13] = len as u8;
                    c
                }
            };
            let data = if which == 1 { &list[..len.min(255)] } else { &list[..] };
            let o = t.cmd(&n, 0, &cdb, Some(data), 0).await;
            assert!(matches!(
                o.status,
                status::GOOD | status::CHECK_CONDITION | status::RESERVATION_CONFLICT
            ));
            if let Some(st) = t.t.reservations(1) {
                assert!(st.validate().is_ok());
            }
        });
    }
}

#[tokio::test]
async fn read_cut_to_the_expected_length() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let d = pattern(16, 6);
    t.write10(&n, 0, 0, &d).await;
    // 8 KiB asked for by the CDB, 1000 bytes expected by the initiator.
    let o = t
        .cmd(&n, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0], None, 1000)
        .await;
    assert!(o.good());
    assert_eq!(o.data, d[..1000].to_vec());
    let o = t
        .cmd(&n, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0], None, 4096)
        .await;
    assert_eq!(o.data, d[..4096].to_vec());
    let o = t
        .cmd(&n, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0], None, 0)
        .await;
    assert!(o.good() && o.data.is_empty());
}

/// MemDisks that report the first half of every disk as a hole.
struct HalfHoles(MemDisks);

impl sanvirt_facility::IoServer for HalfHoles {
    fn submit(
        &self,
        req: sanvirt_facility::IoRequest,
    ) -> impl std::future::Future<Output = sanvirt_facility::IoResult> + Send {
        self.0.submit(req)
    }
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.0.disk_info(disk)
    }
    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl std::future::Future<Output = Result<Vec<sanvirt_facility::AllocExtent>, IoError>> + Send
    {
        let size = self.0.disk_info(disk).map(|i| i.size_bytes).unwrap_or(0);
        async move {
            let half = size / 2;
            let mut v = Vec::new();
            let end = offset + len;
            if offset < half {
                v.push(sanvirt_facility::AllocExtent {
                    len: half.min(end) - offset,
                    hole: true,
                    zero: true,
                });
            }
            if end > half {
                v.push(sanvirt_facility::AllocExtent {
                    len: end - half.max(offset),
                    hole: false,
                    zero: false,
                });
            }
            Ok(v)
        }
    }
    fn bind_client(&self, client: std::sync::Weak<dyn sanvirt_facility::IoClient>) {
        self.0.bind_client(client)
    }
}

#[tokio::test]
async fn get_lba_status_reports_deallocated_ranges() {
    let pool = BufferPool::new(1024, 256);
    let t = ScsiTarget::new(
        HalfHoles(MemDisks::new(&[(1, DISK_BYTES)])),
        Arc::clone(&pool),
        identity(),
        Arc::new(MemPr::default()) as Arc<dyn PrStore>,
    );
    t.set_access(access(&[(INIT, &[(0, 1)])]));
    let h = T {
        t,
        pr: Arc::new(MemPr::default()),
        pool,
    };
    let n = nexus(INIT, 1);
    h.ready(&n, 0).await;
    let o = h
        .cmd(
            &n,
            0,
            &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 64, 0, 0],
            None,
            64,
        )
        .await;
    assert!(o.good());
    assert_eq!(u32::from_be_bytes(o.data[0..4].try_into().unwrap()), 4 + 32);
    // First descriptor: LBA 10 up to the middle, deallocated.
    assert_eq!(u64::from_be_bytes(o.data[8..16].try_into().unwrap()), 10);
    assert_eq!(
        u32::from_be_bytes(o.data[16..20].try_into().unwrap()) as u64,
        BLOCKS / 2 - 10
    );
    assert_eq!(o.data[20] & 0x0F, 1);
    // Second: the mapped half.
    assert_eq!(
        u64::from_be_bytes(o.data[24..32].try_into().unwrap()),
        BLOCKS / 2
    );
    assert_eq!(o.data[36] & 0x0F, 0);
    // An allocation length with room for one descriptor gets one.
    let o = h
        .cmd(
            &n,
            0,
            &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 24, 0, 0],
            None,
            24,
        )
        .await;
    assert_eq!(o.data.len(), 24);
}

#[test]
fn data_out_len_is_bounded_before_any_data_moves() {
    let t = setup();
    let n = nexus(INIT, 1);
    // 2 GiB of WRITE(16) at LBA 0 of a 4 MiB volume: out of range first,
    // after the power-on unit attention of a new nexus.
    let mut c = [0u8; 16];
    c[0] = 0x8A;
    c[10..14].copy_from_slice(&(4u32 << 20).to_be_bytes());
    let e = t.t.data_out_len(&n, 0, &c).unwrap_err();
    assert_eq!(e.sense.map(|s| s.asc), Some(0x29));
    let e = t.t.data_out_len(&n, 0, &c).unwrap_err();
    assert_eq!(e.sense.map(|s| s.asc), Some(0x21));
    // PR OUT asking for 4 GiB of parameters.
    let e =
        t.t.data_out_len(&n, 0, &[0x5F, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0])
            .unwrap_err();
    assert_eq!(e.sense.map(|s| s.asc), Some(0x1A));
    let mut x = [0u8; 16];
    x[0] = 0x83;
    x[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(t.t.data_out_len(&n, 0, &x).is_err());
}

#[tokio::test]
async fn transfer_longer_than_the_maximum_is_an_invalid_field() {
    let pool = BufferPool::new(1024, 256);
    let t = ScsiTarget::new(
        MemDisks::new(&[(1, 64 << 20)]),
        Arc::clone(&pool),
        identity(),
        Arc::new(MemPr::default()) as Arc<dyn PrStore>,
    );
    t.set_access(access(&[(INIT, &[(0, 1)])]));
    let n = nexus(INIT, 1);
    let mut c = [0u8; 16];
    c[0] = 0x8A;
    c[10..14].copy_from_slice(&(cdb::TRANSFER_BLOCKS_MAX + 1).to_be_bytes());
    let e = t.data_out_len(&n, 0, &c).unwrap_err();
    assert_eq!(e.sense.map(|s| s.asc), Some(0x29), "unit attention first");
    let e = t.data_out_len(&n, 0, &c).unwrap_err();
    assert_eq!(
        e.sense.map(|s| (s.asc, s.field_pointer.unwrap().byte)),
        Some((0x24, 7))
    );
    c[10..14].copy_from_slice(&cdb::TRANSFER_BLOCKS_MAX.to_be_bytes());
    assert_eq!(t.data_out_len(&n, 0, &c).ok(), Some(32 << 20));
}

#[tokio::test]
async fn read_defect_data_lists_are_empty() {
    let t = setup();
    let n = nexus(INIT, 1);
    t.ready(&n, 0).await;
    let o = t
        .cmd(&n, 0, &[0x37, 0, 0x18 | 5, 0, 0, 0, 0, 0, 32, 0], None, 32)
        .await;
    assert!(o.good());
    assert_eq!(o.data, vec![0, 0x18 | 5, 0, 0]);
    let o = t
        .cmd(
            &n,
            0,
            &[0xB7, 0x08 | 4, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            None,
            32,
        )
        .await;
    assert_eq!(o.data, vec![0, 0x08 | 4, 0, 0, 0, 0, 0, 0]);
}
