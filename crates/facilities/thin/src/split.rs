//! Moving a host buffer through a request that maps onto several runs of the
//! real volume (or onto unallocated grains, which read as zeros), without
//! copying host data.
//!
//! As in the virtualization facility, the buffer is cut with
//! `Buffer::split_off` at every run boundary that falls on a page boundary
//! of the buffer, so each run moves to the server with its own pages. Runs
//! whose boundary falls inside a page stay in one chunk: a write sends shared
//! slices (`Buffer::slice`, read-only for the server), a read goes into a
//! bounce buffer copied into the chunk afterwards (counted by the buffer
//! pool; only I/O not aligned to 4 KiB across a grain boundary needs it).

use std::future::Future;

use sanvirt_facility::{Buffer, BufferError, DiskId, IoError, IoFlags, IoOp, IoRequest, IoServer};

/// Where one run of a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// To the real volume at this byte offset.
    Io { real_offset: u64 },
    /// Unallocated: reads as zeros, no I/O (reads only).
    Zero,
}

/// A run: `len` bytes at byte `at` of the request's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub at: u64,
    pub len: u64,
    pub kind: RunKind,
}

/// Zeros `len` bytes of `buf` from `at` (memset, not a copy).
pub(crate) fn zero_range(buf: &mut Buffer, at: usize, len: usize) {
    let end = at + len;
    let mut pos = 0usize;
    for seg in buf.segments_mut() {
        let seg_end = pos + seg.len();
        if seg_end > at && pos < end {
            let from = at.max(pos) - pos;
            let to = end.min(seg_end) - pos;
            seg[from..to].fill(0);
        }
        pos = seg_end;
        if pos >= end {
            break;
        }
    }
}

/// Restates an error of the real volume about `run` in terms of the
/// virtual disk (`base` is the virtual offset of the request).
fn virtual_error(e: IoError, run: &Run, base: u64) -> IoError {
    match (e, run.kind) {
        (
            IoError::Medium {
                disk,
                offset,
                errno,
                errno_text,
            },
            RunKind::Io { real_offset },
        ) => IoError::Medium {
            disk,
            offset: match offset.checked_sub(real_offset) {
                Some(d) if d < run.len => base + run.at + d,
                _ => base + run.at,
            },
            errno,
            errno_text,
        },
        (e, _) => e,
    }
}

/// Serves a read or write of `buf` (virtual offset `base`) as `runs`, which
/// tile the buffer in order, while `side` (zero-filling of newly allocated
/// grains) runs alongside. The buffer comes back whole on success.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn transfer<S: IoServer>(
    server: &S,
    disk: DiskId,
    op: IoOp,
    flags: IoFlags,
    base: u64,
    buf: Buffer,
    runs: &[Run],
    side: impl Future<Output = Result<(), IoError>>,
) -> Result<Buffer, IoError> {
    debug_assert!(matches!(op, IoOp::Read | IoOp::Write));
    let exhausted = |_: BufferError| IoError::Exhausted { disk };
    let lost = IoError::Invalid {
        disk,
        reason: "server did not hand the buffer back",
    };
    let total = buf.len() as u64;

    // Chunks of the buffer: (buffer, first run, run count).
    let mut chunks: Vec<(Option<Buffer>, usize, usize)> = Vec::with_capacity(runs.len());
    let mut rest = buf;
    let (mut chunk_start, mut first) = (0u64, 0usize);
    for (i, r) in runs.iter().enumerate().skip(1) {
        match rest.split_off((r.at - chunk_start) as usize) {
            Ok(tail) => {
                chunks.push((Some(std::mem::replace(&mut rest, tail)), first, i - first));
                chunk_start = r.at;
                first = i;
            }
            Err(BufferError::Unaligned { .. }) => {}
            Err(e) => return Err(exhausted(e)),
        }
    }
    chunks.push((Some(rest), first, runs.len() - first));

    // Each run's buffer, prepared before any request starts.
    let mut bufs: Vec<Option<Buffer>> = Vec::with_capacity(runs.len());
    let mut chunk_of: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
    for (c, (chunk, first, count)) in chunks.iter_mut().enumerate() {
        let base_at = runs[*first].at;
        for r in &runs[*first..*first + *count] {
            let within = (r.at - base_at) as usize;
            chunk_of.push((c, within));
            let b = match (r.kind, *count == 1) {
                (RunKind::Zero, true) => {
                    let b = chunk.as_mut().expect("chunk present");
                    b.zero();
                    None
                }
                (RunKind::Zero, false) => {
                    zero_range(
                        chunk.as_mut().expect("chunk present"),
                        within,
                        r.len as usize,
                    );
                    None
                }
                (RunKind::Io { .. }, true) => chunk.take(),
                (RunKind::Io { .. }, false) => {
                    let ch = chunk.as_ref().expect("multi-run chunks stay");
                    Some(match op {
                        IoOp::Write => ch.slice(within, r.len as usize).map_err(exhausted)?,
                        _ => ch.pool().alloc(r.len as usize).map_err(exhausted)?,
                    })
                }
            };
            bufs.push(b);
        }
    }

    let ios = runs.iter().zip(bufs).filter_map(|(r, buf)| match r.kind {
        RunKind::Io { real_offset } => Some(server.submit(IoRequest {
            disk,
            op,
            offset: real_offset,
            len: r.len,
            flags,
            buf,
        })),
        RunKind::Zero => None,
    });
    let (results, side) = futures::join!(futures::future::join_all(ios), side);

    let mut results = results.into_iter();
    let mut first_err: Option<IoError> = None;
    for (r, &(c, within)) in runs.iter().zip(&chunk_of) {
        if r.kind == RunKind::Zero {
            continue;
        }
        let res = results.next().expect("one result per I/O run");
        let back = match res {
            Ok(b) => b,
            Err(e) => {
                first_err.get_or_insert(virtual_error(e, r, base));
                continue;
            }
        };
        let (chunk, _, count) = &mut chunks[c];
        if *count == 1 {
            *chunk = Some(back.ok_or(lost.clone())?);
        } else if op == IoOp::Read {
            let tmp = back.ok_or(lost.clone())?;
            let dst = chunk.as_mut().expect("multi-run chunks stay");
            let mut at = within;
            for seg in tmp.segments() {
                dst.copy_from_slice(at, seg);
                at += seg.len();
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    side?;
    let mut chunks = chunks.into_iter().map(|(b, _, _)| b);
    let mut out = chunks.next().flatten().ok_or(lost.clone())?;
    for c in chunks {
        out.append(c.ok_or(lost.clone())?)
            .map_err(|_| IoError::Invalid {
                disk,
                reason: "server handed back a different buffer",
            })?;
    }
    if out.len() as u64 != total {
        return Err(lost);
    }
    Ok(out)
}
