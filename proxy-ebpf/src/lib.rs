//! Empty library target: lets proxy-user declare a build-dependency on this crate, so cargo
//! rebuilds the agent when the data path changes. The programs are the `extproxy` binary target.
#![no_std]
