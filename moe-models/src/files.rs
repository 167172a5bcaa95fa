//! Files read from what a user passes: regular files only, JSON read with a size cap and refused when an object
//! repeats a key, names found inside a file (an index's shards, a manifest's case files) confined to their
//! directory, and a manifest's recorded size and SHA-256 checked.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use crate::error::LoadError;

/// The largest JSON file read (`config.json`, `model.safetensors.index.json`, `manifest.json`): 64 MiB. The index
/// of a trillion-parameter checkpoint is about 10 MiB.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// What a file type is, in words, for messages: `a directory`, `a character device`.
fn kind_of(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Checks a path the program is about to write (a trace, a plot, a checkpoint): its directory exists, and
/// whatever is there already is a regular file, which the write replaces. A directory, a symbolic link, a device,
/// a pipe or a socket is refused, never replaced or written through (as root, replacing `/dev/full` would remove a
/// device).
///
/// # Errors
/// [`LoadError::NotRegular`] naming what is there; [`LoadError::Io`] (not found) naming a missing directory.
pub fn check_output_file(path: &Path) -> Result<(), LoadError> {
    if path.file_name().is_none() {
        return Err(LoadError::NotRegular {
            file: path.to_path_buf(),
            what: "not a file name".into(),
        });
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let ft = meta.file_type();
        if !ft.is_file() {
            return Err(LoadError::NotRegular {
                file: path.to_path_buf(),
                what: format!("{} (not replaced)", kind_of(&ft)),
            });
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(LoadError::Io {
            file: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the directory to write into does not exist",
            ),
        });
    }
    Ok(())
}

/// The metadata of `path` (symlinks followed), which must be a regular file.
///
/// # Errors
/// [`LoadError::Io`] when it cannot be read (missing, no permission), [`LoadError::NotRegular`] naming what it is.
pub fn require_regular(path: &Path) -> Result<std::fs::Metadata, LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(LoadError::NotRegular {
            file: path.to_path_buf(),
            what: kind_of(&meta.file_type()).to_string(),
        });
    }
    Ok(meta)
}

