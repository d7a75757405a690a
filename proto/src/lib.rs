//! The `coffer.v1` protocol, generated from `proto/coffer/v1/*.proto` at build time by a
//! pure-Rust protobuf compiler (no system `protoc`).

pub mod v1 {
    tonic::include_proto!("coffer.v1");

    /// Encoded `FileDescriptorSet` of `coffer.v1`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coffer_v1");
}
