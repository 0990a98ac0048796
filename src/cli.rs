//! (stub) cli
