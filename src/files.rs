//! The project's file helper: every file dcl writes (weights, checkpoints, metrics, tables,
//! arrays) goes through a temporary file and a rename, so a crash or a kill never leaves a
//! half-written file under its final name.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| {
        anyhow::anyhow!("cannot rename {} to {}: {e}", tmp.display(), path.display())
    })?;
    Ok(())
}
