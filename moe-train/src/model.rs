//! The language model (in progress).
