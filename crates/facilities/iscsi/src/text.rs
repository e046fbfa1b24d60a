//! Text key=value pairs (RFC 7143 §6.1): NUL-terminated `key=value` strings
//! in login and text data segments. Pure, bounded parsing and encoding.

use crate::limits::{KEYS_MAX, KEY_BYTES_MAX, TEXT_BYTES_MAX, VALUE_BYTES_MAX};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text data longer than {TEXT_BYTES_MAX} bytes")]
    TooLong,
    #[error("more than {KEYS_MAX} keys")]
    TooManyKeys,
    #[error("a pair without '='")]
    NoEquals,
    #[error("key of {0} bytes (at most {KEY_BYTES_MAX}) or not valid")]
    BadKey(usize),
    #[error("value of key {0} longer than {VALUE_BYTES_MAX} bytes")]
    ValueTooLong(String),
    #[error("key {0} sent twice")]
    Duplicate(String),
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// Parsed pairs in the order sent. Keys are unique.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pairs(pub Vec<(String, String)>);

impl Pairs {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= KEY_BYTES_MAX
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
}

/// Parses a data segment of pairs. Trailing NULs and padding are ignored;
/// a last pair without its NUL is accepted (some initiators omit it).
pub fn parse(data: &[u8]) -> Result<Pairs, TextError> {
    if data.len() > TEXT_BYTES_MAX {
        return Err(TextError::TooLong);
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::NoEquals)?;
        if !key_ok(k) {
            return Err(TextError::BadKey(k.len()));
        }
        if v.len() > VALUE_BYTES_MAX {
            return Err(TextError::ValueTooLong(k.to_string()));
        }
        if out.iter().any(|(x, _)| x == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        if out.len() == KEYS_MAX {
            return Err(TextError::TooManyKeys);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(Pairs(out))
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes pairs (the inverse of [`parse`]).
pub fn encode(pairs: &Pairs) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs.iter() {
        push(&mut out, k, v);
    }
    out
}

/// `Yes`/`No` values.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// A numerical value (decimal, or hex with 0x; RFC 7143 §6.1) within
/// `[min, max]`.
pub fn parse_number(v: &str, min: u64, max: u64) -> Option<u64> {
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()?
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()?
    };
    (min..=max).contains(&n).then_some(n)
}

/// Binary values for CHAP: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn parse_binary(v: &str, max_bytes: usize) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 2 * max_bytes + 1 {
            return None;
        }
        // An odd count of digits has an implied leading zero.
        let mut out = Vec::with_capacity(h.len().div_ceil(2));
        let bytes = h.as_bytes();
        let (first, rest) = if bytes.len() % 2 == 1 {
            (Some(bytes[0]), &bytes[1..])
        } else {
            (None, bytes)
        };
        if let Some(d) = first {
            out.push(hex_digit(d)?);
        }
        for pair in rest.chunks(2) {
            out.push(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?);
        }
        return Some(out);
    }
    if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        if b.is_empty() || b.len() > (max_bytes.div_ceil(3) + 1) * 4 {
            return None;
        }
        let out = base64_decode(b)?;
        return (out.len() <= max_bytes && !out.is_empty()).then_some(out);
    }
    None
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `0x` followed by lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs_and_rejects_duplicates() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(p.get("InitiatorName"), Some("iqn.x"));
        assert_eq!(p.get("SessionType"), Some("Normal"));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate("A".into())));
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals));
        assert!(parse(b"=x\0").is_err());
        assert!(parse(&vec![b'a'; TEXT_BYTES_MAX + 1]).is_err());
        let long = format!("K={}\0", "v".repeat(VALUE_BYTES_MAX + 1));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
        // Missing final NUL is tolerated.
        assert_eq!(parse(b"A=1").unwrap().get("A"), Some("1"));
        // Empty values are values.
        assert_eq!(parse(b"A=\0").unwrap().get("A"), Some(""));
    }

    #[test]
    fn numbers_and_binary() {
        assert_eq!(parse_number("512", 512, 1 << 24), Some(512));
        assert_eq!(parse_number("511", 512, 1 << 24), None);
        assert_eq!(parse_number("0x200", 0, 1 << 24), Some(512));
        assert_eq!(parse_number("-1", 0, 10), None);
        assert_eq!(parse_number("", 0, 10), None);
        assert_eq!(parse_number("99999999999999999999999", 0, u64::MAX), None);
        assert_eq!(parse_binary("0x0aff", 16), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_binary("0xaff", 16), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_binary("0xzz", 16), None);
        assert_eq!(parse_binary("0bAQID", 16), Some(vec![1, 2, 3]));
        assert_eq!(parse_binary("AQID", 16), None);
        assert_eq!(parse_binary(&format!("0x{}", "00".repeat(17)), 16), None);
        assert_eq!(hex(&[0, 0xab]), "0x00ab");
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&data);
        }

        #[test]
        fn round_trip(keys in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9_.]{0,20}", "[ -~&&[^=]]{0,40}", 0..20)) {
            let pairs = Pairs(keys.into_iter().collect());
            let enc = encode(&pairs);
            prop_assert_eq!(parse(&enc).unwrap(), pairs);
        }

        #[test]
        fn binary_never_panics(s in "0[xXbB][ -~]{0,80}") {
            let _ = parse_binary(&s, 32);
        }

        #[test]
        fn hex_round_trip(bytes in proptest::collection::vec(any::<u8>(), 1..64)) {
            prop_assert_eq!(parse_binary(&hex(&bytes), 64), Some(bytes));
        }
    }
}
