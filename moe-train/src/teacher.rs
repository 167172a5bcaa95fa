//! The teacher task (in progress).
