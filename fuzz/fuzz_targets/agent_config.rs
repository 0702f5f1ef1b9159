//! The agent's TOML configuration: any text either validates or gives an error (never a
//! panic), and the contract's example keeps validating.
#![no_main]

use std::path::Path;

use ddi_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let _ = Config::from_toml(text, Path::new("/etc/ddi-agent/config.toml"));
    let _ = ddi_agent::config::parse_rate(text);
});
