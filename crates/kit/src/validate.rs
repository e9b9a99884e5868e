//! Checks on values clients send that end up in SIP messages or MI requests.
//!
//! A SIP URI given to us goes into a `From:`/`To:`/`Refer-To` header, so anything that could
//! break out of it (CR, LF, `<`, `>`, spaces, quotes) is refused here, at the edge.

/// Longest SIP URI accepted.
pub const MAX_URI_LEN: usize = 256;
/// Longest SIP Call-ID accepted.
pub const MAX_CALLID_LEN: usize = 255;

/// Checks a SIP URI (`sip:`, `sips:` or `tel:`), returning why it is refused.
pub fn sip_uri(uri: &str) -> Result<(), &'static str> {
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))
        .or_else(|| uri.strip_prefix("tel:"))
        .ok_or("must be a SIP URI starting with sip:, sips: or tel:")?;
    if uri.len() > MAX_URI_LEN {
        return Err("is too long (at most 256 characters)");
    }
    if rest.is_empty() {
        return Err("has nothing after the scheme");
    }
    if !uri
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"' | b'\\' | b'`'))
    {
        return Err("may hold only printable ASCII without spaces, quotes or angle brackets");
    }
    Ok(())
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
    fn callids_are_printable() {
        assert!(callid("431fc357.a3e3.49c2@127.0.0.1").is_ok());
        assert!(callid("").is_err());
        assert!(callid("a b").is_err());
        assert!(callid(&"x".repeat(256)).is_err());
    }
}
