//! `stampede-fanout`: fanout on its own (the same as `stampede serve fanout`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main("fanout", false, stampede_fanout::serve)
}
