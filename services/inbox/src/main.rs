//! `stampede-inbox`: inbox on its own (the same as `stampede serve inbox`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main("inbox", false, stampede_inbox::serve)
}
