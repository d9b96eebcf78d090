//! Compiles the etcd v3 protos (and meshkv's internal messages) with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/mvccpb/kv.proto",
        "proto/authpb/auth.proto",
        "proto/etcdserverpb/rpc.proto",
        "proto/v3lockpb/v3lock.proto",
        "proto/v3electionpb/v3election.proto",
        "proto/meshkvpb/internal.proto",
        "proto/meshkvpb/mesh.proto",
        "proto/meshkvpb/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Services that a later release fills in answer UNIMPLEMENTED through default methods.
        .generate_default_stubs(true)
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
