//! Compiles proto/tether.proto with protox (pure Rust, no system protoc), then
//! generates the prost types and the pbjson serde impls (the JSON mapping).

use prost::Message;
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tether.proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile(["proto/tether.proto"], ["proto"])?;
    let descriptor_path = out.join("tether_descriptor.bin");
    fs::write(&descriptor_path, descriptors.encode_to_vec())?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .bytes(["."])
        .compile_protos(&["proto/tether.proto"], &["proto"])?;

    let descriptor_bytes = fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".tether.v1"])?;
    Ok(())
}
