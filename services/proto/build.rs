//! Compiles `proto/` with protox (pure Rust: no protoc needed on the machine).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary may be reused from another checkout
    // sharing the target directory, and `env!` would point there.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("stampede/v1/api.proto"),
        root.join("stampede/v1/queue.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = out.join("stampede_descriptor.bin");
    std::fs::write(&descriptor, prost::Message::encode_to_vec(&fds))?;
    // The API's messages also as JSON: the admin console's endpoints answer
    // with the very messages the gRPC API does (docs/ARCHITECTURE.md,
    // "Admin console"). Queue messages stay protobuf only.
    tonic_prost_build::configure()
        .type_attribute(
            ".stampede.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .file_descriptor_set_path(&descriptor)
        .skip_protoc_run()
        .compile_fds(fds)?;
    Ok(())
}
