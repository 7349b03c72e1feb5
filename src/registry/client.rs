//! The registry API (distribution-spec v2) for one repository: manifests, blobs, uploads, with
//! anonymous, basic and bearer-token authentication.
//!
//! Authentication follows the registry's lead: a request goes out with whatever was learned so
//! far; a 401's `WWW-Authenticate` says what to do: `Basic` → the user's credentials, `Bearer
//! realm=…,service=…,scope=…` → GET a token from the realm (with the credentials, when there are
//! any, else anonymously), then the request is sent again once.
//!
//! Credentials stay with their registry: only a 401 from the registry's own origin is answered
//! (not one from where a redirect led); stored credentials go to a realm only over TLS or on the
//! registry's own origin; redirects drop `Authorization` when they leave the origin; and an
//! upload `Location` on another origin gets a bearer token (as podman sends it) but never basic
//! credentials.

use std::io::Read;

use serde::Deserialize;

use super::auth::{self, Credentials};
use super::http::{sendable, unsendable, Body, Http, HttpError, Response, Url};
use super::reference::Reference;
use super::RegistryError;
use crate::oci;

/// Manifest media types we ask for; the registry answers with the best it has.
const MANIFEST_ACCEPT: [&str; 4] = [oci::MEDIA_INDEX, oci::MEDIA_MANIFEST, oci::MEDIA_DOCKER_LIST, oci::MEDIA_DOCKER_MANIFEST];

/// Manifests and configs are small; a registry that sends more is not one.
pub(crate) const MAX_MANIFEST: u64 = 16 * 1024 * 1024;

/// The registry side of one operation (a pull, a push): one HTTP client, so its connections are
/// reused from the first request to the last.
pub(crate) struct Client {
    http: Http,
    base: Url,
    pub reference: Reference,
    /// `pull` or `pull,push`, for token scopes.
    actions: &'static str,
    /// Looked up once, when a registry first asks.
    creds: Option<Option<Credentials>>,
    /// The `Authorization` value that worked last.
    authorization: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

impl Client {
    pub(crate) fn new(reference: &Reference, push: bool) -> Result<Client, RegistryError> {
        let insecure = super::insecure(&reference.registry);
        let base = Url::parse(&format!("{}://{}/", if insecure { "http" } else { "https" }, reference.api_host()))?;
        let http = Http::new(&base.authority(), insecure);
        Ok(Client { http, base, reference: reference.clone(), actions: if push { "pull,push" } else { "pull" }, creds: None, authorization: None })
    }

    /// `/v2/<repository>/<rest>` on this registry.
    fn url(&self, rest: &str) -> Url {
        let mut u = self.base.clone();
        u.path = format!("/v2/{}/{rest}", self.reference.repository);
        u
    }

    fn credentials(&mut self) -> Option<Credentials> {
        let (reg, repo) = (self.reference.registry.clone(), self.reference.repository.clone());
        self.creds.get_or_insert_with(|| auth::lookup(&reg, &repo)).clone()
    }

    /// Sends a request with the current authorization; on a 401 authenticates as the registry
    /// asks and sends it once more (bodies here are small or empty, so they can be resent).
    pub(crate) fn request(&mut self, method: &str, url: &Url, headers: &[(&str, String)], body: &[u8]) -> Result<Response, RegistryError> {
        let resp = self.send(method, url, headers, body)?;
        if resp.status != 401 {
            return Ok(resp);
        }
        if !resp.url.same_origin(&self.base) {
            // A 401 from where a redirect led (storage, a CDN) is not the registry asking: its
            // challenge could name any realm. The caller reports the status.
            crate::diag::debug!("{method} {url}: {} answered 401 and is not {}: not authenticating with it", resp.url, self.base);
            return Ok(resp);
        }
        // Checked where its parts are used (the realm, the service, the scope).
        let challenge = resp.header_bytes("www-authenticate").map(|v| String::from_utf8_lossy(v).into_owned());
        drop(resp);
        self.authenticate(challenge.as_deref())?;
        Ok(self.send(method, url, headers, body)?)
    }

