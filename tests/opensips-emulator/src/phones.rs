//! The simulated phones, matched by the SIP URI's user part whatever the host.

/// How a phone treats an INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers after the answer delay.
    Answers,
    /// Answers 486 Busy Here.
    Busy,
    /// Rings until 408 Request Timeout (fr_inv_timeout).
    NoAnswer,
    /// Never answers: 408 after fr_timeout.
    Dead,
    /// Not a known user: the proxy answers 404 User Not Found.
    Unknown,
}

/// Which SIP stack the phones placing calls on their own run: it shows in their Call-IDs and
/// in what they do after accepting a REFER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phones {
    /// pyua (the 4.0.1 recordings): Call-IDs like `4fdbc63612fbb8cc@pyua-alice`; keeps a
    /// transferred call up until told to end it.
    #[default]
    Pyua,
    /// baresip (the 3.6.8 recordings): Call-IDs of 16 hex digits; hangs a call up as soon as
    /// it accepted a REFER on it.
    Baresip,
}

impl Phones {
    /// A Call-ID for a call this kind of phone of `user` places.
    pub fn callid(self, user: &str) -> String {
        match self {
            Phones::Baresip => crate::sip::hex(16),
            Phones::Pyua => format!("{}@pyua-{user}", crate::sip::hex(16)),
        }
    }
}

/// The phones that answer by default.
pub const ANSWERING: [&str; 4] = ["alice", "bob", "cindy", "dave"];

/// The user part of a SIP URI (`sip:alice@10.0.0.1;x=y` → `alice`).
pub fn user_of(uri: &str) -> &str {
    let rest = uri
        .trim_start_matches('<')
        .strip_prefix("sips:")
        .or_else(|| uri.trim_start_matches('<').strip_prefix("sip:"))
        .or_else(|| uri.strip_prefix("tel:"))
        .unwrap_or(uri);
    let end = rest.find(['@', ';', '>', ':']).unwrap_or(rest.len());
    &rest[..end]
}

/// How the phone of `user` behaves; `extra` are more answering users.
pub fn behaviour(user: &str, extra: &[String]) -> Behaviour {
    match user {
        "busy" => Behaviour::Busy,
        "noanswer" => Behaviour::NoAnswer,
        "dead" => Behaviour::Dead,
        u if ANSWERING.contains(&u) || extra.iter().any(|e| e == u) => Behaviour::Answers,
        _ => Behaviour::Unknown,
    }
}

/// The port the reference config maps `user` to.
pub fn port(user: &str, extra: &[String]) -> u16 {
    match user {
        "alice" => 5071,
        "bob" => 5072,
        "cindy" => 5073,
        "dave" => 5074,
        "busy" => 5075,
        "noanswer" => 5076,
        "dead" => 5079,
        other => {
            let index = extra.iter().position(|e| e == other).unwrap_or(0);
            5080 + u16::try_from(index).unwrap_or(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_whatever_the_host() {
        assert_eq!(user_of("sip:alice@127.0.0.1"), "alice");
        assert_eq!(user_of("sip:bob@10.0.0.11:5060;transport=udp"), "bob");
        assert_eq!(user_of("<sip:cindy@x>"), "cindy");
        assert_eq!(behaviour("busy", &[]), Behaviour::Busy);
        assert_eq!(behaviour("eve", &["eve".into()]), Behaviour::Answers);
        assert_eq!(behaviour("nobody", &[]), Behaviour::Unknown);
    }
}
