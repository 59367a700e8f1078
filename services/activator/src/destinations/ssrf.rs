//! The SSRF guard: webhook requests never reach loopback, private, link-local (cloud metadata)
//! or otherwise internal addresses, unless `activator.allow_private_networks` lists a CIDR that
//! covers them.
//!
//! It is checked twice: when the activator starts ([`NetworkGuard::check_url`], which resolves
//! the URL's host and refuses the destination if any address is refused), and at every connect
//! ([`GuardedResolver`], the HTTP client's DNS resolver, which drops refused addresses, so a name
//! that later resolves elsewhere (DNS rebinding) is still caught). An IP-literal URL is not
//! resolved, so it is checked directly, at start and on every redirect.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use ipnet::IpNet;
use url::Url;

/// The setting that allows refused ranges, as named in errors.
pub const ALLOW_SETTING: &str = "activator.allow_private_networks";

/// The ranges a webhook may not reach unless allowed: unspecified ("this network"), loopback,
/// RFC 1918 private, carrier-grade NAT (RFC 6598), link-local (with the cloud metadata address
/// 169.254.169.254), IPv6 unique-local and link-local. IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`) are checked as their IPv4 address.
pub const REFUSED_NETWORKS: [&str; 11] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

/// What `herald dev` allows by default: loopback and private ranges (not link-local, so the
/// metadata address stays refused).
pub const DEV_ALLOWED_NETWORKS: [&str; 6] = [
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
];

/// An address the guard refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The host name or IP literal of the URL.
    pub host: String,
    /// The refused address.
    pub addr: IpAddr,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host != self.addr.to_string() {
            write!(f, "{} resolves to ", self.host)?;
        }
        write!(
            f,
            "{}, a loopback, private or link-local address; list a CIDR that covers it in \
             {ALLOW_SETTING} to allow it",
            self.addr
        )
    }
}

impl std::error::Error for Refused {}

/// Which addresses webhooks may reach: everything but [`REFUSED_NETWORKS`], except what the
/// allow-list covers.
#[derive(Debug, Clone)]
pub struct NetworkGuard {
    refused: Vec<IpNet>,
    allowed: Vec<IpNet>,
}

impl NetworkGuard {
    /// A guard that allows the `allowed` networks (`activator.allow_private_networks`).
    pub fn new(allowed: &[IpNet]) -> Self {
        Self {
            refused: REFUSED_NETWORKS
                .iter()
                .map(|n| n.parse().expect("valid built-in CIDR"))
                .collect(),
            allowed: allowed.to_vec(),
        }
    }

    /// Whether the guard lets requests reach `addr`.
    pub fn allows(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        !self.refused.iter().any(|n| n.contains(&addr))
            || self.allowed.iter().any(|n| n.contains(&addr))
    }

    /// Checks `addr`, reached as `host`.
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Refused> {
        if self.allows(addr) {
            Ok(())
        } else {
            Err(Refused {
                host: host.to_owned(),
                addr,
            })
        }
    }

    /// Checks an IP-literal URL's address; a URL with a host name passes (the resolver checks
    /// it at connect time).
    pub fn check_literal(&self, url: &Url) -> Result<(), Refused> {
        match ip_literal(url) {
            Some(addr) => self.check(&addr.to_string(), addr),
            None => Ok(()),
        }
    }

    /// The start-time check: an IP literal is checked directly, a host name is resolved and
    /// refused if any of its addresses is. A name that does not resolve now passes (the
    /// connect-time check still applies).
    pub async fn check_url(&self, url: &Url) -> Result<(), Refused> {
        self.check_literal(url)?;
        let Some(host) = url.host_str().filter(|_| ip_literal(url).is_none()) else {
            return Ok(());
        };
        let port = url.port_or_known_default().unwrap_or(443);
        let Ok(addrs) = tokio::net::lookup_host((host, port)).await else {
            return Ok(());
        };
        for a in addrs {
            self.check(host, a.ip())?;
        }
        Ok(())
    }
}

/// The address of an IP-literal URL (`http://10.0.0.1/`, `http://[::1]/`).
fn ip_literal(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
}

/// The webhook client's DNS resolver: the system's resolution, without the addresses the guard
/// refuses; a name with no address left fails with [`Refused`].
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<NetworkGuard>,
}

impl GuardedResolver {
    /// A resolver that filters with `guard`.
    pub fn new(guard: Arc<NetworkGuard>) -> Self {
        Self { guard }
    }
}

/// What a resolution fails with: the system's error, or [`Refused`] (found again by walking
/// the client error's sources).
type ResolveError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ResolveError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ResolveError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match guard.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(e)) => Err(e.into()),
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_internal_ranges_unless_allowed() {
        let guard = NetworkGuard::new(&[]);
        let cases = [
            ("127.0.0.1", false),
            ("127.255.0.9", false),
            ("::1", false),
            ("10.0.0.1", false),
            ("10.255.255.255", false),
            ("172.16.0.1", false),
            ("172.31.255.1", false),
            ("172.32.0.1", true),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("169.254.0.1", false),
            ("fc00::1", false),
            ("fd12:3456::1", false),
            ("fe80::1", false),
            ("0.0.0.0", false),
            ("0.1.2.3", false),
            ("::", false),
            ("100.64.0.1", false),
            ("100.127.255.255", false),
            ("100.128.0.1", true),
            ("::ffff:127.0.0.1", false),
            ("::ffff:169.254.169.254", false),
            ("8.8.8.8", true),
            ("93.184.216.34", true),
            ("2606:4700::1111", true),
            ("::ffff:8.8.8.8", true),
        ];
        for (addr, allowed) in cases {
            assert_eq!(guard.allows(ip(addr)), allowed, "{addr}");
        }
    }

    #[test]
    fn the_allow_list_opens_only_what_it_covers() {
        let guard = NetworkGuard::new(&[
            "127.0.0.1/32".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
        ]);
        let cases = [
            ("127.0.0.1", true),
            ("127.0.0.2", false),
            ("10.1.2.3", true),
            ("10.2.0.1", false),
            ("169.254.169.254", false),
            ("::ffff:127.0.0.1", true),
        ];
        for (addr, allowed) in cases {
            assert_eq!(guard.allows(ip(addr)), allowed, "{addr}");
        }
        let err = guard.check("metadata", ip("169.254.169.254")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("169.254.169.254"), "{text}");
        assert!(text.contains(ALLOW_SETTING), "{text}");
    }

    #[test]
    fn dev_defaults_cover_loopback_and_private_but_not_metadata() {
        let allowed: Vec<IpNet> = DEV_ALLOWED_NETWORKS
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let guard = NetworkGuard::new(&allowed);
        for a in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.0.1",
            "fd00::1",
        ] {
            assert!(guard.allows(ip(a)), "{a}");
        }
        assert!(!guard.allows(ip("169.254.169.254")));
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses_at_connect_time() {
        let name = || "localhost".parse::<Name>().unwrap();
        use tower_service::Service;
        let refused = GuardedResolver::new(Arc::new(NetworkGuard::new(&[])))
            .call(name())
            .await;
        let err = refused.expect_err("localhost is refused").to_string();
        assert!(err.contains("localhost resolves to"), "{err}");

        let allowed = ["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let addrs: Vec<SocketAddr> = GuardedResolver::new(Arc::new(NetworkGuard::new(&allowed)))
            .call(name())
            .await
            .expect("allowed")
            .collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
