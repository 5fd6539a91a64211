//! The small files the agent keeps for `inspect` and for its own restarts.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

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

/// Writes `value` as JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    write_atomically(path, &serde_json::to_vec(value).map_err(std::io::Error::other)?)
}

/// Reads a JSON file written by `write_json`: `Ok(None)` if there is none,
/// `Err` if it cannot be read or parsed.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