    /// One request with the current authorization.
    fn send(&self, method: &str, url: &Url, headers: &[(&str, String)], body: &[u8]) -> Result<Response, HttpError> {
        let mut hs: Vec<(&str, String)> = headers.to_vec();
        if let Some(a) = &self.authorization {
            hs.push(("Authorization", a.clone()));
        }
        self.http.fetch(method, url, &hs, if body.is_empty() { Body::Empty } else { Body::Bytes(body) })
    }

    /// Learns an `Authorization` value from a 401's challenge.
    fn authenticate(&mut self, challenge: Option<&str>) -> Result<(), RegistryError> {
        let registry = self.reference.registry.clone();
        let auth_err = |reason: String| RegistryError::Auth { registry: registry.clone(), reason };
        let Some(c) = challenge.and_then(auth::parse_challenge) else {
            return Err(auth_err("it answered 401 without a WWW-Authenticate challenge".into()));
        };
        let creds = self.credentials();
        let value = match c.scheme.as_str() {
            "basic" => {
                let creds = creds.ok_or_else(|| auth_err(format!("it asks for a user name and password, and none is stored for it: log in with `podman login {registry}` or `docker login {registry}` (plyroot reads their credential files and runs the credential helpers docker's config names)")))?;
                let value = creds.basic().ok_or_else(|| auth_err("it asks for a user name and password, and only an identity token is stored for it".into()))?;
                if self.authorization.as_deref() == Some(value.as_str()) {
                    return Err(auth_err(format!("it refused the stored credentials ({})", creds.who())));
                }
                value
            }
            "bearer" => {
                let token = self.token(&c, creds.as_ref()).map_err(auth_err)?;
                let value = format!("Bearer {token}");
                if self.authorization.as_deref() == Some(value.as_str()) {
                    return Err(auth_err(format!("it refused a fresh token for {}", self.scope())));
                }
                value
            }
            other => return Err(auth_err(format!("it asks for '{other}' authentication, which plyroot does not speak"))),
        };
        self.authorization = Some(value);
        Ok(())
    }

    /// The token scope of this client: `repository:NAME:pull[,push]`.
    fn scope(&self) -> String {
        format!("repository:{}:{}", self.reference.repository, self.actions)
    }

    /// A bearer token from the challenge's realm: a GET with the stored user and password as
    /// basic auth (or anonymously), or, for an identity token, docker's OAuth2 POST with
    /// `grant_type=refresh_token`. The error is the reason, for [`RegistryError::Auth`].
    fn token(&self, c: &auth::Challenge, creds: Option<&Credentials>) -> Result<String, String> {
        let registry = &self.reference.registry;
        let realm = c.params.get("realm").ok_or("its Bearer challenge names no realm")?;
        // What the challenge names goes into the token request: its URL, its query.
        for (name, url) in [("realm", true), ("service", false), ("scope", false)] {
            if let Some(problem) = c.params.get(name).and_then(|v| unsendable(v.as_bytes(), url)) {
                return Err(format!("its Bearer challenge names a {name} with {problem} in it, which plyroot does not put in a request: {}", crate::text::escape(&c.params[name])));
            }
        }
        let mut realm_url = Url::parse(realm).map_err(|e| e.to_string())?;
        let scope = self.scope();
        let mut params = Vec::new();
        if let Some(s) = c.params.get("service") {
            params.push(format!("service={}", url_encode(s)));
        }
        params.push(format!("scope={}", url_encode(&scope)));
        // A scope the registry names that we did not (another repository, for a mount).
        if let Some(s) = c.params.get("scope").filter(|s| **s != scope) {
            params.push(format!("scope={}", url_encode(s)));
        }
        // Stored credentials go to the realm the registry's own challenge names (Docker Hub's is
        // auth.docker.io) only over TLS, or on the registry's own origin.
        let creds = match creds {
            Some(_) if !realm_url.tls && !realm_url.same_origin(&self.base) => {
                crate::diag::warn!("{registry} names a token service on another host over plain HTTP ({realm_url}): asking it for a token without the stored credentials");
                None
            }
            c => c,
        };
        let resp = match creds {
            Some(Credentials::IdentityToken(refresh)) => {
                params.extend(["grant_type=refresh_token".to_owned(), "client_id=plyroot".to_owned(), format!("refresh_token={}", url_encode(refresh))]);
                let form = params.join("&");
                let headers = [("Content-Type", "application/x-www-form-urlencoded".to_owned())];
                self.http.fetch("POST", &realm_url, &headers, Body::Bytes(form.as_bytes()))
            }
            _ => {
                realm_url.path = format!("{}{}{}", realm_url.path, if realm_url.path.contains('?') { "&" } else { "?" }, params.join("&"));
                let headers: Vec<(&str, String)> = creds.and_then(Credentials::basic).map(|b| ("Authorization", b)).into_iter().collect();
                self.http.fetch("GET", &realm_url, &headers, Body::Empty)
            }
        };
        let resp = resp.map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
        if resp.status != 200 {
            let status = resp.status;
            let detail = resp.snippet();
            let who = creds.map_or("anonymously".to_owned(), Credentials::who);
            let hint = if creds.is_none() { format!("; if the image is private, log in with `podman login {registry}` or `docker login {registry}`") } else { String::new() };
            return Err(format!("its token service {realm_url} refused a token {who} for {scope} (HTTP {status}: {detail}){hint}"));
        }
        let body = resp.bytes(MAX_MANIFEST).map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
        let tok: TokenResponse = serde_json::from_slice(&body).map_err(|e| format!("its token service answered no JSON token: {e}"))?;
        // An OAuth2 answer carries access_token; docker's GET answers token (and often both).
        let token = tok.token.or(tok.access_token).filter(|t| !t.is_empty()).ok_or("its token service answered no token")?;
        // It goes into a header of every later request: nothing but token characters.
        if token.bytes().any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii()) {
            return Err(format!("its token service {realm_url} answered a token with spaces or control characters, which plyroot does not send"));
        }
        Ok(token)
    }

