//! A strict parser of the SIP, SIPS and tel URIs a call-control client may name.
//!
//! Client URIs go, unchanged, into OpenSIPS MI commands (`t_uac_dlg`, `call_transfer`) and from
//! there into `Request-URI`, `To` and `Refer-To`. Whatever a URI can carry besides an address is
//! a way to make OpenSIPS send something the client should not decide: URI headers
//! (`?Replaces=…` hijacks another call, `?Call-ID=…` forges one), `maddr` (sends the request
//! elsewhere), a second URI after a comma. So this accepts exactly the subset of RFC 3261 §25 /
//! RFC 3966 that call control needs, and refuses everything else with a reason:
//!
//! - `sip:` / `sips:` (lower case): optional user, `@`, host (host name, IPv4 address or
//!   `[IPv6]`), optional `:port` (1–65535), then only these URI parameters, each at most once,
//!   names and values case-insensitive: `transport` = `udp` | `tcp` | `tls` | `sctp` | `ws` |
//!   `wss`, `user` = `phone` | `ip`.
//! - The user: letters, digits, `-_.!~*'()&=+$` and %-escapes of printable ASCII (space
//!   included); no password (`user:pw@`), no `;`, `?`, `/` or `,`.
//! - `tel:` a global number (`+` then digits and `-.()` separators) or a local number (hex
//!   digits, `*`, `#` and separators) with its required `;phone-context=` (a domain name or a
//!   `+number`); no other parameter.
//! - Never headers (`?…`), never a comma, only printable ASCII, at most [`MAX_URI_LEN`] bytes.
//!
//! No crate was a fit: the maintained SIP crates parse leniently (any parameter, any header) and
//! would need this allow-list on top anyway; this is a small hand-written parser of exactly the
//! allowed subset, which also never panics on any input.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest URI accepted, in bytes.
pub const MAX_URI_LEN: usize = 512;

/// Why a URI is refused. [`UriError::reason`] reads as the rest of a sentence after the field
/// name ("callee must not carry headers …").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum UriError {
    /// Not `sip:`, `sips:` or `tel:`.
    Scheme,
    /// Over [`MAX_URI_LEN`].
    TooLong,
    /// Nothing after the scheme.
    Empty,
    /// A byte that is not printable ASCII (space, CR, LF, non-ASCII…).
    NotPrintable,
    /// URI headers (`?…`).
    Headers,
    /// A comma: a list of URIs, or a comma where none may be.
    List,
    /// A password in the user information.
    Password,
    /// A character the user part may not hold.
    BadUser,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// A %-escape that decodes to a control or non-ASCII byte.
    ControlEscape,
    /// No host.
    NoHost,
    /// A host that is not a host name, an IPv4 address or a bracketed IPv6 address.
    BadHost,
    /// A port that is not 1 to 65535.
    BadPort,
    /// An empty or malformed parameter (`;;`, `;=x`).
    BadParam,
    /// A SIP URI parameter not on the allow-list (`maddr`, `method`, `lr`, …).
    ParamNotAllowed,
    /// A `transport` not on the list.
    BadTransport,
    /// A `user` parameter other than `phone` or `ip`.
    BadUserParam,
    /// The same parameter twice.
    RepeatedParam,
    /// A tel number that is not a global or local number.
    BadNumber,
    /// A tel parameter other than `phone-context`.
    TelParamNotAllowed,
    /// A `phone-context` that is not a domain name or a `+number`.
    BadContext,
    /// A `phone-context` on a global number.
    GlobalWithContext,
    /// A local number without `phone-context`.
    NoContext,
}

