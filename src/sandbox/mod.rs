//! (stub) sandbox
