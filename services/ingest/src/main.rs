//! `stampede-ingest`: ingest on its own (the same as `stampede serve ingest`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main(
        stampede_runtime::Role::Service(stampede_runtime::ServiceKind::Ingest),
        stampede_ingest::serve,
    )
}
