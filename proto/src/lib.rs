//! Daisy's gRPC contract, `daisy.v1`, generated from `proto/daisy/v1/daisy.proto`.
//!
//! Only the proxy's gRPC module, the client layer and the load generator use
//! these types; the rest of the workspace speaks plain Rust and JSON.

pub mod json;

/// The `daisy.v1` package: messages, the `PostSubProxy` client and server.
#[allow(missing_docs, clippy::all)] // generated code
pub mod v1 {
    tonic::include_proto!("daisy.v1");
}

/// The encoded file descriptor set of `daisy.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("daisy_descriptor");

pub use prost_types;
