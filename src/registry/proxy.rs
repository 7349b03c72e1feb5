//! Which proxy a request goes through: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`
//! (each also lower-case), read once per operation. Pure: the environment comes in as a lookup
//! function, so the rules are tested as tables.
//!
//! The rules are those of Go's `net/http` (`golang.org/x/net/http/httpproxy`), which podman,
//! skopeo and docker follow, so one proxy setting means the same to all of them; plus curl's
//! `ALL_PROXY` as the fallback for both schemes:
//!
//! - an `https://` URL goes through `HTTPS_PROXY`, an `http://` one through `HTTP_PROXY`, either
//!   through `ALL_PROXY` when its own variable is unset; the upper-case name wins, an empty value
//!   is unset;
//! - a proxy value without a scheme is `http://`; `https://` speaks TLS to the proxy; SOCKS is
//!   refused with a clear error (plyroot is built without it);
//! - `localhost` and loopback addresses are never proxied (a proxy's loopback is not ours);
//! - `NO_PROXY` is a list separated by commas or spaces: `*` matches every host; `example.com`
//!   matches it and its subdomains, `.example.com` (or `*.example.com`) only its subdomains; an
//!   IP address or CIDR block (`10.0.0.0/8`) matches addresses written as such; `host:port`
//!   matches that port only. Case and a trailing dot do not matter.

use std::net::IpAddr;

use super::http::Url;

/// The proxy settings of one operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Proxies {
    http: Option<Setting>,
    https: Option<Setting>,
    no_proxy: Vec<String>,
}

/// A proxy URL and the variable it came from (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Setting {
    pub var: &'static str,
    pub url: String,
}

impl Proxies {
    /// The settings in the process environment.
    pub(crate) fn from_env() -> Proxies {
        Proxies::from_lookup(|k| std::env::var(k).ok())
    }

    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Proxies {
        let first = |names: &[&'static str]| {
            names.iter().find_map(|&var| get(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).map(|url| Setting { var, url }))
        };
        let all = first(&["ALL_PROXY", "all_proxy"]);
        let no_proxy = first(&["NO_PROXY", "no_proxy"])
            .map(|s| s.url.split([',', ' ']).map(str::trim).filter(|e| !e.is_empty()).map(str::to_ascii_lowercase).collect())
            .unwrap_or_default();
        Proxies {
            http: first(&["HTTP_PROXY", "http_proxy"]).or_else(|| all.clone()),
            https: first(&["HTTPS_PROXY", "https_proxy"]).or(all),
            no_proxy,
        }
    }

    /// The proxy for `url`, if it is to go through one.
    pub(crate) fn for_url(&self, url: &Url) -> Option<&Setting> {
        let setting = if url.tls { self.https.as_ref() } else { self.http.as_ref() }?;
        let host = url.host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
        if host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
            return None;
        }
        if self.no_proxy.iter().any(|entry| no_proxy_matches(entry, &host, url.port)) {
            return None;
        }
        Some(setting)
    }
}

