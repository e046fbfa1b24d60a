//! Test scaffolding, as in the paper: "a dummy front end that generates
//! requests and a dummy back end". The real back end over local files lives in
//! `sanvirt-backend`; [`MemDisks`] is an in-memory server for facility tests
//! that must not touch disks, and [`DummyFrontEnd`] drives any [`IoServer`]
//! with a verified random workload and records the events it receives.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::*;

/// In-memory disks. Zero-initialised; unmap and write-zeroes zero the range.
pub struct MemDisks {
    disks: Mutex<HashMap<DiskId, (DiskInfo, Vec<u8>)>>,
    client: ClientLink,
}

impl MemDisks {
    pub fn new(disks: &[(DiskId, u64)]) -> MemDisks {
        MemDisks {
            disks: Mutex::new(
                disks
                    .iter()
                    .map(|&(id, size)| {
                        let mut info = DiskInfo::simple(size);
                        info.can_unmap = true;
                        info.unmap_zeroes = true;
                        (id, (info, vec![0u8; size as usize]))
                    })
                    .collect(),
            ),
            client: ClientLink::default(),
        }
    }

    /// Takes a disk away (tests of disk-path events).
    pub fn remove(&self, disk: DiskId, reason: &str) {
        self.disks.lock().remove(&disk);
        self.client.disk_path_event(DiskPathEvent {
            disk,
            node: 1,
            state: PathState::Offline {
                reason: reason.into(),
            },
        });
    }
}

impl IoServer for MemDisks {
    async fn submit(&self, mut req: IoRequest) -> IoResult {
        let mut disks = self.disks.lock();
        let (info, data) = disks
            .get_mut(&req.disk)
            .ok_or(IoError::NoSuchDisk { disk: req.disk })?;
        req.validate(info.size_bytes)?;
        let (o, l) = (req.offset as usize, req.len as usize);
        match req.op {
            IoOp::Read => {
                let buf = req.buf.as_mut().expect("validated");
                let mut pos = o;
                for seg in buf.segments_mut() {
                    seg.copy_from_slice(&data[pos..pos + seg.len()]);
                    pos += seg.len();
                }
            }
            IoOp::Write => {
                let buf = req.buf.as_ref().expect("validated");
                let mut pos = o;
                for seg in buf.segments() {
                    data[pos..pos + seg.len()].copy_from_slice(seg);
                    pos += seg.len();
                }
            }
            IoOp::Unmap | IoOp::WriteZeroes => data[o..o + l].fill(0),
            IoOp::Flush => {}
        }
        Ok(req.buf)
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.disks.lock().get(&disk).map(|d| d.0)
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.client.bind(client);
        let disks: Vec<_> = self.disks.lock().iter().map(|(&d, v)| (d, v.0)).collect();
        for (disk, info) in disks {
            self.client
                .front_end_disk_event(FrontEndDiskEvent::Created {
                    disk,
                    name: format!("mem{disk}").into(),
                    info,
                });
        }
    }
}

/// Records every event it receives (an IOClient for tests).
#[derive(Default)]
pub struct EventLog {
    pub path: Mutex<Vec<DiskPathEvent>>,
    pub front_end: Mutex<Vec<FrontEndDiskEvent>>,
}

impl IoClient for EventLog {
    fn disk_path_event(&self, event: DiskPathEvent) {
        self.path.lock().push(event);
    }
    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        self.front_end.lock().push(event);
    }
}

/// Generates a random, self-verifying workload against one disk of a server:
/// every block written carries its offset and a generation number, and every
/// read checks the block holds the newest generation written there.
pub struct DummyFrontEnd<'a, S: IoServer> {
    pub server: &'a S,
    pub pool: Arc<BufferPool>,
    pub disk: DiskId,
    pub block: u64,
    generation: HashMap<u64, u64>,
    rng: u64,
}

impl<'a, S: IoServer> DummyFrontEnd<'a, S> {
    pub fn new(server: &'a S, pool: Arc<BufferPool>, disk: DiskId, seed: u64) -> Self {
        DummyFrontEnd {
            server,
            pool,
            disk,
            block: 4096,
            generation: HashMap::new(),
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic from the seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pattern(offset: u64, generation: u64, out: &mut [u8]) {
        for (i, c) in out.chunks_mut(16).enumerate() {
            let mut w = [0u8; 16];
            w[..8].copy_from_slice(&(offset + i as u64 * 16).to_le_bytes());
            w[8..].copy_from_slice(&generation.to_le_bytes());
            c.copy_from_slice(&w[..c.len()]);
        }
    }

    /// Runs `ops` random reads and writes of 1..=8 blocks; panics on the
    /// first data mismatch or unexpected error.
    pub async fn run(&mut self, ops: usize) {
        let size = self.server.disk_info(self.disk).expect("disk").size_bytes;
        let blocks = size / self.block;
        assert!(blocks > 0);
        for n in 0..ops {
            let count = 1 + self.next() % 8.min(blocks);
            let first = self.next() % (blocks - count + 1);
            let offset = first * self.block;
            let len = (count * self.block) as usize;
            let mut buf = self.pool.alloc(len).expect("buffers");
            if self.next().is_multiple_of(2) {
                let generation = n as u64 + 1;
                let mut pos = offset;
                for seg in buf.segments_mut() {
                    Self::pattern(pos, generation, seg);
                    pos += seg.len() as u64;
                }
                let fua = self.next().is_multiple_of(4);
                self.server
                    .submit(IoRequest::write(self.disk, offset, buf, fua))
                    .await
                    .expect("write");
                for b in first..first + count {
                    self.generation.insert(b, generation);
                }
            } else {
                let buf = self
                    .server
                    .submit(IoRequest::read(self.disk, offset, buf))
                    .await
                    .expect("read")
                    .expect("read returns its buffer");
                let mut expect = vec![0u8; self.block as usize];
                let mut got = vec![0u8; self.block as usize];
                for b in first..first + count {
                    // Never-written blocks have unspecified content.
                    let Some(g) = self.generation.get(&b).copied() else {
                        continue;
                    };
                    let pos = b * self.block;
                    buf.copy_to_slice((pos - offset) as usize, &mut got);
                    Self::pattern(pos, g, &mut expect);
                    assert_eq!(got, expect, "block {b} (offset {pos}) holds wrong data");
                }
            }
        }
    }
}
