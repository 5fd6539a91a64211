//! A minimal writer for the "newc" cpio format the kernel unpacks as an
//! initramfs (see the kernel's Documentation/driver-api/early-userspace/
//! buffer-format.rst). Entries are kept in memory, parents are created
//! implicitly, and everything is owned by root.

use std::collections::BTreeMap;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

enum Entry {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An initramfs under construction: absolute guest paths to entries.
#[derive(Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Whether `path` is already taken (by any kind of entry).
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    pub fn dir(&mut self, path: &str) {
        let path = normalize(path);
        self.parents(&path);
        self.entries.entry(path).or_insert(Entry::Dir);
    }

    /// Adds (or replaces) a regular file; `mode` holds the permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = normalize(path);
        self.parents(&path);
        self.entries.insert(
            path,
            Entry::File {
                mode: mode & 0o7777,
                data,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = normalize(path);
        self.parents(&path);
        self.entries.insert(path, Entry::Symlink(target.to_owned()));
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let path = normalize(path);
        self.parents(&path);
        self.entries.insert(
            path,
            Entry::CharDev {
                mode: mode & 0o7777,
                major,
                minor,
            },
        );
    }

    fn parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end + 1..].find('/') {
            end += 1 + i;
            self.entries
                .entry(path[..end].to_owned())
                .or_insert(Entry::Dir);
        }
    }

    /// Total size of file contents, for reporting.
    pub fn data_len(&self) -> usize {
        self.entries
            .values()
            .map(|e| match e {
                Entry::File { data, .. } => data.len(),
                _ => 0,
            })
            .sum()
    }

    /// The archive in newc format. `BTreeMap` order puts every directory
    /// before its contents, which the kernel's unpacker needs.
    pub fn to_newc(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data_len() + self.entries.len() * 256);
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            // Names in the archive are relative ("bin/sh"), as cpio writes them.
            let name = path.trim_start_matches('/');
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (S_IFDIR | 0o755, &[], (0, 0)),
                Entry::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Entry::Symlink(target) => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Entry::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
            write_entry(&mut out, ino, mode, nlink, rdev, name, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let size = u32::try_from(data.len()).expect("initramfs entry larger than 4 GiB");
    let namesize = u32::try_from(name.len() + 1).expect("path too long");
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut a = Archive::default();
        a.file("/bin/x", 0o755, b"hello".to_vec());
        a.symlink("/bin/sh", "busybox");
        let bytes = a.to_newc();
        // Entries: bin, bin/sh, bin/x, trailer; each header 110 bytes, 4-aligned.
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[110..114], b"bin\0");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/sh\0"));
        assert!(text.contains("busybox"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
    }
}
