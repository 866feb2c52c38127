//! `stampede-ingest`: ingest on its own (the same as `stampede serve ingest`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main("ingest", true, stampede_ingest::serve)
}
