//! The OCI image-spec's documents (descriptor, manifest, index, config) and media types, for
//! reading (`source::oci`, `source::docker_archive`, `source::registry`) and writing
//! (`export::oci`, `plyroot push`). No I/O but `uname`.
//!
//! One set of types for both directions. Every field that plyroot writes is serialized in the
//! field order below, maps are sorted (`BTreeMap`), and optional fields are left out when empty,
//! so a document plyroot writes has one byte form, hence one digest. Reading is lenient: every
//! field plyroot does not need is optional, and unknown fields are ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub(crate) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// What `plyroot push` uploads: registries and their clients expect compressed layers.
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub(crate) const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker's manifest list, read as an index.
pub(crate) const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker's image manifest, read as an OCI one.
#[cfg_attr(not(feature = "registry"), allow(dead_code))]
pub(crate) const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The annotation that names an image in an `index.json`.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Media types of an index (a multi-platform image, or a layout's `index.json`).
pub(crate) const INDEX_TYPES: [&str; 2] = [MEDIA_INDEX, MEDIA_DOCKER_LIST];

/// Layer media types plyroot can unpack; the compression itself is detected from content.
pub(crate) fn layer_type_supported(media_type: &str) -> bool {
    matches!(
        media_type,
        "" | MEDIA_LAYER
            | MEDIA_LAYER_GZIP
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

/// A reference to a blob: what it is, its digest and size.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    pub(crate) fn new(media_type: &str, digest: String, size: u64) -> Descriptor {
        Descriptor { media_type: media_type.to_owned(), digest, size, annotations: BTreeMap::new(), platform: None }
    }
}

/// An image's platform, in the image-spec's (Go's) names.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest. When read, it may turn out to be an index after all (media types are
/// optional in JSON): then `manifests` is set and `config` is not.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<Vec<Descriptor>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// An image index (`index.json`, a multi-platform image, a docker manifest list).
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    #[serde(default, deserialize_with = "lenient_number")]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An image config. Reading needs only `rootfs.diff_ids`; the rest is what plyroot writes, and a
/// config whose other fields are malformed is still read (they are taken as absent).
#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient")]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

/// A field plyroot does not need to read: any JSON value is accepted, and one of another shape
/// than `T` reads as absent.
fn lenient<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// What a container of the image runs by default.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The uncompressed layers' digests, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// A number plyroot does not check: anything else reads as 0.
fn lenient_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(lenient::<D, u32>(d)?.unwrap_or(0))
}

/// `sha256:HEX` of `data`: a blob's digest.
pub(crate) fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The running kernel's machine as the image-spec's platform (`linux`, Go's architecture and
/// variant). The kernel's, not the binary's: a 32-bit plyroot on a 64-bit kernel still runs
/// 64-bit images.
pub(crate) fn host_platform() -> Platform {
    let uname = rustix::system::uname();
    let machine = uname.machine().to_string_lossy().into_owned();
    let (arch, variant) = go_arch(&machine);
    Platform { architecture: arch.to_owned(), os: "linux".to_owned(), variant: variant.map(str::to_owned) }
}

/// `uname -m` in Go's names. ppc64 (big-endian) and ppc64le are told apart by the kernel's name;
/// mips64 is not (`uname -m` says `mips64` either way), so there the byte order of this build
/// decides.
fn go_arch(machine: &str) -> (&str, Option<&'static str>) {
    match machine {
        "x86_64" | "amd64" => ("amd64", None),
        "aarch64" | "arm64" | "aarch64_be" => ("arm64", None),
        "i386" | "i486" | "i586" | "i686" => ("386", None),
        m if m.starts_with("armv7") => ("arm", Some("v7")),
        m if m.starts_with("armv6") => ("arm", Some("v6")),
        m if m.starts_with("armv5") => ("arm", Some("v5")),
        "ppc64le" => ("ppc64le", None),
        "ppc64" => ("ppc64", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        "loongarch64" => ("loong64", None),
        "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
        "mips64" => ("mips64", None),
        m => (m, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_arch_names() {
        assert_eq!(go_arch("x86_64"), ("amd64", None));
        assert_eq!(go_arch("aarch64"), ("arm64", None));
        assert_eq!(go_arch("armv7l"), ("arm", Some("v7")));
        assert_eq!(go_arch("ppc64"), ("ppc64", None), "big-endian ppc64 is not ppc64le");
        assert_eq!(go_arch("ppc64le"), ("ppc64le", None));
        assert_eq!(host_platform().os, "linux");
    }

    /// Reading is lenient: nulls and missing fields where plyroot does not need them.
    #[test]
    fn reads_sparse_documents() {
        let c: Config = serde_json::from_str(r#"{"config":{"Env":null,"Cmd":null},"rootfs":{"diff_ids":["sha256:1"]},"history":[]}"#).unwrap();
        assert_eq!(c.rootfs.diff_ids, ["sha256:1"]);
        let c: Config = serde_json::from_str(r#"{"config":null,"created":null,"rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        assert!(c.config.is_none() && c.created.is_none());
        let c: Config = serde_json::from_str(r#"{"created":7,"config":{"Cmd":"sh"},"rootfs":{"type":"layers","diff_ids":["sha256:1"]}}"#).unwrap();
        assert_eq!((c.created, c.config.is_none(), c.rootfs.diff_ids.len()), (None, true, 1), "unused fields of another shape read as absent");
        let i: Index = serde_json::from_str(r#"{"schemaVersion":"2","manifests":[]}"#).unwrap();
        assert_eq!(i.schema_version, 0);
        let m: Manifest = serde_json::from_str(r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:2","platform":{"os":"linux","architecture":"arm","variant":"v7"}}]}"#).unwrap();
        assert!(m.config.is_none());
        assert_eq!(m.manifests.unwrap()[0].platform.as_ref().unwrap().variant.as_deref(), Some("v7"));
    }
}
