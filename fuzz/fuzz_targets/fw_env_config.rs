//! `fw_env.config` parsing: any text either parses or gives an error, and what parses
//! prints as text that parses to the same locations.
#![no_main]

use std::path::Path;

use bootctl::fw_env_config::FwEnvConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let base = Path::new("/etc");
    let Ok(config) = FwEnvConfig::parse(text, base) else {
        return;
    };
    let _ = config.layout();
    let _ = config.env_size();
    let printed = config.to_text();
    let again = FwEnvConfig::parse(&printed, base).expect("printed config must parse");
    assert_eq!(
        again, config,
        "to_text round trip changed the config:\n{printed}"
    );
});
