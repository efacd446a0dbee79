//! Network sysctls of the calling thread's namespace, through `/proc/sys` (a file opened there
//! belongs to the namespace of the thread that opens it).

use anyhow::{Context as _, Result};

fn path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

pub fn get(key: &str) -> Result<String> {
    std::fs::read_to_string(path(key))
        .map(|s| s.trim().to_string())
        .with_context(|| format!("cannot read sysctl {key}"))
}

pub fn set(key: &str, value: &str) -> Result<()> {
    let _rtnl = super::rtnl_section();
    std::fs::write(path(key), value).with_context(|| format!("cannot set sysctl {key}={value}"))
}