impl UriError {
    /// Why the URI is refused, to follow the field name.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Scheme => "must be a SIP URI starting with sip:, sips: or tel:",
            Self::TooLong => "is too long (at most 512 characters)",
            Self::Empty => "has nothing after the scheme",
            Self::NotPrintable => "may hold only printable ASCII without spaces",
            Self::Headers => "must not carry URI headers (a ?… part)",
            Self::List => "must be one URI (no commas)",
            Self::Password => "must not hold a password",
            Self::BadUser => {
                "has a bad user part (letters, digits, -_.!~*'()&=+$ and %-escapes allowed)"
            }
            Self::BadEscape => "has a malformed %-escape",
            Self::ControlEscape => "has a %-escape that is not a printable ASCII character",
            Self::NoHost => "has no host",
            Self::BadHost => "has a bad host (a host name, an IPv4 address or an [IPv6] address)",
            Self::BadPort => "has a bad port (1 to 65535)",
            Self::BadParam => "has an empty or malformed URI parameter",
            Self::ParamNotAllowed => "may carry only the URI parameters transport and user",
            Self::BadTransport => "has a bad transport (udp, tcp, tls, sctp, ws or wss)",
            Self::BadUserParam => "has a bad user parameter (phone or ip)",
            Self::RepeatedParam => "repeats a URI parameter",
            Self::BadNumber => "has a bad telephone number",
            Self::TelParamNotAllowed => "may carry only the tel parameter phone-context",
            Self::BadContext => "has a bad phone-context (a domain name or a +number)",
            Self::GlobalWithContext => "has a phone-context on a global (+) number",
            Self::NoContext => "has a local number without phone-context",
        }
    }
}

/// `sip:` or `sips:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SipScheme {
    /// `sip:`
    Sip,
    /// `sips:`
    Sips,
}

/// The `transport` URI parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `udp`
    Udp,
    /// `tcp`
    Tcp,
    /// `tls`
    Tls,
    /// `sctp`
    Sctp,
    /// `ws`
    Ws,
    /// `wss`
    Wss,
}

/// The `user` URI parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserParam {
    /// `user=phone`: the user part is a telephone number.
    Phone,
    /// `user=ip`
    Ip,
}

/// The host of a SIP URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// A host name, as written.
    Name(&'a str),
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// An IPv6 address (written in brackets).
    V6(Ipv6Addr),
}

/// A SIP or SIPS URI that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipUri<'a> {
    /// `sip` or `sips`.
    pub scheme: SipScheme,
    /// The user part as written (%-escapes kept), if any.
    pub user: Option<&'a str>,
    /// The host.
    pub host: Host<'a>,
    /// The port, if given.
    pub port: Option<u16>,
    /// The `transport` parameter, if given.
    pub transport: Option<Transport>,
    /// The `user` parameter, if given.
    pub user_param: Option<UserParam>,
}

/// A tel URI that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelUri<'a> {
    /// The number as written (with its `+` if global).
    pub number: &'a str,
    /// Whether it is a global (`+…`) number.
    pub global: bool,
    /// The `phone-context` of a local number.
    pub phone_context: Option<&'a str>,
}

/// A URI that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uri<'a> {
    /// `sip:` or `sips:`.
    Sip(SipUri<'a>),
    /// `tel:`.
    Tel(TelUri<'a>),
}

/// Parses and checks `text` as a URI a client may name.
pub fn parse(text: &str) -> Result<Uri<'_>, UriError> {
    if text.len() > MAX_URI_LEN {
        return Err(UriError::TooLong);
    }
    let (scheme, rest) = if let Some(rest) = text.strip_prefix("sip:") {
        (Some(SipScheme::Sip), rest)
    } else if let Some(rest) = text.strip_prefix("sips:") {
        (Some(SipScheme::Sips), rest)
    } else if let Some(rest) = text.strip_prefix("tel:") {
        (None, rest)
    } else {
        return Err(UriError::Scheme);
    };
    if rest.is_empty() {
        return Err(UriError::Empty);
    }
    // From here on every byte is printable ASCII, so byte offsets are char boundaries.
    if !rest.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UriError::NotPrintable);
    }
    if rest.contains('?') {
        return Err(UriError::Headers);
    }
    if rest.contains(',') {
        return Err(UriError::List);
    }
    match scheme {
        Some(scheme) => parse_sip(scheme, rest).map(Uri::Sip),
        None => parse_tel(rest).map(Uri::Tel),
    }
}