/// Reads a regular file whole, refusing one over `limit` bytes (also one that grows past it while read).
///
/// # Errors
/// [`LoadError::Io`], [`LoadError::NotRegular`], [`LoadError::TooLarge`] naming `what`.
pub fn read_capped(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, LoadError> {
    let io = |source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    };
    let meta = require_regular(path)?;
    let too_large = |size| LoadError::TooLarge {
        file: path.to_path_buf(),
        size,
        limit,
        what: what.to_string(),
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Reads and parses a JSON file: a regular file of at most [`MAX_JSON_BYTES`], no object repeating a key.
///
/// # Errors
/// [`LoadError::Io`], [`LoadError::NotRegular`], [`LoadError::TooLarge`], [`LoadError::Duplicate`],
/// [`LoadError::Json`].
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let bytes = read_capped(path, MAX_JSON_BYTES, "a JSON file")?;
    if let Some(key) = first_duplicate_key(&bytes) {
        return Err(LoadError::Duplicate {
            file: path.to_path_buf(),
            key,
            place: "JSON".into(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| LoadError::Json {
        file: path.to_path_buf(),
        source,
    })
}

/// The first key that an object of the JSON text `bytes` defines twice, at any depth (`outer.inner` for a nested
/// one); `None` when there is none or the text is not JSON (the real parse reports that).
pub fn first_duplicate_key(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<FirstDup>(bytes)
        .ok()
        .and_then(|d| d.0)
}

/// The first repeated key found in a JSON value, if any (see [`first_duplicate_key`]).
struct FirstDup(Option<String>);

impl<'de> Deserialize<'de> for FirstDup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DupVisitor)
    }
}

struct DupVisitor;

impl<'de> Visitor<'de> for DupVisitor {
    type Value = FirstDup;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<FirstDup, E> {
        Ok(FirstDup(None))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<FirstDup, E> {
        Ok(FirstDup(None))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<FirstDup, E> {
        Ok(FirstDup(None))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<FirstDup, E> {
        Ok(FirstDup(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<FirstDup, E> {
        Ok(FirstDup(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<FirstDup, E> {
        Ok(FirstDup(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstDup, A::Error> {
        let mut first = None;
        let mut i = 0usize;
        while let Some(FirstDup(inner)) = seq.next_element::<FirstDup>()? {
            if first.is_none() {
                first = inner.map(|k| format!("[{i}].{k}"));
            }
            i += 1;
        }
        Ok(FirstDup(first))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstDup, A::Error> {
        let mut seen = HashSet::new();
        let mut first = None;
        while let Some(key) = map.next_key::<String>()? {
            let FirstDup(inner) = map.next_value::<FirstDup>()?;
            if first.is_some() {
                continue;
            }
            if seen.contains(&key) {
                first = Some(key);
            } else {
                first = inner.map(|k| format!("{key}.{k}"));
                seen.insert(key);
            }
        }
        Ok(FirstDup(first))
    }
}

/// `dir/name` for a file name read from `listing` (an index's shard, a manifest's case file), confined to `dir`:
/// refused when `name` is empty, absolute or contains `..`, and, when it exists, when it resolves (symlinks
/// followed) outside `dir`. One exception keeps the Hugging Face cache usable: in a snapshot directory
/// (`<repo>/snapshots/<rev>/`) a name may resolve into `<repo>/blobs/`, where the cache keeps the files it links
/// to. A missing file is returned as is, for the caller to report; nothing is opened here.
///
/// # Errors
/// [`LoadError::OutsideDir`] naming `listing`, `name` and why; [`LoadError::Io`] when `dir` cannot be resolved.
pub fn confined_path(dir: &Path, name: &str, listing: &Path) -> Result<PathBuf, LoadError> {
    let refuse = |reason: String| LoadError::OutsideDir {
        file: listing.to_path_buf(),
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("the file name is empty".into()));
    }
    for c in Path::new(name).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(refuse(format!(
                    "it contains `..`; files must stay in {}",
                    dir.display()
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse(format!(
                    "it is an absolute path; files must stay in {}",
                    dir.display()
                )));
            }
        }
    }
    let joined = dir.join(name);
    // `Path::new("a.json").parent()` is `""`: the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(resolved) = joined.canonicalize() else {
        // Missing (or a dangling link): nothing to open; the caller says it does not exist.
        return Ok(joined);
    };
    let base = dir.canonicalize().map_err(|source| LoadError::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    let hf_blobs = (base.parent().and_then(Path::file_name) == Some("snapshots".as_ref()))
        .then(|| {
            base.parent()
                .and_then(Path::parent)
                .map(|r| r.join("blobs"))
        })
        .flatten();
    let inside = resolved.starts_with(&base) || hf_blobs.is_some_and(|b| resolved.starts_with(b));
    if !inside {
        return Err(refuse(format!(
            "it resolves to {}, outside {}",
            resolved.display(),
            base.display()
        )));
    }
    Ok(joined)
}

/// The SHA-256 digest of a regular file, as 64 lowercase hex digits (read in 1 MiB pieces).
///
/// # Errors
/// [`LoadError::Io`], [`LoadError::NotRegular`].
pub fn sha256_hex(path: &Path) -> Result<String, LoadError> {
    let io = |source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    };
    require_regular(path)?;
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_found_at_any_depth() {
        assert_eq!(first_duplicate_key(br#"{"a":1,"b":2}"#), None);
        assert_eq!(first_duplicate_key(br#"{"a":1,"a":2}"#), Some("a".into()));
        assert_eq!(
            first_duplicate_key(br#"{"a":{"x":1,"y":[{"z":0,"z":1}]}}"#),
            Some("a.y.[0].z".into())
        );
        // Escapes decode before comparing: "\u0061" is "a".
        assert_eq!(
            first_duplicate_key(br#"{"a":1,"\u0061":2}"#),
            Some("a".into())
        );
        assert_eq!(first_duplicate_key(b"not json"), None);
    }

    #[test]
    fn names_confined_to_their_directory() {
        let tmp = tempfile::tempdir().expect("mkdir");
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/a.bin"), b"x").expect("write");
        let l = dir.join("index.json");
        assert!(confined_path(dir, "sub/a.bin", &l).is_ok());
        assert!(confined_path(dir, "./missing.bin", &l).is_ok());
        for bad in ["", "../a.bin", "sub/../../a.bin", "/etc/passwd"] {
            let e = confined_path(dir, bad, &l).expect_err(bad);
            assert!(matches!(e, LoadError::OutsideDir { .. }), "{bad}: {e}");
        }
        #[cfg(unix)]
        {
            let link = dir.join("link.bin");
            std::os::unix::fs::symlink(std::env::temp_dir(), &link).expect("symlink");
            let e = confined_path(dir, "link.bin", &l).expect_err("symlink out");
            assert!(e.to_string().contains("resolves to"), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn hf_cache_snapshot_links_into_blobs_are_allowed() {
        let tmp = tempfile::tempdir().expect("mkdir");
        let repo = tmp.path();
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).expect("mkdir");
        std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
        std::fs::write(repo.join("blobs/deadbeef"), b"x").expect("write");
        std::fs::write(repo.join("other"), b"x").expect("write");
        std::os::unix::fs::symlink("../../blobs/deadbeef", snap.join("model.safetensors"))
            .expect("symlink");
        std::os::unix::fs::symlink("../../other", snap.join("other.safetensors")).expect("symlink");
        let l = snap.join("model.safetensors.index.json");
        assert!(confined_path(&snap, "model.safetensors", &l).is_ok());
        assert!(confined_path(&snap, "other.safetensors", &l).is_err());
    }
}
