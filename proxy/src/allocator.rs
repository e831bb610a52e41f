//! The memory allocator: jemalloc for Daisy's own code, and glibc's malloc
//! (used by libpq and by plugins loaded in-process) kept small.
//!
//! jemalloc serves `daisy serve` 3-8% more calls a second than glibc's
//! malloc (BENCHMARKS.md, "jemalloc"). Its defaults are tuned for
//! resident memory on small machines: two arenas, not four per core (serve's
//! peak RSS 47.8 MiB against 67.8 MiB with the default), and it keeps freed
//! pages for 10 s to reuse them, except in the worker and the plugin hosts,
//! whose targets are a small resident set: they give them back at once
//! ([`return_freed_pages_at_once`]). `_RJEM_MALLOC_CONF` overrides these.

use tikv_jemalloc_ctl::raw;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's configuration, read at its start (its `malloc_conf`, with
/// the `_rjem_` prefix of this build); `_RJEM_MALLOC_CONF` is read after it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static libc::c_char> =
    // SAFETY: a pointer to the first byte of a static C string.
    Some(unsafe { &*c"narenas:2".as_ptr() });

/// glibc gives each thread that allocates its own malloc arena, up to eight
/// per core, and an arena keeps what it once held (BENCHMARKS.md: peak RSS
/// 59.5 MiB with the default, 42.5-52.8 MiB with two, on 2 cores, when
/// glibc served all of Daisy). One arena per core (at least two), unless
/// `MALLOC_ARENA_MAX` says otherwise.
pub(crate) fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only tunes the allocator; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Makes jemalloc return freed pages to the system at once rather than
/// after its decay time (10 s), in the arenas that exist and in those made
/// later. The worker's peak RSS in a 50,000-run drain: 36-39 MiB with the
/// default, 29-31 MiB with this, for a throughput within noise.
pub(crate) fn return_freed_pages_at_once() {
    if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
        return;
    }
    // SAFETY: these names take an `ssize_t` (decay) or give a `u32` (count),
    // as the types passed; jemalloc checks the sizes and refuses a mismatch.
    unsafe {
        for name in [&b"arenas.dirty_decay_ms\0"[..], b"arenas.muzzy_decay_ms\0"] {
            if let Err(err) = raw::write(name, 0isize) {
                tracing::debug!(%err, "jemalloc: setting the default decay");
            }
        }
        let arenas: u32 = raw::read(b"arenas.narenas\0").unwrap_or(0);
        for arena in 0..arenas {
            for kind in ["dirty", "muzzy"] {
                // Arenas not created yet refuse this; the defaults above
                // will apply to them.
                let name = format!("arena.{arena}.{kind}_decay_ms\0");
                let _ = raw::write(name.as_bytes(), 0isize);
            }
        }
    }
}
