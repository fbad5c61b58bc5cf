//! The extproxy agent as a library: the binary and the real-kernel tests share it.

pub mod diag;
pub mod manifest;
pub mod translate;
pub mod reconcile;
pub mod maps;
pub mod loader;
