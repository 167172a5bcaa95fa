//! The trace-driven cache simulator (filled by the policies work).
