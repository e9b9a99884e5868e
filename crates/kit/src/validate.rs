//! Checks on values clients send that end up in SIP messages or MI requests.
//!
//! A SIP URI given to us goes into a `Request-URI`, `To:` or `Refer-To:`, so it is parsed with
//! the strict grammar of [`crate::sip_uri`]: only the parts call control needs (no URI headers,
//! no `maddr`, no password, one URI); anything that could break out of a header (CR, LF, `<`,
//! `>`, spaces, quotes) is refused too, here at the edge.

/// Longest SIP URI accepted.
pub const MAX_URI_LEN: usize = crate::sip_uri::MAX_URI_LEN;
/// Longest SIP Call-ID accepted.
pub const MAX_CALLID_LEN: usize = 255;

/// Checks a SIP URI (`sip:`, `sips:` or `tel:`, see [`crate::sip_uri`]), returning why it is
/// refused.
pub fn sip_uri(uri: &str) -> Result<(), &'static str> {
    crate::sip_uri::parse(uri)
        .map(|_| ())
        .map_err(crate::sip_uri::UriError::reason)
}

/// Checks a SIP Call-ID, returning why it is refused.
pub fn callid(callid: &str) -> Result<(), &'static str> {
    if callid.is_empty() {
        return Err("must not be empty");
    }
    if callid.len() > MAX_CALLID_LEN {
        return Err("is too long (at most 255 characters)");
    }
    if !callid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("may hold only printable ASCII without spaces");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_that_could_break_a_header_are_refused() {
        assert!(sip_uri("sip:alice@10.0.0.10").is_ok());
        assert!(sip_uri("sips:bob@example.com;transport=tls").is_ok());
        assert!(sip_uri("tel:+15551234").is_ok());
        assert!(sip_uri("alice@10.0.0.10").is_err());
        assert!(sip_uri("sip:").is_err());
        assert!(sip_uri("sip:a@b\r\nX-Evil: 1").is_err());
        assert!(sip_uri("sip:a@b>;x=<y").is_err());
        assert!(sip_uri(&format!("sip:{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn uris_that_could_redirect_or_hijack_a_call_are_refused() {
        for (uri, reason) in [
            (
                "sip:bob@127.0.0.1?Replaces=victim-callid%3Bto-tag%3D1%3Bfrom-tag%3D2",
                "headers",
            ),
            ("sip:bob@h?X-Evil=1", "headers"),
            ("sip:bob@h?Call-ID=forged", "headers"),
            ("sip:bob@h;maddr=10.6.6.6", "only the URI parameters"),
            ("sip:a@b,sip:evil@10.6.6.6", "one URI"),
            ("sip:bob:pw@h", "password"),
            ("sip:bob%00@h", "printable"),
        ] {
            let why = sip_uri(uri).expect_err(uri);
            assert!(why.contains(reason), "{uri}: {why}");
        }
        for uri in [
            "sip:+15551234@gw.example.com;user=phone",
            "sip:alice@[2001:db8::1]:5060",
            "sip:bob@h:5060;transport=TCP",
            "sip:al%20ice@h",
        ] {
            assert_eq!(sip_uri(uri), Ok(()), "{uri}");
        }
    }

    #[test]
    fn callids_are_printable() {
        assert!(callid("431fc357.a3e3.49c2@127.0.0.1").is_ok());
        assert!(callid("").is_err());
        assert!(callid("a b").is_err());
        assert!(callid(&"x".repeat(256)).is_err());
    }
}
