//! The admin API's bearer token: random, stored mode 0600, never logged.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

/// Reads the token at `path`, creating a new random one if the file is missing.
pub fn load_or_create(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let t = t.trim().to_string();
            anyhow::ensure!(
                t.len() >= 16,
                "token file {} holds fewer than 16 characters",
                path.display()
            );
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 24];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut raw))
                .context("cannot read /dev/urandom")?;
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            writeln!(f, "{token}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read token file {}", path.display())),
    }
}

/// A random 64-bit identity created once and kept in `path` (same format
/// and care as the token: random hex, mode 0600, written atomically). The
/// SCSI front ends derive every volume's NAA identifier from it. (With the
/// cluster it moves into the replicated configuration, so every node reports
/// the same identifiers.)
pub fn load_or_create_uid(path: &Path) -> anyhow::Result<u64> {
    let t = load_or_create(path)?;
    t.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .with_context(|| format!("{} does not start with 16 hex digits", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("api-token");
        let a = load_or_create(&p).unwrap();
        let b = load_or_create(&p).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 48);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