    /// Fetches a manifest (or index) by tag or digest; returns its bytes and media type. A
    /// manifest fetched by digest is checked against it; one fetched by tag against the
    /// `Docker-Content-Digest` the registry sends, when it sends one.
    pub(crate) fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self.request("GET", &url, &[("Accept", MANIFEST_ACCEPT.join(", "))], &[])?;
        let what = format!("the manifest {}", self.show(reference));
        let resp = self.ok(resp, &what, &[200])?;
        let media_type = resp.header("content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_owned();
        let claimed = claimed_digest(&resp, &what)?;
        let body = resp.bytes(MAX_MANIFEST)?;
        let actual = super::sha256(&body);
        let expected = if reference.starts_with("sha256:") { Some(reference.to_owned()) } else { claimed };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(RegistryError::Digest { what, expected, actual });
            }
        }
        Ok((body, media_type))
    }

    /// A blob's content, as a stream (following the registry's redirect to storage).
    pub(crate) fn blob(&mut self, digest: &str) -> Result<Response, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.request("GET", &url, &[], &[])?;
        let what = format!("the blob {digest} of {}", self.reference);
        self.ok(resp, &what, &[200])
    }

    /// A small blob (a config) read whole.
    pub(crate) fn blob_bytes(&mut self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let mut resp = self.blob(digest)?;
        let mut buf = Vec::new();
        let url = resp.url.to_string();
        (&mut resp).take(MAX_MANIFEST + 1).read_to_end(&mut buf).map_err(|source| HttpError::Io { method: "GET".into(), url, source })?;
        let actual = super::sha256(&buf);
        if actual != digest {
            return Err(RegistryError::Digest { what: format!("the blob {digest} of {}", self.reference), expected: digest.to_owned(), actual });
        }
        Ok(buf)
    }

    /// Whether the repository has a manifest under `reference` (a tag or digest).
    pub(crate) fn has_manifest(&mut self, reference: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self.request("HEAD", &url, &[("Accept", MANIFEST_ACCEPT.join(", "))], &[])?;
        match resp.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => self.ok(resp, &format!("checking for the manifest {}", self.show(reference)), &[]).map(|_| false),
        }
    }

    /// Whether the repository has the blob.
    pub(crate) fn has_blob(&mut self, digest: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.request("HEAD", &url, &[], &[])?;
        match resp.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => self.ok(resp, &format!("checking for the blob {digest} of {}", self.reference), &[]).map(|_| false),
        }
    }

    /// Uploads a blob: POST to open an upload session, then one PUT with the whole content and
    /// its digest (the "monolithic" upload every registry implements). The POST also settles
    /// authentication, so the PUT with a file body never needs to be resent.
    pub(crate) fn upload(&mut self, digest: &str, body: Body<'_>) -> Result<(), RegistryError> {
        let what = format!("uploading the blob {digest} to {}", self.reference);
        let url = self.url("blobs/uploads/");
        let resp = self.request("POST", &url, &[], &[])?;
        let resp = self.ok(resp, &what, &[202, 201])?;
        if resp.status == 201 {
            return Ok(()); // the registry mounted or already had it
        }
        let location = resp.header_bytes("location").ok_or_else(|| RegistryError::Protocol { what: what.clone(), reason: "the upload session has no Location".into() })?;
        let location = sendable(&resp.url.authority(), "an upload Location", location, true).map_err(|source| RegistryError::During { what: what.clone(), source })?;
        drop(resp);
        let mut put = url.join(&location)?;
        // The upload goes where the registry says, but not from TLS down to plain HTTP.
        self.http.check_redirect(&url, &put).map_err(|source| RegistryError::During { what: what.clone(), source })?;
        put.path = format!("{}{}digest={}", put.path, if put.path.contains('?') { "&" } else { "?" }, url_encode(digest));
        let mut headers = vec![("Content-Type", "application/octet-stream".to_owned())];
        if matches!(body, Body::File(_)) {
            // A registry that refuses the upload (401, 403, 413) says so before the body is sent,
            // instead of closing the connection under it, which would lose its answer.
            headers.push(("Expect", "100-continue".to_owned()));
        }
        if let Some(a) = self.authorization.as_ref().filter(|a| put.same_origin(&url) || a.starts_with("Bearer ")) {
            // An upload location on another origin gets a bearer token, as podman sends it (the
            // token is the registry's answer for this repository, short-lived and scoped), never
            // basic credentials (the stored password).
            headers.push(("Authorization", a.clone()));
        }
        let resp = self.http.fetch("PUT", &put, &headers, body).map_err(|source| RegistryError::During { what: what.clone(), source })?;
        self.ok(resp, &what, &[201, 204, 200]).map(|_| ())
    }

    /// Uploads a manifest under `reference` (a tag or its digest); returns its digest.
    pub(crate) fn put_manifest(&mut self, reference: &str, media_type: &str, body: &[u8]) -> Result<String, RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self.request("PUT", &url, &[("Content-Type", media_type.to_owned())], body)?;
        let what = format!("uploading the manifest of {}", self.show(reference));
        let resp = self.ok(resp, &what, &[201, 200, 204])?;
        let digest = super::sha256(body);
        if let Some(claimed) = claimed_digest(&resp, &what)? {
            if claimed != digest {
                return Err(RegistryError::Digest { what, expected: digest, actual: claimed });
            }
        }
        Ok(digest)
    }

    fn show(&self, reference: &str) -> String {
        format!("{}/{}{}{reference}", self.reference.registry, self.reference.repository, if reference.starts_with("sha256:") { "@" } else { ":" })
    }

    /// The response when its status is one of `ok` (any 2xx when `ok` is empty), else an error
    /// that names what was being done, the status and the registry's own words.
    fn ok(&self, resp: Response, what: &str, ok: &[u16]) -> Result<Response, RegistryError> {
        let good = if ok.is_empty() { (200..300).contains(&resp.status) } else { ok.contains(&resp.status) };
        if good {
            return Ok(resp);
        }
        let status = resp.status;
        let hint = match status {
            401 | 403 => format!(" (log in with `podman login {}` or `docker login`; plyroot reads their credential files and runs the credential helpers docker's config names)", self.reference.registry),
            404 if what.starts_with("the manifest") => " (no such repository or tag; check the name, e.g. with `skopeo list-tags docker://REPOSITORY`)".to_owned(),
            _ => String::new(),
        };
        let detail = resp.snippet();
        Err(RegistryError::Status { what: what.to_owned(), status, detail, hint })
    }
}

