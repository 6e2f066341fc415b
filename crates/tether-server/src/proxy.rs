//! The client's address behind trusted reverse proxies (`X-Forwarded-For`).
//!
//! Only a connection from a trusted proxy may name another client address; from anyone else the
//! headers are ignored, so they cannot be used to dodge the per-address limits. Behind a chain
//! of proxies the client is the rightmost address that is not itself a trusted proxy: entries
//! further left were written by the client and prove nothing.

use std::net::IpAddr;

use http::HeaderMap;

/// An address block, `ADDR/LEN` (or a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    len: u8,
}

/// A trusted-proxy entry that is not `ADDR` or `ADDR/LEN`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an address or address block: {0:?}")]
pub struct CidrError(String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(s.to_owned());
        let (addr, len) = match s.trim().split_once('/') {
            Some((addr, len)) => (addr, Some(len.parse::<u8>().map_err(|_| err())?)),
            None => (s.trim(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| err())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(err());
        }
        Ok(Cidr { network, len })
    }
}

impl Cidr {
    /// Whether `ip` lies in this block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let prefix = |bits: u128, width: u8| match self.len {
            0 => 0,
            n => bits >> (width - n),
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix(u32::from(net).into(), 32) == prefix(u32::from(ip).into(), 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix(u128::from(net), 128) == prefix(u128::from(ip), 128)
            }
            _ => false,
        }
    }
}

/// Whether `ip` is one of the `trusted` proxies.
pub fn is_trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// The client address of a request that reached us from `peer`: `peer` itself unless it is a
/// trusted proxy, else the rightmost address of `X-Forwarded-For` that is not a trusted proxy.
///
/// Only `X-Forwarded-For` is read, the header every common proxy appends to (nginx's
/// `$proxy_add_x_forwarded_for`, Caddy, HAProxy's `forwardfor`): a proxy passes a client's own
/// `Forwarded` header through unchanged, so trusting it would let any client name its address.
pub fn client_address(trusted: &[Cidr], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !is_trusted(trusted, peer) {
        return peer;
    }
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(node_address)
        .collect();
    chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(trusted, **ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer)
}

/// An address from an `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]:4711`,
/// `2001:db8::1`; `None` for anything else (`unknown`, obfuscated names).
fn node_address(node: &str) -> Option<IpAddr> {
    let node = node.trim().trim_matches('"');
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, _port) = node.rsplit_once(':')?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn blocks_parse_and_contain() {
        let lan: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(lan.contains("10.200.1.2".parse().unwrap()));
        assert!(!lan.contains("11.0.0.1".parse().unwrap()));
        assert!(lan.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop_and_only_proxies_may_say() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.0.0.2")]);
        assert_eq!(
            client_address(&trusted, proxy, &xff),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_address(&trusted, stranger, &xff),
            stranger,
            "not a proxy: ignored"
        );
        let forged = headers(&[("forwarded", "for=6.6.6.6")]);
        assert_eq!(
            client_address(&trusted, proxy, &forged),
            proxy,
            "Forwarded is not read"
        );
        let v6 = headers(&[("x-forwarded-for", "[2001:db8::7]:4711")]);
        assert_eq!(
            client_address(&trusted, proxy, &v6),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        let port = headers(&[("x-forwarded-for", "203.0.113.5:5000")]);
        assert_eq!(
            client_address(&trusted, proxy, &port),
            "203.0.113.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(&trusted, proxy, &HeaderMap::new()), proxy);
    }
}
