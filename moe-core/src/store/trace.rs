//! Routing traces (filled by the trace work).
