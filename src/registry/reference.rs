//! Image references as `docker pull` reads them: `debian` is `docker.io/library/debian:latest`,
//! `registry.example:5000/x/y:tag`, `name@sha256:…`. Pure parsing, no I/O.

use std::fmt;

/// The registry of references that name none.
pub(crate) const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reference {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    /// The repository path inside the registry, e.g. `library/debian`.
    pub repository: String,
    /// A tag, when the reference gives one (or none and no digest: `latest`).
    pub tag: Option<String>,
    /// `sha256:HEX`, when the reference pins one; it wins over the tag.
    pub digest: Option<String>,
}

/// Why a reference does not parse; `reason` says what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference '{input}': {reason} (e.g. debian:bookworm, ghcr.io/owner/image:tag, registry.example:5000/team/env@sha256:…)")]
pub(crate) struct ParseReferenceError {
    input: String,
    reason: String,
}

impl Reference {
    pub(crate) fn parse(input: &str) -> Result<Reference, ParseReferenceError> {
        let err = |reason: &str| ParseReferenceError { input: input.to_owned(), reason: reason.to_owned() };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(|| err("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(err("a digest is sha256: and 64 lowercase hex digits"));
                }
                (r, Some(d.to_owned()))
            }
            None => (input, None),
        };
        // The first component is a registry when it looks like a host: has a dot or a port, or
        // is `localhost` (Docker's rule).
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => (first.to_owned(), path),
            _ => (DOCKER_HUB.to_owned(), rest),
        };
        check_registry(&registry).map_err(|reason| err(&reason))?;
        let registry = if registry == "index.docker.io" || registry == DOCKER_HUB_API { DOCKER_HUB.to_owned() } else { registry };
        // A tag is after the last colon of the last component (a port is in the registry part).
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty() && t.len() <= 128 && !t.starts_with(['.', '-']) && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(err("a tag is up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'"));
            }
        }
        if repository.is_empty() {
            return Err(err("it names no repository"));
        }
        for comp in repository.split('/') {
            let ok = !comp.is_empty()
                && comp.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && comp.as_bytes()[0].is_ascii_alphanumeric()
                && comp.as_bytes()[comp.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(err("repository path components are lowercase letters, digits and '.', '_', '-' between them"));
            }
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') { format!("library/{repository}") } else { repository.to_owned() };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// The host (and port) to connect to.
    pub(crate) fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What goes after `/manifests/`: the digest when there is one, else the tag.
    pub(crate) fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

/// A registry is `host[:port]`: a DNS name or IPv4 address (dot-separated letters, digits and
/// inner `-`), or an IPv6 address in brackets, and a port of 1 to 65535. Nothing else may pass:
/// the registry becomes a URL's authority, where `?`, `#`, `@` or `/` would move the port into
/// a query (`127.0.0.1?:5000` connected to port 80) or the host into a user name.
fn check_registry(registry: &str) -> Result<(), String> {
    let bad = |what: &str| Err(format!("the registry '{registry}' {what}; a registry is HOST or HOST:PORT"));
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else { return bad("opens a bracket it does not close") };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("has brackets around something that is not an IPv6 address");
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return bad("has something after its IPv6 address that is not :PORT"),
            },
        }
    } else {
        match registry.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-');
        if !host.split('.').all(label_ok) {
            return bad("is not a host name or address (letters, digits, '-' inside, and dots between)");
        }
    }
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u32>(), Ok(1..=65535)) {
            return bad("has a port that is not a number from 1 to 65535");
        }
    }
    Ok(())
}

impl fmt::Display for Reference {
    /// The fully qualified form: `docker.io/library/debian:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A platform as `os/arch[/variant]` (OCI's, that is Go's, names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub(crate) fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("invalid platform '{s}': expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm/v7"));
        }
        Ok(Platform { os: parts[0].to_owned(), architecture: parts[1].to_owned(), variant: parts.get(2).map(|v| (*v).to_owned()) })
    }

    /// The machine this runs on.
    pub(crate) fn host() -> Platform {
        let p = crate::oci::host_platform();
        Platform { os: p.os, architecture: p.architecture, variant: p.variant }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = Reference::parse(s).unwrap();
        (r.registry, r.repository, r.tag, r.digest)
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_conventions() {
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(r("debian"), ("docker.io".into(), "library/debian".into(), s("latest"), None));
        assert_eq!(r("debian:bookworm"), ("docker.io".into(), "library/debian".into(), s("bookworm"), None));
        assert_eq!(r("user/img:1.0"), ("docker.io".into(), "user/img".into(), s("1.0"), None));
        assert_eq!(r("docker.io/debian"), ("docker.io".into(), "library/debian".into(), s("latest"), None));
        assert_eq!(r("index.docker.io/library/debian:12"), ("docker.io".into(), "library/debian".into(), s("12"), None));
        assert_eq!(Reference::parse("debian").unwrap().api_host(), "registry-1.docker.io");
        assert_eq!(Reference::parse("debian").unwrap().to_string(), "docker.io/library/debian:latest");
    }

    #[test]
    fn registries_ports_and_digests() {
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(r("registry.example:5000/x/y:tag"), ("registry.example:5000".into(), "x/y".into(), s("tag"), None));
        assert_eq!(r("127.0.0.1:5000/x"), ("127.0.0.1:5000".into(), "x".into(), s("latest"), None));
        assert_eq!(r("localhost/x:t"), ("localhost".into(), "x".into(), s("t"), None));
        assert_eq!(r("localhost:5000/x"), ("localhost:5000".into(), "x".into(), s("latest"), None));
        assert_eq!(r("[::1]:5000/x"), ("[::1]:5000".into(), "x".into(), s("latest"), None));
        assert_eq!(r("[fe80::1]/x"), ("[fe80::1]".into(), "x".into(), s("latest"), None));
        assert_eq!(r("my-registry.example:65535/x"), ("my-registry.example:65535".into(), "x".into(), s("latest"), None));
        assert_eq!(r(&format!("ghcr.io/o/i@{D}")), ("ghcr.io".into(), "o/i".into(), None, s(D)));
        assert_eq!(r(&format!("ghcr.io/o/i:v1@{D}")), ("ghcr.io".into(), "o/i".into(), s("v1"), s(D)));
        let pinned = Reference::parse(&format!("q.io/a:v1@{D}")).unwrap();
        assert_eq!(pinned.manifest_ref(), D);
        assert_eq!(pinned.api_host(), "q.io");
        assert_eq!(pinned.to_string(), format!("q.io/a:v1@{D}"));
    }

    #[test]
    fn rejects_bad_references() {
        for bad in ["", "Debian", "x@sha256:abc", "x@md5:0", "a//b", "x:", "x:-bad", "/x", "reg.io/", "x_/y", "127.0.0.1?:5000/x", "127.0.0.1#:5000/x", "h.io:5000x/x", "h.io:0/x", "h.io:65536/x", "h.io:/x", "-h.io/x", "h..io/x", "h_1.io/x", "[::1/x", "[nope]:5000/x", "[::1]x/x", "u:p@h.io/x"] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()), ("linux", "arm", Some("v7")));
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert!(Platform::parse("amd64").is_err());
        assert!(Platform::parse("linux//x").is_err());
        assert_eq!(Platform::host().os, "linux");
    }
}
