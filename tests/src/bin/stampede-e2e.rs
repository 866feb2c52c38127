//! The `stampede` command, built inside the test package so the end-to-end
//! tests can start it as a real process (`CARGO_BIN_EXE_stampede-e2e`).
fn main() -> std::process::ExitCode {
    stampede::main()
}
