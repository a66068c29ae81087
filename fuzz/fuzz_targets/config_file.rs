//! The agent's `agent.toml`: any text through `Config::from_toml` and, when it parses,
//! the checks TOML types cannot express (`Config::check`). Nothing may panic, and a
//! refusal always says something.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usage_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            if let Err(error) = config.check() {
                assert!(!error.to_string().is_empty());
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
