//! The small files the agent keeps for `inspect` and for its own restarts.

use std::path::Path;

/// Replaces `path` with `bytes` in one step (write a sibling, rename), so a
/// reader never sees half a file; creates the directory if needed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
