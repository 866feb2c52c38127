//! `stampede-delivery`: delivery on its own (the same as `stampede serve delivery`).
fn main() -> std::process::ExitCode {
    stampede_runtime::process::run_main(
        stampede_runtime::Role::Service(stampede_runtime::ServiceKind::Delivery),
        stampede_delivery::serve,
    )
}
