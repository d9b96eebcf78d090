//! deploy/kubernetes.yaml run the way Kubernetes runs it, on loopback: each pod is a real
//! `meshkv` started with the container image's entrypoint and the StatefulSet's args, its
//! `$(VAR)`s filled from the pod's env, and the pods' DNS names mapped to loopback ports.
//! The pods form their cluster, pass the manifest's own probes, take more pods when the
//! StatefulSet is scaled, and a pod restarted on its volume comes back with its data.
//! The objects must also fit together: selectors that find the pods, a headless Service
//! that names them before they are ready, ports that exist.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use etcd_client::{Client, GetOptions};
use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "default";

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_path("deploy/kubernetes.yaml")).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("deploy/kubernetes.yaml parses"))
        .collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes.yaml"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// Whether every label `selector` asks for is on the pods.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("a selector");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels[k] == *v)
}

/// The pods' network: each ordinal's client and peer port on 127.0.0.1, standing for
/// `<pod>.<service>.<namespace>.svc` and the container's ports.
struct Net {
    set: String,
    service: String,
    client_port: u16,
    peer_port: u16,
    client: Vec<u16>,
    peer: Vec<u16>,
}

impl Net {
    fn pod(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.set)
    }

    /// `arg` with every pod address and wildcard listen address of pod `me` on loopback.
    fn map(&self, arg: &str, me: usize) -> String {
        let mut out = arg.to_string();
        for j in 0..self.client.len() {
            let host = format!("{}.{}.{NAMESPACE}.svc", self.pod(j), self.service);
            out = out.replace(&format!("{host}:{}", self.client_port), &format!("127.0.0.1:{}", self.client[j]));
            out = out.replace(&format!("{host}:{}", self.peer_port), &format!("127.0.0.1:{}", self.peer[j]));
        }
        out = out.replace(&format!("0.0.0.0:{}", self.client_port), &format!("127.0.0.1:{}", self.client[me]));
        out.replace(&format!("0.0.0.0:{}", self.peer_port), &format!("127.0.0.1:{}", self.peer[me]))
    }
}

/// Fills `$(NAME)` from the container's env as the kubelet does, for pod `pod`.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    while let Some(start) = out.find("$(") {
        let end = start + out[start..].find(')').expect("a closed $(");
        let name = &out[start + 2..end];
        let value = env.get(name).unwrap_or_else(|| panic!("{arg}: no env {name}"));
        out.replace_range(start..=end, value);
    }
    out
}

/// The container's env for pod `pod`: the fieldRefs the manifest uses, and plain values.
fn env_of(container: &Value, pod: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), _) => v.clone(),
            (_, Value::String(f)) if f == "metadata.name" => pod.to_string(),
            (_, Value::String(f)) if f == "metadata.namespace" => NAMESPACE.to_string(),
            _ => panic!("env the test cannot fill: {e}"),
        };
        env.insert(str_of(&e["name"]).to_string(), value);
    }
    env
}

/// The image's entrypoint after the binary (deploy/Containerfile's exec form).
fn entrypoint_args() -> Vec<String> {
    let text = std::fs::read_to_string(repo_path("deploy/Containerfile")).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("an ENTRYPOINT");
    let mut words: Vec<String> = serde_json::from_str(line).expect("ENTRYPOINT in exec form");
    assert!(words.remove(0).ends_with("/meshkv"), "the entrypoint runs meshkv");
    words
}

struct Pod {
    proc: Proc,
    client: String,
    args: Vec<String>,
}

/// What the StatefulSet runs, with the machine's paths for its volumes.
struct Set {
    net: Net,
    container: Value,
    mounts: Vec<(String, PathBuf)>,
    root: PathBuf,
}

impl Set {
    fn args(&self, ordinal: usize) -> Vec<String> {
        let pod = self.net.pod(ordinal);
        let env = env_of(&self.container, &pod);
        let words = entrypoint_args()
            .into_iter()
            .chain(self.container["args"].as_array().expect("container args").iter().map(|a| str_of(a).to_string()));
        words
            .map(|w| {
                let mut w = self.net.map(&expand(&w, &env), ordinal);
                for (path, local) in &self.mounts {
                    let local = match path.as_str() {
                        "/data" => self.root.join(&pod),
                        _ => local.clone(),
                    };
                    w = w.replace(path.as_str(), &local.display().to_string());
                }
                assert!(!w.contains(".svc") && !w.contains("0.0.0.0"), "an address the test cannot map: {w}");
                w
            })
            .collect()
    }

