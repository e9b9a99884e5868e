//! Which addresses may send a node's events.
//!
//! event_datagram and event_stream carry no authentication: anyone who can reach the event
//! socket could forge an `E_CALL_TRANSFER ok` and make a command report a call that never
//! happened. So each node lists the addresses its OpenSIPS sends from (`senders`), and only
//! datagrams and connections from those are read.

use std::net::IpAddr;
use std::str::FromStr;

/// Why a `senders` list is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendersError {
    /// The list is empty: every event would be dropped.
    #[error("senders is empty: no event could ever be accepted")]
    Empty,
    /// An entry is not an IP address or `address/prefix-length`.
    #[error("senders entry {entry:?}: {reason}")]
    Bad {
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// One allowed network: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix {
    network: IpAddr,
    bits: u8,
}

impl Prefix {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), self.bits, 32)
                    == masked(u128::from(u32::from(ip)), self.bits, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.bits, 128) == masked(u128::from(ip), self.bits, 128)
            }
            _ => false,
        }
    }
}

/// The top `bits` of a `width`-bit address.
fn masked(address: u128, bits: u8, width: u8) -> u128 {
    if bits == 0 {
        0
    } else {
        address >> (width - bits.min(width))
    }
}

/// The addresses a node's events are accepted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Senders(Vec<Prefix>);

impl Senders {
    /// Parses `senders` entries: IP addresses (`10.0.0.5`, `::1`) or CIDR prefixes
    /// (`10.0.0.0/24`, `fd00::/8`). IPv4-mapped IPv6 addresses are taken as IPv4.
    pub fn parse(entries: &[String]) -> Result<Self, SendersError> {
        if entries.is_empty() {
            return Err(SendersError::Empty);
        }
        entries
            .iter()
            .map(|entry| parse_entry(entry.trim()).map_err(|reason| bad(entry, reason)))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether events from `ip` are accepted.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|prefix| prefix.contains(ip))
    }
}

fn bad(entry: &str, reason: &'static str) -> SendersError {
    SendersError::Bad {
        entry: entry.to_owned(),
        reason,
    }
}

fn parse_entry(entry: &str) -> Result<Prefix, &'static str> {
    let (address, bits) = match entry.split_once('/') {
        Some((address, bits)) => (address, Some(bits)),
        None => (entry, None),
    };
    let written = IpAddr::from_str(address).map_err(|_| "not an IP address")?;
    let network = written.to_canonical();
    // A mapped address (::ffff:a.b.c.d/120) keeps its prefix relative to the IPv4 part.
    let mapped_offset = if written.is_ipv6() && network.is_ipv4() {
        96
    } else {
        0
    };
    let width: u8 = if network.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        None => width,
        Some(bits) => {
            let bits: u8 = bits.parse().map_err(|_| "prefix length is not a number")?;
            if bits < mapped_offset || bits - mapped_offset > width {
                return Err("prefix length is too long for the address");
            }
            bits - mapped_offset
        }
    };
    Ok(Prefix { network, bits })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn senders(entries: &[&str]) -> Result<Senders, SendersError> {
        Senders::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn single_addresses_match_only_themselves() {
        let allowed = senders(&["127.0.0.1", "::1"]).unwrap();
        assert!(allowed.allows(ip("127.0.0.1")));
        assert!(allowed.allows(ip("::1")));
        assert!(allowed.allows(ip("::ffff:127.0.0.1")));
        assert!(!allowed.allows(ip("127.0.0.2")));
        assert!(!allowed.allows(ip("10.0.0.1")));
        assert!(!allowed.allows(ip("::2")));
    }

    #[test]
    fn prefixes_match_their_network() {
        let allowed = senders(&["10.1.0.0/16", "fd00::/8", " 192.168.7.9/32 "]).unwrap();
        assert!(allowed.allows(ip("10.1.255.3")));
        assert!(!allowed.allows(ip("10.2.0.1")));
        assert!(allowed.allows(ip("fd12::7")));
        assert!(!allowed.allows(ip("fe80::1")));
        assert!(allowed.allows(ip("192.168.7.9")));
        assert!(!allowed.allows(ip("192.168.7.8")));
        // Host bits after the prefix are ignored, as usual.
        assert!(senders(&["10.1.2.3/8"]).unwrap().allows(ip("10.200.0.1")));
        let everyone = senders(&["0.0.0.0/0"]).unwrap();
        assert!(everyone.allows(ip("203.0.113.9")));
        assert!(!everyone.allows(ip("2001:db8::1")));
        let mapped = senders(&["::ffff:10.0.0.0/104"]).unwrap();
        assert!(mapped.allows(ip("10.9.9.9")));
        assert!(!mapped.allows(ip("11.0.0.1")));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(senders(&[]), Err(SendersError::Empty));
        for bad in [
            "opensips.example",
            "10.0.0.1/33",
            "::1/129",
            "10.0.0.0/x",
            "",
            "::ffff:10.0.0.0/8",
        ] {
            assert!(
                matches!(senders(&[bad]), Err(SendersError::Bad { .. })),
                "{bad}"
            );
        }
    }
}
