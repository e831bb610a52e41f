//! `daisy plugin-host` (hidden): run one plugin library's code for serve
//! or worker, which start it. Runs before logging is set up, and never
//! returns.

use std::path::PathBuf;

/// `daisy plugin-host`.
pub(crate) fn run(library: PathBuf, module: String, threads: usize, memory_mib: u64) -> ! {
    proxy::plugins::host::main(proxy::plugins::host::HostArgs {
        library,
        module,
        threads,
        memory_limit_mib: memory_mib,
    })
}