    fn start(&self, ordinal: usize) -> Pod {
        let args = self.args(ordinal);
        Pod { proc: spawn_meshkv_args(&args), client: format!("http://127.0.0.1:{}", self.net.client[ordinal]), args }
    }

    /// The status a probe of the container (`startupProbe`, ...) gets from pod `ordinal`.
    fn probe(&self, which: &str, ordinal: usize) -> u16 {
        let get = &self.container[which]["httpGet"];
        let port = &get["port"];
        let port = match port {
            Value::String(name) => self.port_named(name),
            _ => port.as_u64().expect("a probe port") as u16,
        };
        let port = if port == self.net.client_port { self.net.client[ordinal] } else { self.net.peer[ordinal] };
        let url = format!("http://127.0.0.1:{port}{}", str_of(&get["path"]));
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &url])
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    fn port_named(&self, name: &str) -> u16 {
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")) as u16
    }
}

async fn client(pod: &Pod) -> Client {
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(3));
    Client::connect([pod.client.as_str()], Some(opts)).await.unwrap()
}

/// (voters, learners) by name, with each member's advertised client URL.
async fn members(pod: &Pod) -> Option<(Vec<String>, Vec<String>, Vec<String>)> {
    let list = client(pod).await.member_list().await.ok()?;
    let (mut voters, mut learners, mut urls) = (Vec::new(), Vec::new(), Vec::new());
    for m in list.members() {
        match m.is_learner() {
            true => learners.push(m.name().to_string()),
            false => voters.push(m.name().to_string()),
        }
        urls.extend(m.client_urls().iter().cloned());
    }
    voters.sort();
    learners.sort();
    urls.sort();
    Some((voters, learners, urls))
}

/// Waits until `pod` serves `n` keys under /registry/pods/default/ from its own store.
async fn holds_pods(pod: &Pod, n: usize) {
    eventually(&format!("{} to hold {n} keys", pod.client), Duration::from_secs(30), || async {
        client(pod)
            .await
            .get("/registry/pods/default/", Some(GetOptions::new().with_prefix().with_serializable()))
            .await
            .is_ok_and(|g| g.kvs().len() == n)
    })
    .await;
}

async fn ready(set: &Set, ordinal: usize, pods: &mut BTreeMap<usize, Pod>) {
    let pod = pods.get_mut(&ordinal).unwrap();
    pod.proc.wait_ready(Duration::from_secs(60));
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        eventually(&format!("{probe} of pod {ordinal}"), Duration::from_secs(30), || async {
            set.probe(probe, ordinal) == 200
        })
        .await;
    }
}

