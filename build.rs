//! Compiles the etcd v3 protos (and meshkv's internal messages) with tonic-prost-build,
//! gives etcd's messages the protobuf JSON mapping (pbjson, with the proto's own field
//! names, as etcd's JSON gateway writes them), and lists every gRPC method they declare
//! (`grpc_methods.rs`) for the metrics.

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
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        // Services that a later release fills in answer UNIMPLEMENTED through default methods.
        .generate_default_stubs(true)
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[".mvccpb", ".authpb", ".etcdserverpb", ".v3lockpb", ".v3electionpb"])?;
    let mut methods = String::from(
        "/// Every gRPC method the protos declare: path, service, method, and grpc-go's name for its kind.\n\
         pub const GRPC_METHODS: &[(&str, &str, &str, &str)] = &[\n",
    );
    for p in protos {
        for (service, method, kind) in rpcs(&std::fs::read_to_string(p)?) {
            methods.push_str(&format!("    (\"/{service}/{method}\", \"{service}\", \"{method}\", \"{kind}\"),\n"));
        }
    }
    methods.push_str("];\n");
    std::fs::write(out.join("grpc_methods.rs"), methods)?;
    Ok(())
}

/// The rpcs of a proto file, one a line as ours are written: (package.Service, Method, kind).
fn rpcs(proto: &str) -> Vec<(String, String, &'static str)> {
    let (mut package, mut service, mut out) = (String::new(), String::new(), Vec::new());
    for line in proto.lines().map(str::trim) {
        if let Some(p) = line.strip_prefix("package ") {
            package = p.trim_end_matches(';').trim().to_string();
        } else if let Some(s) = line.strip_prefix("service ") {
            service = format!("{package}.{}", s.trim_end_matches('{').trim());
        } else if let Some(r) = line.strip_prefix("rpc ") {
            let (name, rest) = r.split_once('(').expect("rpc Name(Request) returns (Response)");
            let (request, response) = rest.split_once("returns").expect("rpc Name(Request) returns (Response)");
            let streams = |s: &str| s.trim_start_matches([' ', '(']).starts_with("stream ");
            let kind = match (streams(request), streams(response)) {
                (false, false) => "unary",
                (true, false) => "client_stream",
                (false, true) => "server_stream",
                (true, true) => "bidi_stream",
            };
            out.push((service.clone(), name.trim().to_string(), kind));
        }
    }
    out
}
