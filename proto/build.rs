use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["coffer/v1/agent.proto", "coffer/v1/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves this descriptor set; write it before generating code from it.
    std::fs::write(out.join("coffer_v1.bin"), fds.encode_to_vec())?;
    // Chunk payloads decode as `Bytes` views into the receive buffer instead of copies.
    tonic_prost_build::configure()
        .bytes(".coffer.v1.UploadChunksRequest.data")
        .bytes(".coffer.v1.DownloadChunksResponse.data")
        .compile_fds(fds)?;
    Ok(())
}
