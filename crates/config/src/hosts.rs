//! Checks for hosts: iSCSI names and CHAP settings. Pure functions, used by
//! `State::prepare` and `State::check_invariants`.

use crate::*;

fn bad_name(name: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidArgument {
        field: "initiator".into(),
        reason: format!("'{name}' is not an iSCSI name: {}", reason.into()),
    }
}

/// Checks an iSCSI name (RFC 3720 §3.2.6, RFC 7143 §4.2.7) in the form the
/// configuration stores it: lowercase ASCII (the stringprep profile of RFC
/// 3722 case-folds names, so `IQN.` and `iqn.` are the same name; the
/// configuration keeps the folded form and the iSCSI layer compares folded
/// names), at most 223 bytes, and one of
///
/// * `iqn.yyyy-mm.reversed.domain[:anything]`, the naming-authority part of
///   `[a-z0-9.-]` and the rest of `[a-z0-9.:-]`;
/// * `eui.` and 16 hex digits (EUI-64);
/// * `naa.` and 16 or 32 hex digits (NAA 64 or 128 bit, RFC 3980).
///
/// Non-ASCII names (allowed by the RFC after stringprep) are refused:
/// initiators do not use them and they would need the full nameprep tables.
pub fn check_iscsi_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(bad_name(name, "it is empty"));
    }
    if name.len() > ISCSI_NAME_BYTES_MAX {
        return Err(bad_name(
            name,
            format!(
                "it has {} bytes, at most {ISCSI_NAME_BYTES_MAX} are allowed",
                name.len()
            ),
        ));
    }
    if !name.is_ascii() {
        return Err(bad_name(name, "only ASCII names are supported"));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad_name(
            name,
            format!(
                "iSCSI names are case-insensitive and kept in lowercase; use '{}'",
                name.to_ascii_lowercase()
            ),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')))
    {
        return Err(bad_name(
            name,
            format!("character {c:?} not allowed; use letters, digits, '.', '-' and ':'"),
        ));
    }
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix("eui.") {
        if rest.len() != 16 || !hex(rest) {
            return Err(bad_name(
                name,
                "'eui.' is followed by exactly 16 hex digits",
            ));
        }
        return Ok(());
    }
    if let Some(rest) = name.strip_prefix("naa.") {
        if !(rest.len() == 16 || rest.len() == 32) || !hex(rest) {
            return Err(bad_name(
                name,
                "'naa.' is followed by exactly 16 or 32 hex digits",
            ));
        }
        return Ok(());
    }
    let Some(rest) = name.strip_prefix("iqn.") else {
        return Err(bad_name(
            name,
            "it must start with 'iqn.', 'eui.' or 'naa.'",
        ));
    };
    let date_ok = rest.len() > 8
        && rest.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[4] == b'-'
        && rest.as_bytes()[5..7].iter().all(u8::is_ascii_digit)
        && matches!(
            &rest[5..7],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
        && rest.as_bytes()[7] == b'.';
    if !date_ok {
        return Err(bad_name(
            name,
            "'iqn.' is followed by the year and month the naming authority owned its domain \
             (yyyy-mm) and a '.', as in iqn.2001-04.com.example:storage",
        ));
    }
    let authority = rest[8..].split(':').next().unwrap_or("");
    if authority.is_empty()
        || authority.starts_with(['.', '-'])
        || authority.ends_with(['.', '-'])
        || authority.contains("..")
    {
        return Err(bad_name(
            name,
            "the naming authority (a reversed domain name, as in com.example) is missing or \
             malformed",
        ));
    }
    Ok(())
}

fn check_chap_username(field: &str, username: &str) -> Result<(), ConfigError> {
    if username.is_empty() || username.len() > CHAP_USERNAME_BYTES_MAX {
        return Err(ConfigError::InvalidArgument {
            field: field.into(),
            reason: format!("CHAP user names have 1 to {CHAP_USERNAME_BYTES_MAX} bytes"),
        });
    }
    if !username.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::InvalidArgument {
            field: field.into(),
            reason: "CHAP user names are printable ASCII without spaces".into(),
        });
    }
    Ok(())
}

/// The secret itself never appears in the error.
fn check_chap_secret(field: &str, secret: &ChapSecret) -> Result<(), ConfigError> {
    let s = secret.expose();
    if !(CHAP_SECRET_BYTES_MIN..=CHAP_SECRET_BYTES_MAX).contains(&s.len()) {
        return Err(ConfigError::InvalidArgument {
            field: field.into(),
            reason: format!(
                "the secret has {} bytes; CHAP secrets have {CHAP_SECRET_BYTES_MIN} to \
                 {CHAP_SECRET_BYTES_MAX} bytes (the range common initiators accept)",
                s.len()
            ),
        });
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::InvalidArgument {
            field: field.into(),
            reason: "CHAP secrets are printable ASCII without spaces".into(),
        });
    }
    Ok(())
}

