//! (stub) upstream
