//! The data path's fast case (a request inside one run of extents) makes no
//! heap allocation: counted by a global allocator on this thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use sanvirt_config::{Command, State, VolumeLayout};
use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::{BufferPool, IoFlags, IoRequest, IoServer};
use sanvirt_virt::Virtualization;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; the bookkeeping touches only
// const-initialised thread-locals, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn fast_path_does_not_allocate() {
    const MIB: u64 = 1 << 20;
    let mut state = State::default();
    let mut cmds = vec![Command::CreatePool {
        name: "p".into(),
        extent_size_mib: 1,
    }];
    for i in 0..4 {
        cmds.push(Command::AddMdisk {
            name: format!("m{i}"),
            path: format!("/dev/m{i}"),
            capacity_bytes: 4 * MIB,
        });
        cmds.push(Command::AddMdiskToPool {
            mdisk: format!("m{i}"),
            pool: "p".into(),
        });
    }
    cmds.push(Command::CreateVolume {
        name: "v".into(),
        pool: "p".into(),
        size_bytes: 8 * MIB,
        layout: VolumeLayout::Striped,
        mdisks: vec![],
        thin: None,
        io_group: None,
    });
    for c in &cmds {
        state.apply(c).unwrap();
    }
    let v = state.volumes["v"].id;
    let disks: Vec<_> = state.mdisks.values().map(|m| (m.id, 4 * MIB)).collect();
    let virt = Virtualization::new(MemDisks::new(&disks));
    virt.reconfigure(&state);
    let pool = BufferPool::new(64, 64);

    let mut buf = Some(pool.alloc(16384).unwrap());
    let mut run = |n: u64| {
        for k in 0..n {
            let off = (k % 8) * MIB + 4096 * (k % 200);
            let b = buf.take().unwrap();
            let b =
                futures::executor::block_on(virt.submit(IoRequest::write(v, off, b, k % 3 == 0)))
                    .unwrap()
                    .unwrap();
            let b = futures::executor::block_on(virt.submit(IoRequest::read(v, off, b)))
                .unwrap()
                .unwrap();
            buf = Some(b);
            futures::executor::block_on(virt.submit(IoRequest::write_zeroes(
                v,
                off,
                512,
                IoFlags::default(),
            )))
            .unwrap();
        }
    };
    run(4); // warm up thread-locals (executor, arc-swap debt list)
    COUNTING.with(|c| c.set(true));
    run(500);
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCS.with(Cell::get), 0, "allocations on the fast path");
}
