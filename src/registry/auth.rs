//! Registry credentials and challenges: the `auth.json`/`config.json` files podman and docker
//! write, `WWW-Authenticate` parsing, and base64. Pure functions over text, plus one reader of
//! the files.
//!
//! Credential files, first hit wins: `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
//! `~/.config/containers/auth.json`, `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`. Each
//! has `"auths": {KEY: {"auth": base64("user:password")}}`, where KEY is `host[:port]`, optionally
//! with a repository path (podman: the longest matching one wins), or a URL
//! (`https://index.docker.io/v1/` for Docker Hub). Credential helpers (`credsStore`) are not run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::reference::DOCKER_HUB;

/// A user name and password (or token) for basic auth and token requests.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, …)", self.user)
    }
}

impl Credentials {
    pub(crate) fn basic(&self) -> String {
        format!("Basic {}", base64_encode(format!("{}:{}", self.user, self.password).as_bytes()))
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The credential files to read, in order.
fn auth_files() -> Vec<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let mut files = Vec::new();
    files.extend(var("REGISTRY_AUTH_FILE"));
    if let Some(run) = var("XDG_RUNTIME_DIR") {
        files.push(run.join("containers/auth.json"));
    }
    let config = var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config")));
    if let Some(c) = config {
        files.push(c.join("containers/auth.json"));
    }
    if let Some(d) = var("DOCKER_CONFIG") {
        files.push(d.join("config.json"));
    }
    if let Some(h) = var("HOME") {
        files.push(h.join(".docker/config.json"));
    }
    files
}

/// Credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub) and `repository`.
pub(crate) fn lookup(registry: &str, repository: &str) -> Option<Credentials> {
    for f in auth_files() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        match find_in(&text, registry, repository) {
            Ok(Some(c)) => {
                crate::diag::debug!("using the credentials for {registry} in {}", f.display());
                return Some(c);
            }
            Ok(None) => {}
            Err(e) => crate::diag::warn!("ignoring {}: {e}", f.display()),
        }
    }
    None
}

/// The entry of one credential file for `registry`/`repository`.
pub(crate) fn find_in(text: &str, registry: &str, repository: &str) -> Result<Option<Credentials>, String> {
    let file: AuthFile = serde_json::from_str(text).map_err(|e| format!("not a credentials file: {e}"))?;
    let normalize = |key: &str| -> String {
        let k = key.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
        let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
        match k.split_once('/') {
            Some(("index.docker.io" | "registry-1.docker.io", rest)) => format!("{DOCKER_HUB}/{rest}"),
            None if matches!(k, "index.docker.io" | "registry-1.docker.io") => DOCKER_HUB.to_owned(),
            _ => k.to_owned(),
        }
    };
    let full = format!("{registry}/{repository}");
    let mut best: Option<(usize, &AuthEntry)> = None;
    for (key, entry) in &file.auths {
        let k = normalize(key);
        let matches = k == registry || (full.starts_with(&k) && full.as_bytes().get(k.len()) == Some(&b'/') && k.starts_with(&format!("{registry}/")));
        if matches && !matches!(best, Some((len, _)) if len >= k.len()) {
            best = Some((k.len(), entry));
        }
    }
    let Some((_, entry)) = best else { return Ok(None) };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64_decode(auth).ok_or("an \"auth\" value is not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "an \"auth\" value is not UTF-8")?;
        let (user, password) = text.split_once(':').ok_or("an \"auth\" value is not base64(user:password)")?;
        return Ok(Some(Credentials { user: user.to_owned(), password: password.to_owned() }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials { user: u.clone(), password: p.clone() })),
        _ => Ok(None),
    }
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// `bearer` or `basic`, lowercased.
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, …), names lowercased.
    pub params: BTreeMap<String, String>,
}

/// Parses `Bearer realm="https://auth.example/token",service="reg",scope="repository:x:pull"`.
/// Only the first challenge of a header is read (registries send one).
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.find(' ') {
        Some(i) => (&header[..i], header[i + 1..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let name = rest[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, c2)) = chars.next() {
                            v.push(c2);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            rest = &q[end.min(q.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if !name.is_empty() {
            params.insert(name, value);
        }
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard or URL-safe alphabet, padding optional, whitespace ignored.
pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (raw, enc) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("user:pa:ss", "dXNlcjpwYTpzcw==")] {
            assert_eq!(base64_encode(raw.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), raw.as_bytes());
        }
        assert_eq!(base64_decode("Zm9v\nYmFy").unwrap(), b"foobar");
        assert!(base64_decode("Zm9v!").is_none());
    }

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#).unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/debian:pull");
        let c = parse_challenge(r#"Bearer realm="https://r/t", scope="repository:a:pull,push", error="insufficient_scope""#).unwrap();
        assert_eq!(c.params["scope"], "repository:a:pull,push");
        assert_eq!(c.params["error"], "insufficient_scope");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!((c.scheme.as_str(), c.params["realm"].as_str()), ("basic", "Registry Realm"));
        let c = parse_challenge("Bearer realm=https://x/t,service=s").unwrap();
        assert_eq!((c.params["realm"].as_str(), c.params["service"].as_str()), ("https://x/t", "s"));
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn finds_credentials_like_podman_and_docker() {
        let file = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "reg.example:5000": {{"auth": "{}"}},
                "reg.example:5000/team": {{"auth": "{}"}},
                "other.example": {{"username": "u", "password": "p"}}
            }}, "credsStore": "desktop"}}"#,
            base64_encode(b"hub:secret"),
            base64_encode(b"any:one"),
            base64_encode(b"team:two")
        );
        let get = |reg: &str, repo: &str| find_in(&file, reg, repo).unwrap().map(|c| (c.user, c.password));
        assert_eq!(get("docker.io", "library/debian"), Some(("hub".into(), "secret".into())));
        assert_eq!(get("reg.example:5000", "x/y"), Some(("any".into(), "one".into())));
        assert_eq!(get("reg.example:5000", "team/env"), Some(("team".into(), "two".into())), "the longest key wins");
        assert_eq!(get("reg.example:5000", "teamx/env"), Some(("any".into(), "one".into())), "keys match whole components");
        assert_eq!(get("other.example", "a"), Some(("u".into(), "p".into())));
        assert_eq!(get("reg.example", "a"), None, "the port is part of the key");
        assert!(find_in("not json", "x", "y").is_err());
        let c = Credentials { user: "hub".into(), password: "secret".into() };
        assert_eq!(c.basic(), "Basic aHViOnNlY3JldA==");
        assert!(!format!("{c:?}").contains("secret"));
    }
}