fn setup(docs: &[Value], root: &Path) -> Set {
    let sts = object(docs, "StatefulSet", "meshkv");
    let template = &sts["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], labels), "the StatefulSet selects its pods");

    // The headless Service gives each pod its name, before the pod is ready.
    let service = str_of(&sts["spec"]["serviceName"]).to_string();
    let headless = object(docs, "Service", &service);
    assert_eq!(headless["spec"]["clusterIP"], "None", "{service} is headless");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true, "{service} names pods that are not ready");
    let containers = template["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let container = containers[0].clone();

    // Every Service and the disruption budget find the pods, on ports they have.
    for doc in docs {
        let selector = match str_of(&doc["kind"]) {
            "Service" => &doc["spec"]["selector"],
            "PodDisruptionBudget" => &doc["spec"]["selector"]["matchLabels"],
            _ => continue,
        };
        assert!(selects(selector, labels), "{} {} selects the pods", doc["kind"], doc["metadata"]["name"]);
        for p in doc["spec"]["ports"].as_array().into_iter().flatten() {
            let target = &p["targetPort"];
            let found = container["ports"].as_array().unwrap().iter().any(|c| {
                c["name"] == *target
                    || c["containerPort"] == *target
                    || (target.is_null() && c["containerPort"] == p["port"])
            });
            assert!(found, "{} port {p} is a container port", doc["metadata"]["name"]);
        }
    }

    // The volumes: the data claim and the mesh secret, on the machine.
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = str_of(&m["name"]);
        let local = root.join(format!("volume-{name}"));
        let pod_volume = template["spec"]["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == name);
        let claim =
            sts["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten().any(|c| c["metadata"]["name"] == name);
        match pod_volume {
            Some(v) if v["secret"].is_object() => {
                std::fs::create_dir_all(&local).unwrap();
                // `kubectl create secret generic ... --from-literal=secret=...` makes one file per key.
                std::fs::write(local.join("secret"), "a secret shared by the members").unwrap();
            }
            Some(v) => panic!("a volume the test does not know: {v}"),
            None => assert!(claim, "volume {name} is a pod volume or a claim"),
        }
        mounts.push((str_of(&m["mountPath"]).to_string(), local));
    }

    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    let most = replicas + 2;
    let net = Net {
        set: "meshkv".into(),
        service,
        client_port: 0,
        peer_port: 0,
        client: (0..most).map(|_| free_port()).collect(),
        peer: (0..most).map(|_| free_port()).collect(),
    };
    let mut set = Set { net, container, mounts, root: root.to_path_buf() };
    set.net.client_port = set.port_named("client");
    set.net.peer_port = set.port_named("peer");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statefulset_forms_a_cluster_scales_and_restarts_as_kubernetes_runs_it() {
    let root = tempdir();
    let docs = manifest();
    let set = setup(&docs, root.path());
    let sts = object(&docs, "StatefulSet", "meshkv");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel", "the first pods start together");

    let mut pods: BTreeMap<usize, Pod> = (0..replicas).map(|i| (i, set.start(i))).collect();
    for i in 0..replicas {
        ready(&set, i, &mut pods).await;
    }
    let names: Vec<String> = (0..replicas).map(|i| set.net.pod(i)).collect();
    let mut urls: Vec<String> = (0..replicas).map(|i| pods[&i].client.clone()).collect();
    urls.sort();
    let (voters, learners, advertised) = members(&pods[&0]).await.unwrap();
    assert_eq!((voters, learners), (names.clone(), vec![]), "the pods form one cluster of voters");
    assert_eq!(advertised, urls, "each member advertises its pod's address");
    let put = client(&pods[&0]).await.put("/registry/pods/default/web", "v1", None).await.unwrap();
    let rev = put.header().unwrap().revision();

    // kubectl scale --replicas +2: the new pods join and serve as learners.
    for i in replicas..replicas + 2 {
        pods.insert(i, set.start(i));
    }
    for i in replicas..replicas + 2 {
        ready(&set, i, &mut pods).await;
    }
    eventually("the new pods in the member list", Duration::from_secs(30), || async {
        members(&pods[&0]).await.is_some_and(|(v, l, _)| v.len() == replicas && v.len() + l.len() == replicas + 2)
    })
    .await;
    let newest = &pods[&(replicas + 1)];
    let got = client(newest).await.get("/registry/pods/default/web", None).await.unwrap();
    assert_eq!(got.kvs()[0].mod_revision(), rev, "a new pod reads what was written before it came");
    client(newest).await.put("/registry/pods/default/api", "v1", None).await.unwrap();

    // A pod killed and started again on its volume, with the same args.
    let pod = pods.get_mut(&1).unwrap();
    pod.proc.kill9();
    pod.proc = spawn_meshkv_args(&pod.args);
    ready(&set, 1, &mut pods).await;
    holds_pods(&pods[&1], 2).await;
    let (voters, _, _) = members(&pods[&1]).await.unwrap();
    assert_eq!(voters, names, "the restarted pod is still a voter");

    // A pod whose volume is lost (a new claim on another node) starts empty under its
    // old name: the cluster takes it back as a learner and it catches up.
    let pod = pods.get_mut(&2).unwrap();
    pod.proc.kill9();
    std::fs::remove_dir_all(root.path().join(set.net.pod(2))).unwrap();
    pod.proc = spawn_meshkv_args(&pod.args);
    ready(&set, 2, &mut pods).await;
    let reset = format!("name={} rejoin=true", set.net.pod(2));
    wait_until("the cluster to remove the emptied pod, to take it back", Duration::from_secs(30), || {
        pods.values().any(|p| p.proc.log().contains(&reset))
    });
    holds_pods(&pods[&2], 2).await;
    let all: Vec<String> = (0..replicas + 2).map(|i| set.net.pod(i)).collect();
    eventually("every pod a member, with three voters", Duration::from_secs(30), || async {
        members(&pods[&0]).await.is_some_and(|(v, l, _)| {
            let mut both: Vec<String> = v.iter().chain(&l).cloned().collect();
            both.sort();
            v.len() == replicas && both == all
        })
    })
    .await;
    client(&pods[&2]).await.put("/registry/pods/default/db", "v1", None).await.unwrap();
    for (i, pod) in &pods {
        let log = pod.proc.log();
        assert!(!log.contains("panicked"), "pod {i} panicked:\n{log}");
        let removals = log.lines().filter(|l| l.contains("RemoveNode") && !l.contains(&reset)).count();
        assert_eq!(removals, 0, "no other pod was removed:\n{log}");
    }
}
