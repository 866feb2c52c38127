//! `stampede-fanout`: fanout on its own (the same as `stampede serve fanout`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main(
        stampede_runtime::Role::Service(stampede_runtime::ServiceKind::Fanout),
        stampede_fanout::serve,
    )
}
