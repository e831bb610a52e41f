//! Compiles `daisy/v1/daisy.proto` with protoc (Debian's `protobuf-compiler`)
//! and writes the file descriptor set that server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("daisy_descriptor.bin"))
        .compile_protos(&["daisy/v1/daisy.proto"], &["."])?;
    println!("cargo:rerun-if-changed=daisy/v1/daisy.proto");
    Ok(())
}
