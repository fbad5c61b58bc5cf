//! The extproxy agent as a library: the binary and the real-kernel tests share it.

pub mod diag;
pub mod loader;
pub mod manifest;
pub mod maps;
pub mod reconcile;
pub mod translate;