fn parse_sip(scheme: SipScheme, rest: &str) -> Result<SipUri<'_>, UriError> {
    let (user, hostpart) = match rest.split_once('@') {
        Some((userinfo, hostpart)) => {
            if userinfo.contains(':') {
                return Err(UriError::Password);
            }
            check_user(userinfo)?;
            (Some(userinfo), hostpart)
        }
        None => (None, rest),
    };
    if hostpart.is_empty() {
        return Err(UriError::NoHost);
    }
    if hostpart.contains('@') {
        return Err(UriError::BadHost);
    }
    let (host, after_host) = parse_host(hostpart)?;
    let (port, params) = match after_host.strip_prefix(':') {
        Some(port_and_more) => {
            let end = port_and_more.find(';').unwrap_or(port_and_more.len());
            (
                Some(parse_port(&port_and_more[..end])?),
                &port_and_more[end..],
            )
        }
        None => (None, after_host),
    };
    let mut uri = SipUri {
        scheme,
        user,
        host,
        port,
        transport: None,
        user_param: None,
    };
    if params.is_empty() {
        return Ok(uri);
    }
    let Some(params) = params.strip_prefix(';') else {
        return Err(UriError::BadHost);
    };
    for param in params.split(';') {
        let (name, value) = split_param(param)?;
        if name.eq_ignore_ascii_case("transport") {
            let transport = match value.map(str::to_ascii_lowercase).as_deref() {
                Some("udp") => Transport::Udp,
                Some("tcp") => Transport::Tcp,
                Some("tls") => Transport::Tls,
                Some("sctp") => Transport::Sctp,
                Some("ws") => Transport::Ws,
                Some("wss") => Transport::Wss,
                _ => return Err(UriError::BadTransport),
            };
            if uri.transport.replace(transport).is_some() {
                return Err(UriError::RepeatedParam);
            }
        } else if name.eq_ignore_ascii_case("user") {
            let user_param = match value.map(str::to_ascii_lowercase).as_deref() {
                Some("phone") => UserParam::Phone,
                Some("ip") => UserParam::Ip,
                _ => return Err(UriError::BadUserParam),
            };
            if uri.user_param.replace(user_param).is_some() {
                return Err(UriError::RepeatedParam);
            }
        } else {
            return Err(UriError::ParamNotAllowed);
        }
    }
    Ok(uri)
}

/// `name` or `name=value`, each a non-empty token.
fn split_param(param: &str) -> Result<(&str, Option<&str>), UriError> {
    let (name, value) = match param.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (param, None),
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.!~*'+".contains(&b))
    };
    if !token(name) || value.is_some_and(|v| !token(v)) {
        return Err(UriError::BadParam);
    }
    Ok((name, value))
}

/// The user part: unreserved characters, `&=+$` and escapes of printable ASCII.
fn check_user(user: &str) -> Result<(), UriError> {
    if user.is_empty() {
        return Err(UriError::BadUser);
    }
    let bytes = user.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let decoded = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .filter(|hex| hex.bytes().all(|h| h.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or(UriError::BadEscape)?;
            if !(0x20..=0x7e).contains(&decoded) {
                return Err(UriError::ControlEscape);
            }
            i += 3;
        } else if b.is_ascii_alphanumeric() || b"-_.!~*'()&=+$".contains(&b) {
            i += 1;
        } else {
            return Err(UriError::BadUser);
        }
    }
    Ok(())
}

/// The host at the start of `text`, and what follows it.
fn parse_host(text: &str) -> Result<(Host<'_>, &str), UriError> {
    if let Some(inner) = text.strip_prefix('[') {
        let (address, rest) = inner.split_once(']').ok_or(UriError::BadHost)?;
        let address: Ipv6Addr = address.parse().map_err(|_| UriError::BadHost)?;
        return Ok((Host::V6(address), rest));
    }
    let end = text.find([':', ';']).unwrap_or(text.len());
    let (host, rest) = text.split_at(end);
    if host.is_empty() {
        return Err(UriError::NoHost);
    }
    let last_label = host.strip_suffix('.').unwrap_or(host).rsplit('.').next();
    // A host name's last label starts with a letter; anything else must be an IPv4 address.
    if last_label.is_some_and(|l| l.starts_with(|c: char| c.is_ascii_digit())) {
        let address: Ipv4Addr = host.parse().map_err(|_| UriError::BadHost)?;
        return Ok((Host::V4(address), rest));
    }
    if is_hostname(host) {
        Ok((Host::Name(host), rest))
    } else {
        Err(UriError::BadHost)
    }
}

