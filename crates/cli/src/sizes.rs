//! Size arguments: `sanvirt_admin::units::parse_size` plus what each option
//! requires. Errors become clap usage errors (exit status 2).

use sanvirt_admin::units::{format_bytes, parse_size};
use sanvirt_config::{
    EXTENT_SIZE_MIB_MAX, EXTENT_SIZE_MIB_MIN, SECTOR_BYTES, THIN_GRAIN_KIB_MAX, THIN_GRAIN_KIB_MIN,
    VOLUME_BYTES_MAX,
};

fn sectors(text: &str, what: &str) -> Result<u64, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    if bytes == 0 {
        return Err(format!("{what} must be larger than 0"));
    }
    if bytes % SECTOR_BYTES != 0 {
        let down = bytes / SECTOR_BYTES * SECTOR_BYTES;
        let up = down.saturating_add(SECTOR_BYTES);
        return Err(format!(
            "{what} {bytes} bytes is not a multiple of {SECTOR_BYTES} bytes (sectors); \
             try {} or {up}",
            down.max(SECTOR_BYTES)
        ));
    }
    Ok(bytes)
}

/// `volume create --size`, `volume expand --size`: whole sectors, at most
/// the largest volume.
pub fn parse_volume_size(text: &str) -> Result<u64, String> {
    let bytes = sectors(text, "volume size")?;
    if bytes > VOLUME_BYTES_MAX {
        return Err(format!(
            "volume size {} is larger than the largest volume ({})",
            format_bytes(bytes),
            format_bytes(VOLUME_BYTES_MAX)
        ));
    }
    Ok(bytes)
}

/// `volume create --real-size`: any positive size (rounded up to extents
/// by the pool).
pub fn parse_real_size(text: &str) -> Result<u64, String> {
    match parse_size(text).map_err(|e| e.to_string())? {
        0 => Err("real size must be larger than 0".into()),
        b => Ok(b),
    }
}

/// `volume create --grain`: a power of two from 32 KiB to 256 KiB, in KiB.
pub fn parse_grain(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    let kib = bytes / 1024;
    let ok = bytes % 1024 == 0
        && (u64::from(THIN_GRAIN_KIB_MIN)..=u64::from(THIN_GRAIN_KIB_MAX)).contains(&kib)
        && kib.is_power_of_two();
    if !ok {
        return Err(format!(
            "grain must be a power of two from {THIN_GRAIN_KIB_MIN} KiB to {THIN_GRAIN_KIB_MAX} \
             KiB (e.g. 64KiB), not {}",
            format_bytes(bytes)
        ));
    }
    Ok(kib as u32)
}

/// Default real size of a thin volume of `virtual_bytes` in a pool of
/// `extent_bytes` extents: 2% of the virtual size (room for the first
/// writes and the metadata), at least one extent.
pub fn default_real_size(virtual_bytes: u64, extent_bytes: u64) -> u64 {
    virtual_bytes.div_ceil(50).max(extent_bytes)
}

/// `mdisk add --create-size`: whole sectors.
pub fn parse_create_size(text: &str) -> Result<u64, String> {
    sectors(text, "create size")
}

/// `pool create --extent-size`: a whole number of MiB within the pool limits.
pub fn parse_extent_size(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text).map_err(|e| e.to_string())?;
    let mib = 1u64 << 20;
    if bytes % mib != 0 {
        return Err(format!(
            "extent size must be a whole number of MiB (e.g. 16MiB), not {bytes} bytes"
        ));
    }
    let range = u64::from(EXTENT_SIZE_MIB_MIN)..=u64::from(EXTENT_SIZE_MIB_MAX);
    match u32::try_from(bytes / mib) {
        Ok(m) if range.contains(&u64::from(m)) => Ok(m),
        _ => Err(format!(
            "extent size must be between {EXTENT_SIZE_MIB_MIN} MiB and {EXTENT_SIZE_MIB_MAX} MiB, not {}",
            format_bytes(bytes)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn volume_sizes() {
        assert_eq!(parse_volume_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_volume_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_volume_size("1T"), Ok(1 << 40));
        assert_eq!(parse_volume_size("4096"), Ok(4096));
        assert_eq!(parse_volume_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_volume_size("256TiB"), Ok(256 << 40));
        let e = parse_volume_size("1000").unwrap_err();
        assert!(
            e.contains("not a multiple of 512") && e.contains("try 512 or 1024"),
            "{e}"
        );
        assert!(parse_volume_size("0")
            .unwrap_err()
            .contains("larger than 0"));
        assert!(parse_volume_size("-5GiB").unwrap_err().contains("negative"));
        assert!(parse_volume_size("257TiB")
            .unwrap_err()
            .contains("largest volume"));
        assert!(parse_volume_size("20EiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_volume_size("ten gigs")
            .unwrap_err()
            .contains("not a size"));
        assert!(parse_volume_size("10GB").unwrap_err().contains("ambiguous"));
    }

    #[test]
    fn thin_sizes() {
        assert_eq!(parse_grain("64KiB"), Ok(64));
        assert_eq!(parse_grain("32K"), Ok(32));
        assert_eq!(parse_grain("256KiB"), Ok(256));
        for bad in ["16KiB", "48KiB", "512KiB", "64", "1MiB"] {
            assert!(parse_grain(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_real_size("1GiB"), Ok(1 << 30));
        assert!(parse_real_size("0").is_err());
        let mib = 1u64 << 20;
        assert_eq!(default_real_size(100 << 30, 16 * mib), 2048 * mib);
        assert_eq!(default_real_size(512 * mib, 16 * mib), 16 * mib);
        assert_eq!(default_real_size(50 * mib + 1, mib), mib + 1);
    }

    #[test]
    fn extent_sizes() {
        assert_eq!(parse_extent_size("16MiB"), Ok(16));
        assert_eq!(parse_extent_size("1G"), Ok(1024));
        assert_eq!(parse_extent_size("8GiB"), Ok(8192));
        assert!(parse_extent_size("16")
            .unwrap_err()
            .contains("whole number of MiB"));
        assert!(parse_extent_size("0").unwrap_err().contains("between"));
        assert!(parse_extent_size("16GiB").unwrap_err().contains("between"));
        assert!(parse_extent_size("15EiB").unwrap_err().contains("between"));
    }

    proptest! {
        #[test]
        fn any_input_is_accepted_only_if_whole_sectors(s in "[0-9]{1,22}(\\.[0-9]{1,4})? ?([KMGTPE](iB)?|B)?") {
            if let Ok(bytes) = parse_volume_size(&s) {
                prop_assert!(bytes > 0 && bytes % SECTOR_BYTES == 0 && bytes <= VOLUME_BYTES_MAX);
            }
        }

        #[test]
        fn sector_multiples_are_accepted(n in 1u64..=(VOLUME_BYTES_MAX / SECTOR_BYTES)) {
            prop_assert_eq!(parse_volume_size(&(n * SECTOR_BYTES).to_string()), Ok(n * SECTOR_BYTES));
        }

        #[test]
        fn mib_counts_in_range_are_extent_sizes(m in EXTENT_SIZE_MIB_MIN..=EXTENT_SIZE_MIB_MAX) {
            prop_assert_eq!(parse_extent_size(&format!("{m}MiB")), Ok(m));
        }
    }
}
