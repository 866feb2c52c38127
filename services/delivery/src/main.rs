//! `stampede-delivery`: delivery on its own (the same as `stampede serve delivery`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main("delivery", false, stampede_delivery::serve)
}