/// RFC 3261 `hostname`: dot-separated labels of letters, digits and inner hyphens, the last one
/// starting with a letter; an optional final dot.
fn is_hostname(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let mut labels = name.split('.').peekable();
    while let Some(label) = labels.next() {
        let bytes = label.as_bytes();
        let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
            return false;
        };
        let ok = bytes.len() <= 63
            && first.is_ascii_alphanumeric()
            && last.is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        let top_ok = labels.peek().is_some() || first.is_ascii_alphabetic();
        if !ok || !top_ok {
            return false;
        }
    }
    true
}

fn parse_port(text: &str) -> Result<u16, UriError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UriError::BadPort);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(UriError::BadPort),
        Ok(port) => Ok(port),
    }
}

fn parse_tel(rest: &str) -> Result<TelUri<'_>, UriError> {
    let (number, params) = match rest.split_once(';') {
        Some((number, params)) => (number, Some(params)),
        None => (rest, None),
    };
    let global = number.starts_with('+');
    let valid = if global {
        is_global_number(number)
    } else {
        number
            .bytes()
            .any(|b| b.is_ascii_hexdigit() || b == b'*' || b == b'#')
            && number
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b"*#-.()".contains(&b))
    };
    if !valid {
        return Err(UriError::BadNumber);
    }
    let mut phone_context = None;
    for param in params.into_iter().flat_map(|p| p.split(';')) {
        let (name, value) = split_param(param)?;
        if !name.eq_ignore_ascii_case("phone-context") {
            return Err(UriError::TelParamNotAllowed);
        }
        let value = value.ok_or(UriError::BadContext)?;
        let value_ok = if value.starts_with('+') {
            is_global_number(value)
        } else {
            is_hostname(value)
        };
        if !value_ok {
            return Err(UriError::BadContext);
        }
        if phone_context.replace(value).is_some() {
            return Err(UriError::RepeatedParam);
        }
    }
    match (global, phone_context) {
        (true, Some(_)) => Err(UriError::GlobalWithContext),
        (false, None) => Err(UriError::NoContext),
        _ => Ok(TelUri {
            number,
            global,
            phone_context,
        }),
    }
}

