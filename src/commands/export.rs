//! export: the merged root as a reproducible tarball, or an OCI image layout (issue 5).

use std::path::Path;

use anyhow::{bail, Result};

use crate::store::Store;

pub(crate) fn export(_store: &Store, name: &str, _output: Option<&Path>, _oci: Option<&Path>) -> Result<i32> {
    bail!("plyroot export {name} -o/--oci: exporting a root is not in this build yet; launchers (`plyroot export {name} PROGRAM…`) are")
}
