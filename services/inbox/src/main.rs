//! `stampede-inbox`: inbox on its own (the same as `stampede serve inbox`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main(
        stampede_runtime::Role::Service(stampede_runtime::ServiceKind::Inbox),
        stampede_inbox::serve,
    )
}