/// RFC 3966 `global-number-digits`: `+`, then digits and `-.()` separators, one digit at least.
fn is_global_number(text: &str) -> bool {
    text.strip_prefix('+').is_some_and(|digits| {
        digits.bytes().any(|b| b.is_ascii_digit())
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || b"-.()".contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[&str] = &[
        "sip:alice@10.0.0.10",
        "sips:bob@example.com;transport=tls",
        "tel:+15551234",
        "tel:+1-555-123-4567",
        "tel:7042;phone-context=example.com",
        "tel:*21#;phone-context=+1555",
        "sip:+15551234@gw.example.com;user=phone",
        "sip:alice@[2001:db8::1]:5060",
        "sip:bob@h:5060;transport=TCP",
        "sip:al%20ice@h",
        "sip:bob@127.0.0.1:5072",
        "sip:10.0.0.1",
        "sip:gw.example.com.",
        "sip:a.b-c_d!~*'()&=+$@host-1.example.org;user=ip;transport=wss",
        "sip:alice@EXAMPLE.COM;Transport=Udp",
        "sip:%41lice@h;transport=sctp",
        "sip:bob@h:65535;transport=ws",
    ];

    const INVALID: &[(&str, UriError)] = &[
        (
            "sip:bob@127.0.0.1?Replaces=victim-callid%3Bto-tag%3D1%3Bfrom-tag%3D2",
            UriError::Headers,
        ),
        ("sip:bob@h?X-Evil=1", UriError::Headers),
        ("sip:bob@h?Call-ID=forged", UriError::Headers),
        ("sip:bob@h;maddr=10.6.6.6", UriError::ParamNotAllowed),
        ("sip:a@b,sip:evil@10.6.6.6", UriError::List),
        ("sip:bob:secret@h", UriError::Password),
        ("sip:bob:@h", UriError::Password),
        ("sip:bob;maddr=10.6.6.6@h", UriError::BadUser),
        ("sip:al%00ice@h", UriError::ControlEscape),
        ("sip:al%0d%0aice@h", UriError::ControlEscape),
        ("sip:al%7Fice@h", UriError::ControlEscape),
        ("sip:al%C3%A9@h", UriError::ControlEscape),
        ("sip:al%zzice@h", UriError::BadEscape),
        ("sip:al%2@h", UriError::BadEscape),
        ("sip:al%@h", UriError::BadEscape),
        ("sip:al%+1@h", UriError::BadEscape),
        ("sip:bob@h;transport=carrier-pigeon", UriError::BadTransport),
        ("sip:bob@h;transport", UriError::BadTransport),
        ("sip:bob@h;user=dialstring", UriError::BadUserParam),
        (
            "sip:bob@h;transport=udp;transport=tcp",
            UriError::RepeatedParam,
        ),
        ("sip:bob@h;lr", UriError::ParamNotAllowed),
        ("sip:bob@h;method=INVITE", UriError::ParamNotAllowed),
        ("sip:bob@h;ttl=1", UriError::ParamNotAllowed),
        ("sip:bob@h;", UriError::BadParam),
        ("sip:bob@h;;transport=udp", UriError::BadParam),
        ("sip:bob@h;=udp", UriError::BadParam),
        ("sip:bob@h:0", UriError::BadPort),
        ("sip:bob@h:65536", UriError::BadPort),
        ("sip:bob@h:50a", UriError::BadPort),
        ("sip:bob@h:", UriError::BadPort),
        ("sip:bob@h:-1", UriError::BadPort),
        ("sip:bob@", UriError::NoHost),
        ("sip:@h", UriError::BadUser),
        ("sip:bob@h@evil", UriError::BadHost),
        ("sip:bob@1.2.3.999", UriError::BadHost),
        ("sip:bob@1.2.3", UriError::BadHost),
        ("sip:bob@-h.example.com", UriError::BadHost),
        ("sip:bob@h_x.example.com", UriError::BadHost),
        ("sip:bob@h..example.com", UriError::BadHost),
        ("sip:bob@[2001:db8::1", UriError::BadHost),
        ("sip:bob@[2001:db8::1%25eth0]", UriError::BadHost),
        ("sip:bob@[not-v6]", UriError::BadHost),
        ("sip:bob@[::1]x", UriError::BadHost),
        ("sip:bob@h/x", UriError::BadHost),
        ("sip:bob@h>;x=<y", UriError::BadHost),
        ("sip:a\"b@h", UriError::BadUser),
        ("sip:a<b@h", UriError::BadUser),
        ("sip:a/b@h", UriError::BadUser),
        ("sip:a@b\r\nX-Evil: 1", UriError::NotPrintable),
        ("sip:a b@h", UriError::NotPrintable),
        ("sip:alicé@h", UriError::NotPrintable),
        ("sip:", UriError::Empty),
        ("alice@10.0.0.10", UriError::Scheme),
        ("SIP:alice@h", UriError::Scheme),
        ("http://h/", UriError::Scheme),
        ("", UriError::Scheme),
        ("tel:", UriError::Empty),
        ("tel:+", UriError::BadNumber),
        ("tel:+1555x", UriError::BadNumber),
        ("tel:+1555@h", UriError::BadNumber),
        ("tel:1234", UriError::NoContext),
        (
            "tel:+1555;phone-context=example.com",
            UriError::GlobalWithContext,
        ),
        ("tel:1234;phone-context=", UriError::BadParam),
        ("tel:1234;phone-context=-bad-", UriError::BadContext),
        ("tel:1234;phone-context", UriError::BadContext),
        ("tel:+1555;ext=12", UriError::TelParamNotAllowed),
        ("tel:+1555;isub=12", UriError::TelParamNotAllowed),
        (
            "tel:1234;phone-context=a.com;phone-context=b.com",
            UriError::RepeatedParam,
        ),
        ("tel:+1555?x=1", UriError::Headers),
    ];

    #[test]
    fn the_uris_a_client_needs_are_accepted() {
        for uri in VALID {
            assert!(parse(uri).is_ok(), "{uri}: {:?}", parse(uri));
        }
        assert!(parse(&format!("sip:{}@h", "a".repeat(500))).is_ok());
    }

    #[test]
    fn parsed_parts_are_right() {
        assert_eq!(
            parse("sip:alice@[2001:db8::1]:5060").unwrap(),
            Uri::Sip(SipUri {
                scheme: SipScheme::Sip,
                user: Some("alice"),
                host: Host::V6("2001:db8::1".parse().unwrap()),
                port: Some(5060),
                transport: None,
                user_param: None,
            })
        );
        assert_eq!(
            parse("sips:+1555@gw.example.com;user=phone;transport=TLS").unwrap(),
            Uri::Sip(SipUri {
                scheme: SipScheme::Sips,
                user: Some("+1555"),
                host: Host::Name("gw.example.com"),
                port: None,
                transport: Some(Transport::Tls),
                user_param: Some(UserParam::Phone),
            })
        );
        assert_eq!(
            parse("sip:10.0.0.10").unwrap(),
            Uri::Sip(SipUri {
                scheme: SipScheme::Sip,
                user: None,
                host: Host::V4(Ipv4Addr::new(10, 0, 0, 10)),
                port: None,
                transport: None,
                user_param: None,
            })
        );
        assert_eq!(
            parse("tel:7042;phone-context=example.com").unwrap(),
            Uri::Tel(TelUri {
                number: "7042",
                global: false,
                phone_context: Some("example.com"),
            })
        );
    }

    #[test]
    fn everything_else_is_refused_with_its_reason() {
        for (uri, why) in INVALID {
            assert_eq!(parse(uri), Err(*why), "{uri}");
        }
        assert_eq!(
            parse(&format!("sip:{}@h", "a".repeat(600))),
            Err(UriError::TooLong)
        );
        assert_eq!(
            parse(&format!("sip:bob@{}.com", "a".repeat(64))),
            Err(UriError::BadHost)
        );
    }

    /// No input panics, and whatever is accepted holds nothing the allow-list leaves out.
    #[test]
    fn no_input_panics_and_nothing_unsafe_gets_through() {
        let mut samples: Vec<String> = VALID.iter().map(|s| s.to_string()).collect();
        samples.extend(INVALID.iter().map(|(s, _)| s.to_string()));
        let inserts = [
            "%", "%0", "%00", "%41", "@", ":", ";", "?", "[", "]", ",", "=", "\0", "\r\n", " ",
            "é", "<", "\"", "sip:", ";maddr=x", "?X=1", "+", ".", "-", "::", "999999",
        ];
        let mut checked = 0usize;
        let mut check = |candidate: &str| {
            checked += 1;
            if let Ok(uri) = parse(candidate) {
                assert!(candidate.len() <= MAX_URI_LEN, "{candidate}");
                assert!(
                    candidate.bytes().all(|b| b.is_ascii_graphic()),
                    "{candidate:?}"
                );
                for bad in ["?", ",", ";maddr", "%00", "%0d", "%0a", "%0D", "%0A"] {
                    assert!(!candidate.contains(bad), "{candidate} accepted: {uri:?}");
                }
                if let Uri::Sip(sip) = uri {
                    assert!(!sip.user.is_some_and(|u| u.contains(':')), "{candidate}");
                }
            }
        };
        for sample in &samples {
            let boundaries: Vec<usize> = (0..=sample.len())
                .filter(|&i| sample.is_char_boundary(i))
                .collect();
            for &end in &boundaries {
                check(&sample[..end]);
                check(&sample[end..]);
                for insert in inserts {
                    check(&format!("{}{insert}{}", &sample[..end], &sample[end..]));
                }
            }
            for window in boundaries.windows(2) {
                let (start, end) = (window[0], window[1]);
                check(&format!("{}{}", &sample[..start], &sample[end..]));
                for insert in inserts {
                    check(&format!("{}{insert}{}", &sample[..start], &sample[end..]));
                }
            }
        }
        check(&"%".repeat(300));
        check(&format!("sip:{}", "[".repeat(200)));
        check(&format!("tel:{}", ";".repeat(200)));
        assert!(checked > 10_000);
    }
}
