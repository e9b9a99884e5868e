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

/// Whether `uri` is a `sip:` or `sips:` URI (not `tel:`): one OpenSIPS can send a request to.
pub fn is_sip_scheme(uri: &str) -> bool {
    uri.starts_with("sip:") || uri.starts_with("sips:")
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

/// Checks a CallStart's options (PortSIP's limits and what SIP headers can carry): the
/// reason starts with the field's name.
pub fn call_options(options: &callapi_proto::v1::CallOptions) -> Result<(), String> {
    let text = |field: &str, value: &str, max: usize| {
        if value.chars().count() > max {
            return Some(format!("{field} must be at most {max} characters"));
        }
        value
            .chars()
            .any(char::is_control)
            .then(|| format!("{field} must not contain control characters"))
    };
    let user = |field: &str, value: &str| {
        (!value.is_empty()
            && (value.len() > 16
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+*._-".contains(&b))))
        .then(|| format!("{field} must be 1 to 16 of 0-9 A-Z a-z + * . _ -"))
    };
    let token = |field: &str, value: &str| {
        (!value.is_empty()
            && (value.len() > 128
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))))
        .then(|| format!("{field} must be at most 128 of 0-9 A-Z a-z : . _ -"))
    };
    // Where OpenSIPS sends a request (`$du`): a sip: or sips: URI, at most 128 characters.
    let uri = |field: &str, value: &str| {
        (!value.is_empty()
            && (value.len() > 128 || !is_sip_scheme(value) || sip_uri(value).is_err()))
        .then(|| format!("{field} must be a sip: or sips: URI of at most 128 characters"))
    };
    let refused = text("caller_display_name", &options.caller_display_name, 1024)
        .or_else(|| text("user_data", &options.user_data, 128))
        .or_else(|| user("rewrite_from", &options.rewrite_from))
        .or_else(|| user("rewrite_pai", &options.rewrite_pai))
        .or_else(|| user("rewrite_rpi", &options.rewrite_rpi))
        .or_else(|| token("target_instance_id", &options.target_instance_id))
        .or_else(|| {
            let number = &options.target_extension_number;
            (!number.is_empty()
                && (number.len() > 128 || !number.bytes().all(|b| b.is_ascii_digit())))
            .then(|| "target_extension_number must be 1 to 128 digits".to_owned())
        })
        .or_else(|| uri("target", &options.target))
        .or_else(|| {
            options
                .trunk
                .as_ref()
                .and_then(|t| uri("trunk", &t.uri).or_else(|| text("trunk", &t.name, 64)))
        });
    refused.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use callapi_proto::v1 as pb;

    #[test]
    fn call_options_checks_name_the_field() {
        let bad = |options: pb::CallOptions, field: &str| {
            let why = call_options(&options).expect_err("refused");
            assert!(why.starts_with(field), "{why}");
        };
        assert_eq!(call_options(&pb::CallOptions::default()), Ok(()));
        bad(
            pb::CallOptions {
                user_data: "a\r\nVia: x".into(),
                ..Default::default()
            },
            "user_data",
        );
        bad(
            pb::CallOptions {
                caller_display_name: "x".repeat(1025),
                ..Default::default()
            },
            "caller_display_name",
        );
        let trunk = Some(pb::Trunk {
            name: "t".into(),
            uri: "sip:10.0.0.5".into(),
        });
        bad(
            pb::CallOptions {
                rewrite_from: "49 30".into(),
                trunk,
                ..Default::default()
            },
            "rewrite_from",
        );
        bad(
            pb::CallOptions {
                target: "not a uri".into(),
                ..Default::default()
            },
            "target",
        );
        bad(
            pb::CallOptions {
                target_instance_id: "<urn:uuid:1>".into(),
                ..Default::default()
            },
            "target_instance_id",
        );
        bad(
            pb::CallOptions {
                target_extension_number: "10 3".into(),
                ..Default::default()
            },
            "target_extension_number",
        );
        bad(
            pb::CallOptions {
                target: "tel:+4930123".into(),
                ..Default::default()
            },
            "target",
        );
        bad(
            pb::CallOptions {
                rewrite_from: "#31".into(),
                ..Default::default()
            },
            "rewrite_from",
        );
        bad(
            pb::CallOptions {
                target: format!("sip:{}@h", "1".repeat(124)),
                ..Default::default()
            },
            "target",
        );
    }

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
