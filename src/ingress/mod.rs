//! (stub) ingress