/// Whether one `NO_PROXY` entry (lower-case) covers `host` (lower-case, no brackets) on `port`.
fn no_proxy_matches(entry: &str, host: &str, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    if let Some((net, bits)) = entry.split_once('/') {
        let (Ok(net), Ok(bits), Ok(ip)) = (net.parse::<IpAddr>(), bits.parse::<u32>(), host.parse::<IpAddr>()) else { return false };
        return in_cidr(ip, net, bits);
    }
    // `host:port`, `[v6]:port`, or a bare IPv6 address (which has colons but no port).
    let (name, want_port) = match entry.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && entry.parse::<IpAddr>().is_err() => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => return false,
        },
        _ => (entry, None),
    };
    if want_port.is_some_and(|p| p != port) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    if let (Ok(a), Ok(b)) = (name.parse::<IpAddr>(), host.parse::<IpAddr>()) {
        return a == b;
    }
    let name = name.strip_prefix('*').unwrap_or(name);
    match name.strip_prefix('.') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix) && host.as_bytes()[host.len() - suffix.len() - 1] == b'.',
        None => host == name || (host.ends_with(name) && host.as_bytes().get(host.len().wrapping_sub(name.len() + 1)) == Some(&b'.')),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u32) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if bits > width {
        return false;
    }
    let mask = if bits == 0 { 0 } else { (u128::MAX << (128 - bits)) >> (128 - width) };
    ip & mask == net & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(vars: &[(&str, &str)]) -> Proxies {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Proxies::from_lookup(move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    fn via(p: &Proxies, url: &str) -> Option<String> {
        p.for_url(&Url::parse(url).unwrap()).map(|s| format!("{}={}", s.var, s.url))
    }

    #[test]
    fn each_scheme_has_its_variable_and_all_proxy_is_the_fallback() {
        let p = proxies(&[("HTTPS_PROXY", "http://s:3128"), ("http_proxy", "p:8080"), ("ALL_PROXY", "http://all:1")]);
        assert_eq!(via(&p, "https://reg.example/v2/").as_deref(), Some("HTTPS_PROXY=http://s:3128"));
        assert_eq!(via(&p, "http://reg.example/v2/").as_deref(), Some("http_proxy=p:8080"));
        let p = proxies(&[("all_proxy", "http://all:1"), ("HTTPS_PROXY", "")]);
        assert_eq!(via(&p, "https://reg.example/").as_deref(), Some("all_proxy=http://all:1"), "empty is unset");
        assert_eq!(via(&p, "http://reg.example/").as_deref(), Some("all_proxy=http://all:1"));
        let p = proxies(&[("HTTPS_PROXY", "http://upper:1"), ("https_proxy", "http://lower:1")]);
        assert_eq!(via(&p, "https://reg.example/").as_deref(), Some("HTTPS_PROXY=http://upper:1"));
        assert_eq!(via(&proxies(&[]), "https://reg.example/"), None);
        assert_eq!(via(&proxies(&[("HTTP_PROXY", "http://p:1")]), "https://reg.example/"), None, "HTTP_PROXY is for http:// only");
    }

    #[test]
    fn loopback_is_never_proxied() {
        let p = proxies(&[("HTTPS_PROXY", "http://p:1"), ("HTTP_PROXY", "http://p:1")]);
        for url in ["http://localhost:5000/", "http://127.0.0.1:5000/", "http://127.1.2.3/", "https://[::1]:5000/", "http://LOCALHOST./"] {
            assert_eq!(via(&p, url), None, "{url}");
        }
        assert!(via(&p, "http://localhost.example/").is_some());
    }

    #[test]
    fn no_proxy_entries() {
        let p = proxies(&[
            ("HTTPS_PROXY", "http://p:1"),
            ("HTTP_PROXY", "http://p:1"),
            ("no_proxy", "Internal.Example, .corp.example *.dev.example,10.0.0.0/8,192.168.1.5 reg.example:5000,[fd00::1]:443,fd00::2"),
        ]);
        let direct = [
            "https://internal.example/",
            "https://a.b.internal.example/",
            "https://x.corp.example/",
            "https://x.dev.example/",
            "http://10.1.2.3:5000/",
            "http://192.168.1.5/",
            "http://reg.example:5000/",
            "https://[fd00::1]/",
            "https://[fd00::2]:5000/",
            "https://INTERNAL.EXAMPLE./",
        ];
        for url in direct {
            assert_eq!(via(&p, url), None, "{url} goes direct");
        }
        let proxied = [
            "https://notinternal.example/",
            "https://corp.example/",
            "https://dev.example/",
            "http://11.1.2.3/",
            "http://192.168.1.6/",
            "http://reg.example:5001/",
            "https://reg.example/",
            "http://[fd00::1]:80/",
        ];
        for url in proxied {
            assert!(via(&p, url).is_some(), "{url} goes through the proxy");
        }
        assert_eq!(via(&proxies(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]), "https://any.example/"), None);
        let upper_wins = proxies(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "a.example"), ("no_proxy", "b.example")]);
        assert!(via(&upper_wins, "https://a.example/").is_none() && via(&upper_wins, "https://b.example/").is_some());
    }

    #[test]
    fn cidr_masks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_cidr(ip("10.255.0.1"), ip("10.0.0.0"), 8));
        assert!(!in_cidr(ip("11.0.0.1"), ip("10.0.0.0"), 8));
        assert!(in_cidr(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(in_cidr(ip("fd00::1234"), ip("fd00::"), 16));
        assert!(!in_cidr(ip("fe00::1"), ip("fd00::"), 16));
        assert!(!in_cidr(ip("10.0.0.1"), ip("fd00::"), 8));
        assert!(!in_cidr(ip("10.0.0.1"), ip("10.0.0.0"), 33));
    }
}
