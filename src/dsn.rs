//! (stub) dsn
