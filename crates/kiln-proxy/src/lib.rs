//! kiln-proxy: the ingress. [`token`] issues and checks scoped, short-lived JWE tokens;
//! [`server`] routes requests by Host to a microVM and forwards them over the agent channel.

#[doc(hidden)]
pub mod fuzzing;
pub mod h2;
pub mod server;
pub mod shell;
pub mod token;
