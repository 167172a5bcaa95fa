//! Hand-written forward and backward of the non-MoE parts (in progress).
