//! The client address behind trusted proxies: a load balancer's `X-Forwarded-For` names the
//! client only when the balancer is trusted, and only the part the trusted hops appended.
//!
//! The header is read right to left: each proxy appends the address it received the
//! request from, so the right-most address that is not a trusted proxy is the client.
//! Anything to its left was written by the client itself and may be forged. A request
//! whose peer is not trusted is its peer, whatever header it carries.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The header a proxy appends the address it received the request from to.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// Addresses and networks whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

/// A `TRUSTED_PROXIES` entry that is neither an address nor a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {entry:?} is not an IP address or a CIDR network (such as 10.0.0.5 or 10.0.0.0/24)")]
pub struct ProxyListError {
    /// The entry, clipped to 64 characters.
    pub entry: String,
}

impl TrustedProxies {
    /// Reads a comma-separated list of addresses (`10.0.0.5`, `::1`) and CIDR networks
    /// (`10.0.0.0/24`, `fd00::/8`); blank entries are skipped.
    pub fn parse(text: &str) -> Result<TrustedProxies, ProxyListError> {
        let mut networks = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let network = match entry.parse::<IpNet>() {
                Ok(network) => network.trunc(),
                Err(_) => entry
                    .parse::<IpAddr>()
                    .map(|addr| IpNet::from(addr.to_canonical()))
                    .map_err(|_| ProxyListError {
                        entry: entry.chars().take(64).collect(),
                    })?,
            };
            networks.push(network);
        }
        Ok(TrustedProxies { networks })
    }

    /// Whether no proxy is trusted (every request is its peer).
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether `addr` is a trusted proxy.
    pub fn trusts(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.networks.iter().any(|network| network.contains(&addr))
    }

    /// The client of a request that came from `peer`: `peer` itself unless it is trusted;
    /// then the right-most `X-Forwarded-For` address that is not trusted, or, when every
    /// address is trusted (or an entry cannot be read), the left-most trusted hop reached.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all(FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.into_iter().rev() {
            let Ok(addr) = hop.parse::<IpAddr>() else {
                // A hop no trusted proxy would write: stop at the last address we trust.
                return client;
            };
            client = addr.to_canonical();
            if !self.trusts(client) {
                return client;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn entries_are_addresses_or_networks_and_a_bad_one_is_named() {
        let proxies = TrustedProxies::parse(" 10.0.0.5, 192.168.1.0/24 ,fd00::/8,::1,").unwrap();
        for trusted in [
            "10.0.0.5",
            "192.168.1.77",
            "fd00::1",
            "::1",
            "::ffff:10.0.0.5",
        ] {
            assert!(proxies.trusts(ip(trusted)), "{trusted}");
        }
        for untrusted in ["10.0.0.6", "192.168.2.1", "fe80::1", "127.0.0.1"] {
            assert!(!proxies.trusts(ip(untrusted)), "{untrusted}");
        }
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        let error = TrustedProxies::parse("10.0.0.1, nginx.internal").unwrap_err();
        assert_eq!(error.entry, "nginx.internal");
        assert!(error.to_string().contains("\"nginx.internal\""), "{error}");
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        // A network written with host bits set still means the network.
        assert!(
            TrustedProxies::parse("10.0.0.9/24")
                .unwrap()
                .trusts(ip("10.0.0.200"))
        );
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() {
        let none = TrustedProxies::default();
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            none.client_address(ip("10.0.0.5"), &headers),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn a_spoofed_header_from_an_untrusted_peer_is_ignored() {
        let proxies = TrustedProxies::parse("10.0.0.5").unwrap();
        let headers = forwarded(&["198.51.100.1"]);
        assert_eq!(
            proxies.client_address(ip("203.0.113.9"), &headers),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_client() {
        let proxies = TrustedProxies::parse("10.0.0.0/24").unwrap();
        let cases: [(&[&str], &str); 7] = [
            (&["203.0.113.9"], "203.0.113.9"),
            // The client put a forged entry first; the balancer appended the real one.
            (&["198.51.100.1, 203.0.113.9"], "203.0.113.9"),
            // Two trusted hops: the second appended the first's address.
            (&["203.0.113.9, 10.0.0.7"], "203.0.113.9"),
            // Several header lines read as one list, in order.
            (&["198.51.100.1", "203.0.113.9, 10.0.0.7"], "203.0.113.9"),
            // No header: the trusted peer itself.
            (&[], "10.0.0.5"),
            // Every hop trusted: the left-most.
            (&["10.0.0.8, 10.0.0.7"], "10.0.0.8"),
            // An unreadable hop stops the walk at the last trusted address.
            (&["203.0.113.9, garbage, 10.0.0.7"], "10.0.0.7"),
        ];
        for (values, client) in cases {
            let headers = forwarded(values);
            assert_eq!(
                proxies.client_address(ip("10.0.0.5"), &headers),
                ip(client),
                "{values:?}"
            );
        }
        let mapped = forwarded(&["::ffff:203.0.113.9"]);
        assert_eq!(
            proxies.client_address(ip("::ffff:10.0.0.5"), &mapped),
            ip("203.0.113.9")
        );
    }
}
