//! Registry credentials and challenges: the `auth.json`/`config.json` files podman and docker
//! write, the credential helpers they name, `WWW-Authenticate` parsing, and base64. Pure
//! functions over text, plus one reader of the files and one runner of helpers.
//!
//! Credential files, first hit wins: `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
//! `~/.config/containers/auth.json`, `$DOCKER_CONFIG/config.json`, `~/.docker/config.json`. Each
//! has `"auths": {KEY: {"auth": base64("user:password")}}` (or `username`/`password`, or an
//! `identitytoken`), where KEY is `host[:port]`, optionally with a repository path (podman: the
//! longest matching one wins), or a URL (`https://index.docker.io/v1/` for Docker Hub).
//!
//! Credential helpers, as docker runs them: `"credHelpers": {"host[:port]": NAME}` for one
//! registry, `"credsStore": NAME` for all. Within one file the registry's own helper comes first,
//! then an `auths` entry that holds credentials, then the `credsStore`. A helper is the program
//! `docker-credential-NAME` on `PATH`, run as `docker-credential-NAME get` with the server on
//! stdin (`https://index.docker.io/v1/` for Docker Hub, else `host[:port]`); it prints
//! `{"Username": …, "Secret": …}`, where the user name `<token>` means the secret is an identity
//! token. A helper that has nothing for the registry ("credentials not found") passes on to the
//! next file; one that fails is reported as a warning and passed over too, so an anonymous pull
//! still works.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::reference::DOCKER_HUB;

/// What is stored for a registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credentials {
    /// A user name and password (or an access token used as one): basic auth, and token requests
    /// with basic auth.
    Password { user: String, password: String },
    /// An OAuth2 refresh token (docker's `identitytoken`, a helper's `<token>` user), traded at
    /// the registry's token service for an access token.
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { user, .. } => write!(f, "Credentials({user}, …)"),
            Credentials::IdentityToken(_) => write!(f, "IdentityToken(…)"),
        }
    }
}

impl Credentials {
    /// The `Authorization` value for basic auth, when these are a user and password.
    pub(crate) fn basic(&self) -> Option<String> {
        match self {
            Credentials::Password { user, password } => Some(format!("Basic {}", base64_encode(format!("{user}:{password}").as_bytes()))),
            Credentials::IdentityToken(_) => None,
        }
    }

    /// Who these credentials are, for messages: `as 'user'`, `with an identity token`.
    pub(crate) fn who(&self) -> String {
        match self {
            Credentials::Password { user, .. } => format!("as '{user}'"),
            Credentials::IdentityToken(_) => "with an identity token".to_owned(),
        }
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Where one credential file sends plyroot for a registry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Credentials(Credentials),
    /// Ask `docker-credential-NAME`.
    Helper(String),
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
            Ok(Some(Stored::Credentials(c))) => {
                crate::diag::debug!("using the credentials for {registry} in {}", f.display());
                return Some(c);
            }
            Ok(Some(Stored::Helper(name))) => match run_helper(&name, &helper_server(registry)) {
                Ok(Some(c)) => {
                    crate::diag::debug!("using the credentials for {registry} from docker-credential-{name} (named in {})", f.display());
                    return Some(c);
                }
                Ok(None) => crate::diag::debug!("docker-credential-{name} (named in {}) has no credentials for {registry}", f.display()),
                Err(e) => crate::diag::warn!("ignoring the credential helper named in {}: {e}", f.display()),
            },
            Ok(None) => {}
            Err(e) => crate::diag::warn!("ignoring {}: {e}", f.display()),
        }
    }
    None
}

/// What docker hands a helper for `registry`: Docker Hub's historical URL, else the registry.
fn helper_server(registry: &str) -> String {
    if registry == DOCKER_HUB {
        "https://index.docker.io/v1/".to_owned()
    } else {
        registry.to_owned()
    }
}

/// Runs `docker-credential-NAME get` for `server`; `None` when it has nothing for it.
pub(crate) fn run_helper(name: &str, server: &str) -> Result<Option<Credentials>, String> {
    let program = format!("docker-credential-{name}");
    if name.is_empty() || name.contains('/') {
        return Err(format!("'{name}' is not a credential helper name"));
    }
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program} (is it on PATH?): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading gives EPIPE here; its status says what happened.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("{program} get: {e}"))?;
    parse_helper_output(&program, out.status.success(), &out.stdout, &out.stderr)
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// What a helper's exit status and output mean (the protocol of docker-credential-helpers).
fn parse_helper_output(program: &str, success: bool, stdout: &[u8], stderr: &[u8]) -> Result<Option<Credentials>, String> {
    let said = |b: &[u8]| String::from_utf8_lossy(b).split_whitespace().collect::<Vec<_>>().join(" ");
    if !success {
        let text = format!("{} {}", said(stdout), said(stderr));
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(format!("{program} get failed: {}", crate::text::escape(text.trim())));
    }
    let answer: HelperAnswer = serde_json::from_slice(stdout).map_err(|e| format!("{program} get printed no credentials JSON: {e}"))?;
    Ok(match (answer.username.as_str(), answer.secret) {
        (_, secret) if secret.is_empty() => None,
        ("<token>", secret) => Some(Credentials::IdentityToken(secret)),
        (user, secret) => Some(Credentials::Password { user: user.to_owned(), password: secret }),
    })
}

/// Docker Hub's keys as `docker.io`, any scheme, trailing slash and `/v1`/`/v2` removed.
fn normalize_key(key: &str) -> String {
    let k = key.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
    let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
    match k.split_once('/') {
        Some(("index.docker.io" | "registry-1.docker.io", rest)) => format!("{DOCKER_HUB}/{rest}"),
        None if matches!(k, "index.docker.io" | "registry-1.docker.io") => DOCKER_HUB.to_owned(),
        _ => k.to_owned(),
    }
}

