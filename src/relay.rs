//! (stub) relay
