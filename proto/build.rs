//! Generates Rust types from the `.proto` files with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "callapi/v1/commands.proto",
        "callapi/v1/mi.proto",
        "callapi/v1/events.proto",
        "callapi/v1/sessions.proto",
        "callapi/v1/auth.proto",
        "callapi/v1/calls.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Keeps every command about as small as the others.
    config.boxed(".callapi.v1.CallStart.options");
    config.compile_protos(&protos, &["."])?;
    Ok(())
}
