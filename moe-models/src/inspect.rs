//! `moe inspect`: placeholder.
