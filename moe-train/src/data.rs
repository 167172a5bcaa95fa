//! Text for language modelling, byte-level: a [`Corpus`] is bytes with a fixed train / validation split, and
//! batches are drawn from it by a counter-based generator, so batch `s` of a run depends only on the seed and `s`
//! (the same on any thread count, and after a resume).
//!
//! Split: the first 90 % of the bytes train, the last 10 % validate (nanoGPT's `prepare.py`), cut at a byte.
//! Training batch `s`: `B` windows of `C + 1` bytes starting at offsets uniform in `[0, n_train − C − 1]`, drawn
//! from `CounterRng(seed, BATCH_STREAM)` at indices `s · B + b`; inputs are the first `C` bytes of each window,
//! targets the last `C`. Validation: `n` fixed batches drawn the same way from the validation bytes with
//! `VAL_STREAM`, the same for every router of a run.

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

/// The fixed validation set: `n` batches.
pub fn val_batches(
    corpus: &Corpus,
    seed: u64,
    n: usize,
    batch: usize,
    context: usize,
) -> Vec<Batch> {
    (0..n)
        .map(|i| windows(corpus.val(), seed, VAL_STREAM, i as u64, batch, context))
        .collect()
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
