//! smtp-oauth-relay: plain SMTP on loopback in, STARTTLS + AUTH XOAUTH2 out.
//!
//! Data flow: `ingress` accepts a message and hands it to `relay`, which sends it through
//! the `upstream` pool using the access token that `oauth::TokenManager` keeps fresh.
//! `sandbox` is an in-process fake provider (SMTP + token endpoint) for the demo and tests.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod dsn;
pub mod envelope;
pub mod ingress;
pub mod oauth;
pub mod relay;
pub mod reply;
pub mod route;
pub mod sandbox;
pub mod signals;
pub mod spool;
pub mod tls;
pub mod upstream;
