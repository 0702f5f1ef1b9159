//! The integration tests, one test binary (`cargo test -p ddi-tests --test it`), so the
//! workspace links them once. Each module is one area; run one with its module path, e.g.
//! `cargo test -p ddi-tests --test it tamper::`.

mod agent_driver;
mod agent_flow;
mod agent_guard;
mod agent_restart;
mod bundle_e2e;
mod crash_points;
mod delta_e2e;
mod demo;
mod device_boot;
mod install_e2e;
mod install_kill;
mod limits_network;
mod local_install;
mod reliability_faults;
mod reliability_secrets;
mod state_compat;
mod tamper;
mod tls_ddi;
