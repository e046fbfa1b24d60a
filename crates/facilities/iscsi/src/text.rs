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
    #[error("a continued text exchange interrupted by another one")]
    OtherExchange,
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

/// Text of one negotiation exchange split over several PDUs with the C
/// (continue) bit (RFC 7143 §11.10.2, §11.12.2): the pieces are joined
/// until a PDU without C ends the set of pairs. A pair may be cut anywhere,
/// even inside its key. At most [`TEXT_BYTES_MAX`] bytes in all.
#[derive(Debug, Clone, Default)]
pub struct Continued {
    buf: Vec<u8>,
    /// Initiator Task Tag of the exchange under way (text requests).
    itt: Option<u32>,
}

/// What one piece of text made of the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// More pieces follow (the C bit was set).
    More,
    /// The whole text of the exchange.
    Whole(Vec<u8>),
}

impl Continued {
    /// Takes the data segment of one PDU of exchange `itt`; `cont`: its C
    /// bit. On an error the exchange is forgotten (the next piece starts a
    /// new one).
    pub fn push(&mut self, itt: u32, cont: bool, data: &[u8]) -> Result<Piece, TextError> {
        if self.itt.is_some_and(|i| i != itt) {
            self.reset();
            return Err(TextError::OtherExchange);
        }
        if self.buf.len() + data.len() > TEXT_BYTES_MAX {
            self.reset();
            return Err(TextError::TooLong);
        }
        self.buf.extend_from_slice(data);
        if cont {
            self.itt = Some(itt);
            return Ok(Piece::More);
        }
        self.itt = None;
        Ok(Piece::Whole(std::mem::take(&mut self.buf)))
    }

    /// Is an exchange waiting for more pieces?
    pub fn pending(&self) -> bool {
        self.itt.is_some()
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Forgets the exchange under way.
    pub fn reset(&mut self) {
        self.buf = Vec::new();
        self.itt = None;
    }
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
    fn continued_text() {
        let mut c = Continued::default();
        assert_eq!(c.push(7, true, b"SendTar"), Ok(Piece::More));
        assert!(c.pending());
        // Another exchange in between: refused, and the first is gone.
        assert_eq!(c.push(8, false, b"X=1\0"), Err(TextError::OtherExchange));
        assert!(!c.pending() && c.is_empty());
        assert_eq!(c.push(7, true, b"SendTar"), Ok(Piece::More));
        assert_eq!(
            c.push(7, false, b"gets=All\0"),
            Ok(Piece::Whole(b"SendTargets=All\0".to_vec()))
        );
        // Exactly the bound is taken, one byte more is not.
        let half = vec![b'a'; TEXT_BYTES_MAX / 2];
        assert_eq!(c.push(1, true, &half), Ok(Piece::More));
        assert!(
            matches!(c.push(1, false, &half), Ok(Piece::Whole(w)) if w.len() == TEXT_BYTES_MAX)
        );
        assert_eq!(c.push(1, true, &half), Ok(Piece::More));
        assert_eq!(c.push(1, true, &half), Ok(Piece::More));
        assert_eq!(c.push(1, false, b"a"), Err(TextError::TooLong));
        assert!(!c.pending() && c.is_empty());
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

        /// Any split of a text over PDUs with the C bit gives back the
        /// whole text, which parses as if it had come in one PDU.
        #[test]
        fn continued_text_joins_any_split(
            keys in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9_.]{0,20}", "[ -~&&[^=]]{0,40}", 1..20),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
            itt in any::<u32>(),
        ) {
            let pairs = Pairs(keys.into_iter().collect());
            let enc = encode(&pairs);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(enc.len() + 1)).collect();
            at.push(0);
            at.push(enc.len());
            at.sort_unstable();
            let mut c = Continued::default();
            let pieces: Vec<&[u8]> = at.windows(2).map(|w| &enc[w[0]..w[1]]).collect();
            for (k, p) in pieces.iter().enumerate() {
                let last = k + 1 == pieces.len();
                match c.push(itt, !last, p).unwrap() {
                    Piece::More => prop_assert!(!last && c.pending()),
                    Piece::Whole(w) => {
                        prop_assert!(last && !c.pending());
                        prop_assert_eq!(parse(&w).unwrap(), pairs.clone());
                    }
                }
            }
        }

        /// Whatever arrives, the gathered text never exceeds the bound, and
        /// an exchange of more than the bound is refused.
        #[test]
        fn continued_text_is_bounded(
            steps in proptest::collection::vec((0u32..3, any::<bool>(), 0usize..(TEXT_BYTES_MAX / 3)), 0..12),
        ) {
            let mut c = Continued::default();
            let mut total = 0usize;
            let mut itt_now: Option<u32> = None;
            for (itt, cont, n) in steps {
                let r = c.push(itt, cont, &vec![b'a'; n]);
                prop_assert!(c.len() <= TEXT_BYTES_MAX);
                if itt_now.is_some_and(|i| i != itt) {
                    prop_assert_eq!(r, Err(TextError::OtherExchange));
                    prop_assert!(!c.pending() && c.is_empty());
                    total = 0;
                    itt_now = None;
                    continue;
                }
                total += n;
                if total > TEXT_BYTES_MAX {
                    prop_assert_eq!(r, Err(TextError::TooLong));
                    prop_assert!(!c.pending() && c.is_empty());
                    total = 0;
                    itt_now = None;
                } else if cont {
                    prop_assert_eq!(r, Ok(Piece::More));
                    itt_now = Some(itt);
                } else {
                    prop_assert_eq!(r, Ok(Piece::Whole(vec![b'a'; total])));
                    total = 0;
                    itt_now = None;
                }
            }
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