/// The `sha256:` digest a response's `Docker-Content-Digest` claims, to check the content
/// against; None when there is none (or it is empty), or one of another algorithm (which plyroot
/// cannot check).
/// A value that is no digest at all is refused: it is the registry misbehaving, and its text
/// goes into the error as it came (escaped where it is printed), not silently skipped.
fn claimed_digest(resp: &Response, what: &str) -> Result<Option<String>, RegistryError> {
    let Some(raw) = resp.header_bytes("docker-content-digest") else { return Ok(None) };
    let text = String::from_utf8_lossy(raw).trim().to_owned();
    if text.is_empty() {
        return Ok(None);
    }
    // OCI's grammar: algorithm `[a-z0-9]+([+._-][a-z0-9]+)*`, `:`, encoded `[a-zA-Z0-9=_-]+`.
    let well_formed = text.split_once(':').is_some_and(|(alg, enc)| {
        !alg.is_empty() && alg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b)) && !enc.is_empty() && enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b))
    });
    if !well_formed {
        return Err(RegistryError::Protocol { what: what.to_owned(), reason: format!("the registry sent a Docker-Content-Digest that is not a digest: '{text}'") });
    }
    Ok(text.starts_with("sha256:").then_some(text))
}

/// Percent-encodes a query value.
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::http::tests::{serve, serve_at};

    #[test]
    fn encodes_query_values() {
        assert_eq!(url_encode("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
    }

    /// The bearer flow: 401 with a challenge, a token from the realm (with stored credentials
    /// sent as basic auth: the realm is on the registry's origin), the request again with the
    /// token, all on one connection.
    #[test]
    fn bearer_token_flow() {
        let manifest = br#"{"schemaVersion":2}"#;
        let digest = crate::registry::sha256(manifest);
        let (addr, server) = serve_at(|addr| {
            vec![
                format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"reg\",scope=\"repository:x/y:pull\"\r\nContent-Length: 0\r\n\r\n").into_bytes(),
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"token\":\"t0k3n\"}".to_vec(),
                format!("HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nDocker-Content-Digest: {digest}\r\nContent-Length: {}\r\n\r\n{}", manifest.len(), String::from_utf8_lossy(manifest)).into_bytes(),
            ]
        });
        let r = Reference::parse(&format!("{addr}/x/y:t")).unwrap();
        let mut c = Client::new(&r, false).unwrap();
        c.base.tls = false;
        c.creds = Some(Some(Credentials::Password { user: "u".into(), password: "p".into() }));
        let (body, mt) = c.manifest("t").unwrap();
        assert_eq!((body.as_slice(), mt.as_str()), (&manifest[..], "application/vnd.oci.image.manifest.v1+json"));
        let seen = server.join().unwrap();
        assert!(seen[1].starts_with("#1 GET /token?service=reg&scope=repository%3Ax%2Fy%3Apull HTTP/1.1"), "{seen:?}");
        let seen: Vec<String> = seen.iter().map(|s| s.to_ascii_lowercase()).collect();
        assert!(seen[1].contains("authorization: basic dtpw"), "{seen:?}");
        assert!(!seen[0].contains("authorization"), "{seen:?}");
        assert!(seen[2].contains("authorization: bearer t0k3n") && seen[2].contains("accept: application/vnd.oci.image.index.v1+json"), "{seen:?}");
        assert!(seen.iter().all(|s| s.starts_with("#1 ")), "the token and the retry reuse the connection: {seen:?}");
    }

    /// An identity token (docker's `identitytoken`, a helper's `<token>` user) is traded at the
    /// realm with docker's OAuth2 POST, never sent as basic auth.
    #[test]
    fn identity_tokens_are_traded_for_access_tokens() {
        let (addr, server) = serve_at(|addr| {
            vec![
                format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"reg\"\r\nContent-Length: 0\r\n\r\n").into_bytes(),
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 25\r\n\r\n{\"access_token\":\"acc3ss\"}".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
            ]
        });
        let r = Reference::parse(&format!("{addr}/x/y:t")).unwrap();
        let mut c = Client::new(&r, true).unwrap();
        c.base.tls = false;
        c.creds = Some(Some(Credentials::IdentityToken("refr/esh".into())));
        assert!(c.has_blob(&format!("sha256:{}", "0".repeat(64))).unwrap());
        let seen = server.join().unwrap();
        let token_req = &seen[1];
        assert!(token_req.starts_with("#1 POST /token HTTP/1.1"), "{token_req}");
        assert!(token_req.to_ascii_lowercase().contains("content-type: application/x-www-form-urlencoded"), "{token_req}");
        let body = token_req.lines().last().unwrap();
        assert_eq!(body, "service=reg&scope=repository%3Ax%2Fy%3Apull%2Cpush&grant_type=refresh_token&client_id=plyroot&refresh_token=refr%2Fesh");
        assert!(!token_req.to_ascii_lowercase().contains("authorization"), "{token_req}");
        assert!(seen[2].to_ascii_lowercase().contains("authorization: bearer acc3ss"), "{seen:?}");
    }

    /// An upload location on another origin gets a bearer token, as podman sends it, but never
    /// basic credentials.
    #[test]
    fn upload_locations_elsewhere_get_tokens_not_passwords() {
        for (auth, sent) in [("Basic dTpw", false), ("Bearer t0k3n", true)] {
            let (storage, storage_server) = serve(vec![b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n".to_vec()]);
            let (addr, server) = serve(vec![format!("HTTP/1.1 202 Accepted\r\nLocation: http://{storage}/upload/1?state=x\r\nContent-Length: 0\r\n\r\n").into_bytes()]);
            let mut c = Client::new(&Reference::parse(&format!("{addr}/x/y:t")).unwrap(), true).unwrap();
            c.base.tls = false;
            c.authorization = Some(auth.to_owned());
            c.upload(&crate::registry::sha256(b"data"), Body::Bytes(b"data")).unwrap();
            let post = server.join().unwrap().remove(0).to_ascii_lowercase();
            assert!(post.contains(&format!("authorization: {}", auth.to_ascii_lowercase())), "the registry itself gets either: {post}");
            let put = storage_server.join().unwrap().remove(0);
            assert!(put.contains("PUT /upload/1?state=x&digest=sha256%3A"), "{put}");
            assert_eq!(put.to_ascii_lowercase().contains("authorization"), sent, "{auth}: {put}");
        }
    }

    #[test]
    fn errors_name_the_status_and_the_registry_words() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 51\r\n\r\n{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\",\"message\":\"x\"}]}".to_vec(),
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"r\"\r\nContent-Length: 0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nDocker-Content-Digest: sha256:0000000000000000000000000000000000000000000000000000000000000000\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ]);
        let r = Reference::parse(&format!("{addr}/x:t")).unwrap();
        let mut c = Client::new(&r, false).unwrap();
        c.base.tls = false;
        c.creds = Some(None);
        let e = format!("{:#}", anyhow::Error::from(c.manifest("t").unwrap_err()));
        assert!(e.contains("404") && e.contains("MANIFEST_UNKNOWN") && e.contains(&format!("{addr}/x:t")), "{e}");
        let e = format!("{:#}", anyhow::Error::from(c.manifest("t").unwrap_err()));
        assert!(e.contains("podman login") && e.contains(&addr), "{e}");
        let e = format!("{:#}", anyhow::Error::from(c.manifest("t").unwrap_err()));
        assert!(e.contains("corrupt") && e.contains("sha256:0000"), "{e}");
        server.join().unwrap();
    }

    /// A claimed digest is checked when it is sha256, skipped when it is empty or of another
    /// algorithm, and refused when it is no digest at all.
    #[test]
    fn claimed_digests() {
        let body = "{}";
        let answers: Vec<Vec<u8>> = ["", "sha512:abc", "sha256 not a digest", "sha256:x/../y"]
            .iter()
            .map(|d| format!("HTTP/1.1 200 OK\r\nDocker-Content-Digest: {d}\r\nContent-Length: 2\r\n\r\n{body}").into_bytes())
            .collect();
        let (addr, server) = serve(answers);
        let mut c = Client::new(&Reference::parse(&format!("{addr}/x:t")).unwrap(), false).unwrap();
        c.base.tls = false;
        c.creds = Some(None);
        assert!(c.manifest("t").is_ok(), "empty: skipped");
        assert!(c.manifest("t").is_ok(), "another algorithm: skipped");
        for _ in 0..2 {
            let e = format!("{:#}", anyhow::Error::from(c.manifest("t").unwrap_err()));
            assert!(e.contains("not a digest"), "{e}");
        }
        server.join().unwrap();
    }
}
