//! OAuth 2.0 tokens: the token file (`store`), the refresh-ahead `manager`, and the
//! lock-free `handle` senders read the current access token from.

pub mod handle;

pub use handle::{
    token_channel, AccessToken, TokenHandle, TokenPublisher, TokenState, TokenUnavailable,
};