/// Checks CHAP settings: user names, secret lengths and characters, and
/// that the mutual secret differs from the initiator's (RFC 7143 §12.1.3:
/// a secret used in both directions lets an attacker reflect challenges).
pub fn check_chap(chap: &ChapSettings) -> Result<(), ConfigError> {
    check_chap_username("chap.username", &chap.username)?;
    check_chap_secret("chap.secret", &chap.secret)?;
    if let Some(m) = &chap.mutual {
        check_chap_username("chap.mutual.username", &m.username)?;
        check_chap_secret("chap.mutual.secret", &m.secret)?;
        if m.secret == chap.secret {
            return Err(ConfigError::InvalidArgument {
                field: "chap.mutual.secret".into(),
                reason: "the mutual secret must differ from the initiator's secret".into(),
            });
        }
    }
    Ok(())
}

/// Checks a portal address: `ip:port` with a port other than 0.
pub fn check_portal(portal: &IscsiPortal) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::InvalidArgument {
        field: "portal.listen".into(),
        reason,
    };
    let addr: std::net::SocketAddr = portal.listen.parse().map_err(|_| {
        bad(format!(
            "'{}' is not ip:port (for example 0.0.0.0:3260 or [::]:3260)",
            portal.listen
        ))
    })?;
    if addr.port() == 0 {
        return Err(bad("port 0 is not a listening port".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iscsi_names() {
        for good in [
            "iqn.2001-04.com.example",
            "iqn.2001-04.com.example:storage.disk2.sys1.xyz",
            "iqn.1994-05.com.redhat:4a3b2c1d0e",
            "iqn.1991-05.com.microsoft:host-1.example.com",
            "eui.02004567a425678d",
            "naa.52004567ba64678d",
            "naa.62004567ba64678d0123456789abcdef",
        ] {
            check_iscsi_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let long = format!("iqn.2001-04.com.example:{}", "a".repeat(200));
        for (bad, why) in [
            ("", "empty"),
            ("IQN.2001-04.com.example", "lowercase"),
            ("eui.02004567A425678D", "use 'eui.02004567a425678d'"),
            ("iqn.2001-4.com.example", "yyyy-mm"),
            ("iqn.2001-13.com.example", "yyyy-mm"),
            ("iqn.2001-04", "yyyy-mm"),
            ("iqn.2001-04.", "yyyy-mm"),
            ("iqn.2001-04..com", "naming authority"),
            ("iqn.2001-04.:x", "naming authority"),
            ("iqn.2001-04.com example", "not allowed"),
            ("iqn.2001-04.com_example", "not allowed"),
            ("eui.0200", "16 hex"),
            ("eui.02004567a425678g", "16 hex"),
            ("naa.0123", "16 or 32"),
            ("host1", "start with"),
            ("iqn.2001-04.com.exämple", "ASCII"),
            (long.as_str(), "223"),
        ] {
            let e = check_iscsi_name(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let max = format!("iqn.2001-04.com.example:{}", "a".repeat(223 - 24));
        assert_eq!(max.len(), 223);
        check_iscsi_name(&max).unwrap();
    }

    fn chap(user: &str, secret: &str, mutual: Option<(&str, &str)>) -> ChapSettings {
        ChapSettings {
            username: user.into(),
            secret: ChapSecret(secret.into()),
            mutual: mutual.map(|(u, s)| ChapMutual {
                username: u.into(),
                secret: ChapSecret(s.into()),
            }),
        }
    }

    #[test]
    fn chap_settings() {
        check_chap(&chap("u", "0123456789ab", None)).unwrap();
        check_chap(&chap(
            "u",
            "0123456789abcdef",
            Some(("t", "fedcba9876543210")),
        ))
        .unwrap();
        for (c, why) in [
            (chap("", "0123456789ab", None), "user names"),
            (chap("a b", "0123456789ab", None), "printable"),
            (chap("u", "0123456789a", None), "11 bytes"),
            (chap("u", "0123456789abcdefg", None), "17 bytes"),
            (chap("u", "0123456789a\n", None), "printable"),
            (
                chap("u", "0123456789ab", Some(("t", "0123456789ab"))),
                "differ",
            ),
            (chap("u", "0123456789ab", Some(("t", "short"))), "5 bytes"),
        ] {
            let e = check_chap(&c).expect_err(why).to_string();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("0123456789"), "secret in the error: {e}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = chap("u", "0123456789ab", Some(("t", "fedcba9876543210")));
        let cmd = Command::SetHostChap {
            host: "h".into(),
            chap: Some(c),
        };
        let d = format!("{cmd:?} {cmd:#?}");
        assert!(!d.contains("0123456789ab") && !d.contains("fedcba"), "{d}");
        assert!(d.contains("<secret>"));
        // The journal form does carry it.
        assert!(serde_json::to_string(&cmd)
            .unwrap()
            .contains("0123456789ab"));
    }

    #[test]
    fn portals() {
        for good in ["0.0.0.0:3260", "[::]:3260", "192.168.1.10:3261"] {
            check_portal(&IscsiPortal {
                listen: good.into(),
                enabled: true,
            })
            .unwrap();
        }
        for bad in ["", "0.0.0.0", "host:3260", "0.0.0.0:0", "::1:3260"] {
            assert!(check_portal(&IscsiPortal {
                listen: bad.into(),
                enabled: true,
            })
            .is_err());
        }
    }
}