/// What one credential file holds for `registry`/`repository`: the registry's own helper, else
/// an `auths` entry with credentials, else the file's `credsStore`.
pub(crate) fn find_in(text: &str, registry: &str, repository: &str) -> Result<Option<Stored>, String> {
    let file: AuthFile = serde_json::from_str(text).map_err(|e| format!("not a credentials file: {e}"))?;
    if let Some((_, helper)) = file.cred_helpers.iter().find(|(k, v)| normalize_key(k) == registry && !v.is_empty()) {
        return Ok(Some(Stored::Helper(helper.clone())));
    }
    if let Some(c) = find_entry(&file, registry, repository)? {
        return Ok(Some(Stored::Credentials(c)));
    }
    Ok(file.creds_store.filter(|s| !s.is_empty()).map(Stored::Helper))
}

/// The credentials of the best `auths` entry for `registry`/`repository`.
fn find_entry(file: &AuthFile, registry: &str, repository: &str) -> Result<Option<Credentials>, String> {
    let full = format!("{registry}/{repository}");
    let mut best: Option<(usize, &AuthEntry)> = None;
    for (key, entry) in &file.auths {
        let k = normalize_key(key);
        let matches = k == registry || (full.starts_with(&k) && full.as_bytes().get(k.len()) == Some(&b'/') && k.starts_with(&format!("{registry}/")));
        if matches && !matches!(best, Some((len, _)) if len >= k.len()) {
            best = Some((k.len(), entry));
        }
    }
    let Some((_, entry)) = best else { return Ok(None) };
    if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::IdentityToken(token.to_owned())));
    }
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64_decode(auth).ok_or("an \"auth\" value is not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "an \"auth\" value is not UTF-8")?;
        let (user, password) = text.split_once(':').ok_or("an \"auth\" value is not base64(user:password)")?;
        return Ok(Some(Credentials::Password { user: user.to_owned(), password: password.to_owned() }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::Password { user: u.clone(), password: p.clone() })),
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
                "other.example": {{"username": "u", "password": "p"}},
                "token.example": {{"identitytoken": "refresh"}},
                "helped.example": {{"auth": "{}"}}
            }}, "credsStore": "desktop", "credHelpers": {{"helped.example": "gcloud", "https://index.docker.io/v1/": ""}}}}"#,
            base64_encode(b"hub:secret"),
            base64_encode(b"any:one"),
            base64_encode(b"team:two"),
            base64_encode(b"inline:ignored")
        );
        let pw = |user: &str, password: &str| Some(Stored::Credentials(Credentials::Password { user: user.into(), password: password.into() }));
        let get = |reg: &str, repo: &str| find_in(&file, reg, repo).unwrap();
        assert_eq!(get("docker.io", "library/debian"), pw("hub", "secret"));
        assert_eq!(get("reg.example:5000", "x/y"), pw("any", "one"));
        assert_eq!(get("reg.example:5000", "team/env"), pw("team", "two"), "the longest key wins");
        assert_eq!(get("reg.example:5000", "teamx/env"), pw("any", "one"), "keys match whole components");
        assert_eq!(get("other.example", "a"), pw("u", "p"));
        assert_eq!(get("token.example", "a"), Some(Stored::Credentials(Credentials::IdentityToken("refresh".into()))));
        assert_eq!(get("helped.example", "a"), Some(Stored::Helper("gcloud".into())), "the registry's own helper wins over its entry");
        assert_eq!(get("reg.example", "a"), Some(Stored::Helper("desktop".into())), "the port is part of the key; then the store");
        assert_eq!(find_in(r#"{"auths":{}}"#, "reg.example", "a").unwrap(), None);
        assert!(find_in("not json", "x", "y").is_err());
        let c = Credentials::Password { user: "hub".into(), password: "secret".into() };
        assert_eq!(c.basic().as_deref(), Some("Basic aHViOnNlY3JldA=="));
        assert!(!format!("{c:?}").contains("secret"));
        assert!(!format!("{:?}", Credentials::IdentityToken("refresh".into())).contains("refresh"));
    }

    #[test]
    fn reads_what_credential_helpers_say() {
        let parse = |ok, out: &str, err: &str| parse_helper_output("docker-credential-x", ok, out.as_bytes(), err.as_bytes());
        assert_eq!(
            parse(true, r#"{"ServerURL":"reg","Username":"u","Secret":"s"}"#, ""),
            Ok(Some(Credentials::Password { user: "u".into(), password: "s".into() }))
        );
        assert_eq!(parse(true, r#"{"ServerURL":"reg","Username":"<token>","Secret":"rt"}"#, ""), Ok(Some(Credentials::IdentityToken("rt".into()))));
        assert_eq!(parse(false, "credentials not found in native keychain\n", ""), Ok(None));
        assert_eq!(parse(true, r#"{"Username":"u","Secret":""}"#, ""), Ok(None));
        let e = parse(false, "", "keychain locked\x1b]0;pwned\x07").unwrap_err();
        assert!(e.contains("docker-credential-x get failed") && e.contains("keychain locked") && !e.contains('\x1b'), "{e}");
        assert!(parse(true, "not json", "").unwrap_err().contains("no credentials JSON"));
        assert!(run_helper("../x", "reg").unwrap_err().contains("not a credential helper name"));
        assert!(run_helper("plyroot-test-no-such-helper", "reg").unwrap_err().contains("cannot run docker-credential-plyroot-test-no-such-helper"));
        assert_eq!(helper_server("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(helper_server("reg.example:5000"), "reg.example:5000");
    }
}
