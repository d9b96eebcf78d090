//! Compiles the etcd v3 protos, gRPC's health service and meshkv's internal messages with
//! tonic-prost-build, gives etcd's messages the protobuf JSON mapping (pbjson, with the
//! proto's own field names, as etcd's JSON gateway writes them), and lists every gRPC
//! method they declare (`grpc_methods.rs`, from the compiled descriptors) for the metrics.

use prost::Message as _;

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
        "proto/grpc/health/v1/health.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        // Services that a later release fills in answer UNIMPLEMENTED through default methods.
        .generate_default_stubs(true)
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;
    let descriptor_bytes = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[".mvccpb", ".authpb", ".etcdserverpb", ".v3lockpb", ".v3electionpb"])?;
    let descriptors = prost_types::FileDescriptorSet::decode(descriptor_bytes.as_slice())?;
    let mut methods = String::from(
        "/// Every gRPC method the protos declare: path, service, method, and grpc-go's name for its kind.\n\
         pub const GRPC_METHODS: &[(&str, &str, &str, &str)] = &[\n",
    );
    for file in &descriptors.file {
        for service in &file.service {
            let service_name = format!("{}.{}", file.package(), service.name());
            for m in &service.method {
                let kind = match (m.client_streaming(), m.server_streaming()) {
                    (false, false) => "unary",
                    (true, false) => "client_stream",
                    (false, true) => "server_stream",
                    (true, true) => "bidi_stream",
                };
                let method = m.name();
                methods.push_str(&format!(
                    "    (\"/{service_name}/{method}\", \"{service_name}\", \"{method}\", \"{kind}\"),\n"
                ));
            }
        }
    }
    methods.push_str("];\n");
    std::fs::write(out.join("grpc_methods.rs"), methods)?;
    Ok(())
}
