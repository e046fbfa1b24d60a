//! Measuring (and, on request, creating) a back-end disk before the
//! `AddMdisk` command that carries its capacity is proposed. The state
//! machine never looks at the machine itself: this is the edge where it does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Largest file `--create-size` will create (64 TiB).
pub const CREATE_BYTES_MAX: u64 = 64 << 40;

/// Capacity in bytes of the file or block device at `path`. With
/// `create_size_bytes`, first creates a sparse file of that size; an existing
/// path is then refused so no data is ever truncated.
pub fn probe_mdisk(path: &str, create_size_bytes: Option<u64>) -> Result<u64, String> {
    let p = Path::new(path);
    if path.is_empty() {
        return Err("mdisk path is empty".into());
    }
    if let Some(size) = create_size_bytes {
        if size == 0 || size > CREATE_BYTES_MAX || size % 512 != 0 {
            return Err(format!(
                "create size must be a non-zero multiple of 512 bytes up to {CREATE_BYTES_MAX}, not {size}"
            ));
        }
        create_sparse(p, size).map_err(|e| format!("cannot create {path}: {e}"))?;
    }
    let meta = std::fs::metadata(p).map_err(|e| format!("cannot use {path}: {e}"))?;
    let ft = meta.file_type();
    let capacity = if ft.is_file() {
        meta.len()
    } else if ft.is_block_device() {
        block_device_size(p).map_err(|e| format!("cannot size block device {path}: {e}"))?
    } else {
        return Err(format!(
            "{path} is neither a regular file nor a block device"
        ));
    };
    // The back end must be able to open it for writing.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|e| format!("cannot open {path} for reading and writing: {e}"))?;
    if capacity < 512 {
        return Err(format!(
            "{path} holds {capacity} bytes; an mdisk needs at least 512"
        ));
    }
    Ok(capacity)
}

fn create_sparse(p: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new().write(true).create_new(true).open(p)?;
    f.set_len(size)?;
    f.sync_all()?;
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn block_device_size(p: &Path) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let f = File::open(p)?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live local of that type; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_measures_and_refuses_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("md0.img");
        let ps = p.to_str().unwrap();
        assert_eq!(probe_mdisk(ps, Some(1 << 30)).unwrap(), 1 << 30);
        assert_eq!(probe_mdisk(ps, None).unwrap(), 1 << 30);
        let e = probe_mdisk(ps, Some(1 << 20)).unwrap_err();
        assert!(e.contains("File exists"), "{e}");
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            1 << 30,
            "nothing truncated"
        );
        assert!(probe_mdisk(d.path().to_str().unwrap(), None)
            .unwrap_err()
            .contains("neither"));
        assert!(probe_mdisk("/nonexistent/x", None).is_err());
        assert!(probe_mdisk(ps, Some(1000))
            .unwrap_err()
            .contains("multiple of 512"));
        assert!(probe_mdisk("", None).is_err());
    }
}
