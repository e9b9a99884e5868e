//! Small SIP text helpers (no I/O): header lookup in a `t_uac_dlg` header block, URIs in
//! header values, random hex tags and Call-IDs, dates as OpenSIPS prints them, SDP bodies and
//! the raw reply text of `t_uac_dlg`'s `Message`.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngExt as _;

use crate::dialogs::Party;

/// `len` random lowercase hex digits.
pub fn hex(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16u32), 16).unwrap_or('0'))
        .collect()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
pub fn date(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The value of header `name` (case-insensitive) in a CRLF-joined header block.
pub fn header(headers: &str, name: &str) -> Option<String> {
    headers.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// The URI in a From/To value (`"A" <sip:a@b>;tag=x` → `sip:a@b`).
pub fn uri_in(value: &str) -> String {
    match (value.find('<'), value.find('>')) {
        (Some(start), Some(end)) if start < end => value[start + 1..end].to_owned(),
        _ => value.split(';').next().unwrap_or(value).trim().to_owned(),
    }
}

/// Whether `ruri` is a Request-URI OpenSIPS's `t_uac_dlg` accepts.
pub fn valid_ruri(ruri: &str) -> bool {
    let rest = ruri
        .strip_prefix("sip:")
        .or_else(|| ruri.strip_prefix("sips:"));
    rest.is_some_and(|r| !r.is_empty() && !r.contains([' ', '\r', '\n', '<', '>']))
}

/// The SDP a party offers (`dlg_list` caller_sdp / callee_sdp).
pub fn sdp(party: &Party) -> String {
    match party {
        Party::Proxy => "v=0\r\no=click-to-dial 0 0 IN IP4 0.0.0.0\r\ns=session\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n".to_owned(),
        Party::Phone(user) => format!("v=0\r\no=- 3379185210 848403378 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 20144 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\na=ssrc:93757171 cname:sip:{user}@127.0.0.1\r\n"),
    }
}

/// What a `t_uac_dlg` request said about its own dialog.
#[derive(Debug, Clone, Default)]
pub struct UacRequest {
    /// SIP method.
    pub method: String,
    /// From header value (without tag).
    pub from: String,
    /// To header value.
    pub to: String,
    /// Call-ID.
    pub callid: String,
    /// CSeq number.
    pub cseq: String,
}

/// A final reply to a `t_uac_dlg` request.
#[derive(Debug, Clone, Default)]
pub struct UacReply {
    /// From tag OpenSIPS put in.
    pub from_tag: String,
    /// To tag of the answerer.
    pub to_tag: String,
    /// `Server: …` or `User-Agent: …` line (without CRLF).
    pub server: String,
    /// Record-Route value, for a 2xx to an INVITE.
    pub record_route: Option<String>,
    /// Contact URI of the answerer, for a 2xx.
    pub contact: Option<String>,
    /// Whether an SDP answer is attached.
    pub sdp: bool,
}

/// The raw SIP reply text `t_uac_dlg` returns as `Message` (headers and body, no status
/// line, as recorded).
pub fn reply_text(request: &UacRequest, reply: &UacReply) -> String {
    let body = if reply.sdp {
        "v=0\r\no=- 3379185210 848403378 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 20144 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    } else {
        ""
    };
    let mut text = String::new();
    if let Some(route) = &reply.record_route {
        text.push_str(&format!("Record-Route: <{route}>\r\n"));
    }
    text.push_str(&format!(
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK{}.{}.0\r\nTo: {};tag={}\r\nFrom: {};tag={}\r\nCSeq: {} {}\r\nCall-ID: {}\r\n{}\r\n",
        hex(4),
        hex(8),
        request.to,
        reply.to_tag,
        request.from,
        reply.from_tag,
        request.cseq,
        request.method,
        request.callid,
        reply.server,
    ));
    if let Some(contact) = &reply.contact {
        text.push_str(&format!("Contact: <{contact}>\r\n"));
    }
    if reply.sdp {
        text.push_str("Content-Type: application/sdp\r\n");
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_as_opensips_prints_them() {
        assert_eq!(date(1_795_349_538), "2026-11-22 12:12:18");
        assert_eq!(date(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn headers_are_found_whatever_their_case() {
        let headers = "From: <sip:alice@127.0.0.1>\r\nTo: <sip:bob@127.0.0.1>\r\nCall-Id: x-1\r\n";
        assert_eq!(header(headers, "call-id").as_deref(), Some("x-1"));
        assert_eq!(
            uri_in(&header(headers, "From").unwrap_or_default()),
            "sip:alice@127.0.0.1"
        );
        assert!(header(headers, "Content-Type").is_none());
        assert_eq!(uri_in("sip:a@b;tag=1"), "sip:a@b");
    }

    #[test]
    fn ruris() {
        assert!(valid_ruri("sip:alice@127.0.0.1"));
        assert!(!valid_ruri("not a uri"));
        assert!(!valid_ruri("sip:"));
        assert!(!valid_ruri("http://x"));
    }

    #[test]
    fn hex_is_hex() {
        let h = hex(16);
        assert_eq!(h.len(), 16);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
