//! `stampede`: see `stampede --help`.

/// mimalloc, not glibc's malloc: inbound messages are allocated on the
/// edge's threads and freed on the database and inbox threads, and glibc
/// pays for each such free with an arena lock and later consolidation
/// (14 % of a warm inbound run's samples). Built without its transparent
/// huge pages (`no_thp`): on first touch each 2 MiB page is zeroed whole, a
/// cost paid on the delivery path while the connection pools grow, and it
/// adds ~50 MiB of RSS. BENCHMARKS.md has the paired runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    stampede::main()
}
