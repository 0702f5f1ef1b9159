//! The test server's own tests, one test binary (`cargo test -p ddi-sim --test server`); each
//! module covers one part of the DDI or management API, e.g. `faults::` or `download::`.

mod cancel;
mod common;
mod config;
mod deployment;
mod download;
mod faults;
mod mgmt;
mod poll;
