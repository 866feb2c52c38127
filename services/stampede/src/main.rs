//! `stampede`: see `stampede --help`.
fn main() -> std::process::ExitCode {
    stampede::main()
}
