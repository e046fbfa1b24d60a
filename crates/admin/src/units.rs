//! Byte sizes as administrators write and read them. Binary units only: a
//! storage administrator who types `10G` means 10 × 2^30 bytes, and decimal
//! `GB` is refused rather than guessed.

/// Binary unit suffixes, smallest first, with their size in bytes.
const UNITS: [(&str, u64); 7] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("EiB", 1 << 60),
];

/// More decimal places than this cannot name a whole number of bytes in any
/// unit up to EiB (2^60 has 60 factors of two, 10^d has d), and bounds the
/// arithmetic below to u128.
const FRACTION_DIGITS_MAX: usize = 18;
/// Integer digits accepted before overflow is certain (u64::MAX has 20).
const INTEGER_DIGITS_MAX: usize = 20;

// The worst case must fit u128: (10^20 + 1) × 2^60.
const _: () = assert!(INTEGER_DIGITS_MAX <= 20 && FRACTION_DIGITS_MAX <= 18);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size (examples: 4096, 512MiB, 10GiB, 1.5TiB)")]
    Empty,
    #[error("size '{0}' is negative")]
    Negative(String),
    #[error("'{input}' is not a size: {reason} (examples: 4096, 512MiB, 10GiB, 1.5TiB)")]
    Invalid { input: String, reason: String },
    #[error("size '{0}' is too large (at most 16 EiB minus one byte)")]
    Overflow(String),
}

fn invalid(input: &str, reason: impl Into<String>) -> SizeError {
    SizeError::Invalid {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Bytes per unit for a suffix, case-insensitively: none or `B`; `K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, `P`/`PiB`, `E`/`EiB`.
fn unit_bytes(input: &str, unit: &str) -> Result<u64, SizeError> {
    let u = unit.to_ascii_lowercase();
    let shift = match u.as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        "kb" | "mb" | "gb" | "tb" | "pb" | "eb" => {
            let binary = format!("{}iB", unit[..1].to_ascii_uppercase());
            return Err(invalid(
                input,
                format!("unit '{unit}' is ambiguous; write {binary} (sizes are binary)"),
            ));
        }
        _ => return Err(invalid(input, format!("unknown unit '{unit}'"))),
    };
    Ok(1u64 << shift)
}

/// Parses `4096`, `512MiB`, `10G`, `1.5 TiB`, ... into bytes. Refuses
/// negative sizes, unknown or decimal (`GB`) units, fractions that are not a
/// whole number of bytes and anything above `u64::MAX`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if s.starts_with('-') {
        return Err(SizeError::Negative(s.to_string()));
    }
    let number_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(number_len);
    let unit = unit.trim_start();
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    if int_part.is_empty() {
        return Err(invalid(s, "expected a number first"));
    }
    let int_digits = int_part.trim_start_matches('0');
    if int_digits.len() > INTEGER_DIGITS_MAX {
        return Err(SizeError::Overflow(s.to_string()));
    }
    let mult = u128::from(unit_bytes(s, unit)?);
    let int_value: u128 = if int_digits.is_empty() {
        0
    } else {
        int_digits
            .parse()
            .map_err(|_| invalid(s, "expected a number first"))?
    };
    let mut total = int_value * mult;
    if let Some(frac) = frac_part {
        if frac.is_empty() || frac.contains('.') {
            return Err(invalid(s, "malformed decimal number"));
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > FRACTION_DIGITS_MAX {
            return Err(invalid(s, "too many decimal places"));
        }
        if !frac.is_empty() {
            let frac_value: u128 = frac
                .parse()
                .map_err(|_| invalid(s, "malformed decimal number"))?;
            let scale = 10u128.pow(frac.len() as u32);
            let scaled = frac_value * mult;
            if !scaled.is_multiple_of(scale) {
                return Err(invalid(s, "not a whole number of bytes"));
            }
            total += scaled / scale;
        }
    }
    u64::try_from(total).map_err(|_| SizeError::Overflow(s.to_string()))
}

/// `bytes` in the largest binary unit it reaches, two decimals: `10.00 GiB`,
/// `1.50 MiB`; below 1 KiB exactly: `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut i = UNITS.iter().rposition(|&(_, u)| bytes >= u).unwrap_or(0);
    loop {
        let unit = u128::from(UNITS[i].1);
        let hundredths = (u128::from(bytes) * 100 + unit / 2) / unit;
        // Rounding may reach 1024.00 of this unit: show 1.00 of the next.
        if hundredths >= 1024 * 100 && i + 1 < UNITS.len() {
            i += 1;
            continue;
        }
        return format!(
            "{}.{:02} {}",
            hundredths / 100,
            hundredths % 100,
            UNITS[i].0
        );
    }
}

/// An extent size, exactly: `16 MiB`, `1 GiB`.
pub fn format_mib(mib: u32) -> String {
    if mib != 0 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units_and_fractions() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10gib"), Ok(10 << 30));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(" 1.5 GiB "), Ok(3 << 29));
        assert_eq!(parse_size("2.0K"), Ok(2048));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("15EiB"), Ok(15 << 60));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("0000000000000000000000001K"), Ok(1024));
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        assert!(matches!(parse_size("-1GiB"), Err(SizeError::Negative(_))));
        assert!(matches!(parse_size("16EiB"), Err(SizeError::Overflow(_))));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("999999999999999999999999T"),
            Err(SizeError::Overflow(_))
        ));
        for bad in [
            "abc",
            "GiB",
            "1.",
            ".5G",
            "1..5G",
            "1.2.3G",
            "10 GiBs",
            "1x",
            "1.1B",
            "0x10",
            "1e3",
            "1.0000000000000000001G",
        ] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid { .. })),
                "{bad}: {:?}",
                parse_size(bad)
            );
        }
        let e = parse_size("10GB").unwrap_err().to_string();
        assert!(e.contains("ambiguous") && e.contains("GiB"), "{e}");
        let e = parse_size("1.1B").unwrap_err().to_string();
        assert!(e.contains("whole number of bytes"), "{e}");
    }

    #[test]
    fn formats_in_the_largest_unit() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1024), "1.00 KiB");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(10 << 30), "10.00 GiB");
        assert_eq!(format_bytes((1 << 30) - 1), "1.00 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.00 EiB");
        assert_eq!(format_mib(16), "16 MiB");
        assert_eq!(format_mib(2048), "2 GiB");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn plain_numbers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }

        #[test]
        fn units_multiply(n in 0u64..1_000_000, i in 0usize..UNITS.len()) {
            let (name, unit) = UNITS[i];
            let expect = u128::from(n) * u128::from(unit);
            let got = parse_size(&format!("{n}{name}"));
            match u64::try_from(expect) {
                Ok(e) => prop_assert_eq!(got, Ok(e)),
                Err(_) => prop_assert!(matches!(got, Err(SizeError::Overflow(_)))),
            }
        }

        #[test]
        fn formatted_sizes_are_within_half_a_hundredth(n in 1024u64..=u64::MAX) {
            let text = format_bytes(n);
            let (number, unit_name) = text.split_once(' ').unwrap_or_default();
            let unit = UNITS.iter().find(|(name, _)| *name == unit_name).map_or(0, |u| u.1);
            prop_assert!(unit > 0, "{}", text);
            let hundredths: u128 = number.replace('.', "").parse().unwrap_or(0);
            let shown = hundredths * u128::from(unit);
            let exact = u128::from(n) * 100;
            prop_assert!(shown.abs_diff(exact) <= u128::from(unit) / 2 + 1, "{} {}", n, text);
        }
    }
}
