//! Kubernetes through CRI: a containerd of the test's own, configured with
//! deploy/containerd/moat.toml (the `moat`, `moat-sandbox` and `moat-microvm`
//! runtime handlers), driven over its CRI gRPC socket the way the kubelet
//! drives it (Debian has no crictl; the client is the `k8s-cri` crate's
//! generated CRI v1 API over tonic). Pods run from a locally built pause
//! image (busybox `sleep infinity`) and a busybox image; every pod is stopped
//! and removed through CRI, and what moat, containerd and the shims leave is
//! checked: no moat state, no shim process, no mount, no cgroup.
mod engines;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engines::{
    assert_guest_serves, base_dir, can_run, moat_links, oci_archive_of, s, sh, Daemon,
    OneConnection, GUEST_SERVER, IMAGE,
};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The client side of the Kubernetes streaming server's port forward over
/// WebSocket (`v4.channel.k8s.io`: each message's first byte names its
/// channel, 0 the port's data and 1 its errors, and each channel begins
/// with the port, two bytes little-endian), written for the test: the
/// upgrade, `send` as one masked binary message on channel 0, then every
/// message until the server closes. Returns each channel's bytes after
/// the port.
fn websocket_port_forward(url: &str, port: u16, send: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .expect("an http:// streaming URL");
    let (host, path) = rest.split_at(rest.find('/').expect("a path"));
    let mut c = std::net::TcpStream::connect(host).expect("the streaming server");
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        c,
        "GET {path}?port={port} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: bW9hdC1wb3J0LWZ3ZA==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\
         Origin: http://{host}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut b).expect("the upgrade's answer");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    // One binary message, masked (as a client's must be).
    let mut payload = vec![0u8];
    payload.extend_from_slice(send);
    let mask = [0x6d, 0x6f, 0x61, 0x74];
    let mut frame = vec![0x82];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    c.write_all(&frame).unwrap();
    let mut channels: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    loop {
        let mut h = [0u8; 2];
        if c.read_exact(&mut h).is_err() {
            break;
        }
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                c.read_exact(&mut l).unwrap();
                u64::from(u16::from_be_bytes(l))
            }
            127 => {
                let mut l = [0u8; 8];
                c.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let mut body = vec![0u8; len as usize];
        c.read_exact(&mut body).expect("a whole message");
        match h[0] & 0x0f {
            // Close.
            8 => break,
            1 | 2 if !body.is_empty() && body[0] < 2 => {
                channels[body[0] as usize].extend_from_slice(&body[1..])
            }
            _ => {}
        }
    }
    let [data, error] = channels;
    for ch in [&data, &error] {
        assert!(
            ch.len() >= 2 && ch[..2] == port.to_le_bytes(),
            "each channel begins with the port: {ch:?}"
        );
    }
    (data[2..].to_vec(), error[2..].to_vec())
}

/// The pod sandbox image containerd's CRI plugin runs as each pod's first
/// container (`sandbox_image`): busybox's `sleep infinity`, built here.
const PAUSE: &str = "moat.test/pause:1";
/// containerd's namespace for everything CRI does.
const K8S_NS: &str = "k8s.io";

/// A containerd with the CRI plugin and moat's runtime handlers, all of its
/// state under one private base; a CRI client connected to it.
struct Cri {
    rt: tokio::runtime::Runtime,
    rs: RuntimeServiceClient<Channel>,
    is: ImageServiceClient<Channel>,
    /// The `--root` the runc shim gives moat (the handlers' `Root` option),
    /// with containerd's namespace appended by the shim.
    moat_root: PathBuf,
    /// The test's own parent cgroup (the kubelet's `kubepods`), relative to
    /// each hierarchy's root.
    cgroup_parent: String,
    d: Daemon,
}

/// What each pod of these tests asks for, as the kubelet would.
struct Pod {
    name: &'static str,
    handler: &'static str,
    annotations: HashMap<String, String>,
    /// A network namespace of the pod's own, made by the CNI plugin
    /// ([`CNI_BRIDGE`]), instead of the node's.
    pod_network: bool,
}

impl Pod {
    fn new(name: &'static str, handler: &'static str) -> Pod {
        Pod {
            name,
            handler,
            annotations: HashMap::new(),
            pod_network: false,
        }
    }
}

impl Cri {
    fn start(prefix: &str) -> Cri {
        let base = base_dir(prefix);
        let bin = moat_links(base.path());
        let p = |n: &str| s(&base.path().join(n));
        let moat_root = base.path().join("moat");
        // deploy/containerd/moat.toml as shipped, with the binaries under test
        // and a private state root for moat.
        let deploy = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/containerd/moat.toml"
        ))
        .expect("deploy/containerd/moat.toml");
        let mut handlers = String::new();
        for line in deploy.lines() {
            if let Some(rest) = line
                .trim_start()
                .strip_prefix("BinaryName = \"/usr/local/bin/")
            {
                let name = rest.trim_end_matches('"');
                handlers += &format!(
                    "    BinaryName = \"{}\"\n    Root = \"{}\"\n",
                    s(&bin.join(name)),
                    s(&moat_root)
                );
            } else {
                handlers += line;
                handlers.push('\n');
            }
        }
        assert_eq!(handlers.matches("Root = ").count(), 3, "{handlers}");
        let sock = p("c.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n  \
             sandbox_image = \"{PAUSE}\"\n  stream_server_address = \"127.0.0.1\"\n  \
             stream_server_port = \"0\"\n  enable_selinux = false\n  \
             restrict_oom_score_adj = {restrict}\n  \
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = \"{cni_bin}\"\n    \
             conf_dir = \"{cni}\"\n  \
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"native\"\n    \
             default_runtime_name = \"moat\"\n{handlers}",
            root = p("root"),
            state = p("state"),
            cni = p("cni"),
            cni_bin = CNI_BIN,
            restrict = !have_cap_sys_resource(),
        );
        let conf = p("config.toml");
        std::fs::write(&conf, config).expect("containerd config");
        // A pod network, for the pods that ask for one (the others are on
        // the node's): Debian's CNI bridge plugin, its addresses' records
        // in the test's directory.
        std::fs::create_dir_all(p("cni")).expect("CNI config directory");
        std::fs::write(
            base.path().join("cni").join("10-moat-test.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "moat-test",
                "plugins": [{
                    "type": "bridge",
                    "bridge": CNI_BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": CNI_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": p("cni-ipam"),
                    },
                }],
            })
            .to_string(),
        )
        .expect("CNI config");
        let cgroup_parent = format!(
            "/{}",
            base.path()
                .file_name()
                .expect("base name")
                .to_string_lossy()
        );
        let mut d = Daemon::start(base, "containerd", &["--config".into(), conf]);
        let s2 = sock.clone();
        d.wait_ready(|| sh("ctr", &["-a", &s2, "version"], &[]).ok());

        // The pause and workload images, from local files.
        let pause = serde_json::json!({"Entrypoint": ["/bin/sleep", "infinity"]});
        let app = serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]});
        let tar = oci_archive_of(d.path(), &[(PAUSE, pause), (IMAGE, app)]);
        sh(
            "ctr",
            &[
                "-a",
                &sock,
                "-n",
                K8S_NS,
                "images",
                "import",
                "--snapshotter",
                "native",
                &s(&tar),
            ],
            &[],
        )
        .expect_ok();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let channel = rt
            .block_on(connect(PathBuf::from(&sock)))
            .expect("connect to containerd's CRI socket");
        let mut c = Cri {
            rt,
            rs: RuntimeServiceClient::new(channel.clone()),
            is: ImageServiceClient::new(channel),
            moat_root,
            cgroup_parent,
            d,
        };
        // CRI sees images imported through ctr once it has caught the event.
        for image in [PAUSE, IMAGE] {
            let start = Instant::now();
            while !c.has_image(image) {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "CRI never lists {image}:\n{}",
                    c.d.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    fn has_image(&mut self, image: &str) -> bool {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let r = self.rt.block_on(self.is.image_status(req));
        r.expect("ImageStatus").into_inner().image.is_some()
    }

    fn pod_config(&self, pod: &Pod) -> cri::PodSandboxConfig {
        let logs = self.d.path().join("logs").join(pod.name);
        std::fs::create_dir_all(&logs).expect("pod log directory");
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.name.into(),
                uid: format!("uid-{}", pod.name),
                namespace: "default".into(),
                attempt: 0,
            }),
            // The kubelet sets none for a pod on the node's network (its
            // UTS namespace is the node's too).
            hostname: String::new(),
            log_directory: s(&logs),
            annotations: pod.annotations.clone(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod-{}", self.cgroup_parent, pod.name),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(pod.pod_network)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with the pod's runtime handler.
    fn run_pod(&mut self, pod: &Pod) -> Result<(String, cri::PodSandboxConfig), tonic::Status> {
        let config = self.pod_config(pod);
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: pod.handler.into(),
        };
        let r = self.rt.block_on(self.rs.run_pod_sandbox(req))?;
        Ok((r.into_inner().pod_sandbox_id, config))
    }

    fn pod_state(&mut self, id: &str) -> cri::PodSandboxState {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let r = self.rt.block_on(self.rs.pod_sandbox_status(req));
        let st = r.expect("PodSandboxStatus").into_inner().status;
        st.expect("a pod status").state()
    }

    /// CreateContainer of the busybox image running `cmd`, its log at
    /// `<pod log directory>/<name>.log`.
    fn create(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        cmd: &[&str],
        memory_limit: i64,
    ) -> Result<String, tonic::Status> {
        self.create_with(pod_id, pod, name, cmd, (memory_limit, 0), &[])
    }

    /// [`Cri::create`] with the OOM score adjustment the kubelet gives a
    /// pod's QoS class (-997 Guaranteed, 1000 BestEffort, in between
    /// Burstable).
    fn create_with(
        &mut self,
        pod_id: &str,
        pod: &cri::PodSandboxConfig,
        name: &str,
        cmd: &[&str],
        (memory_limit, oom_score_adj): (i64, i64),
        mounts: &[(&str, &Path)],
    ) -> Result<String, tonic::Status> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: cmd.iter().map(|a| a.to_string()).collect(),
            envs: vec![cri::KeyValue {
                key: "FOO".into(),
                value: "from-the-pod-spec".into(),
            }],
            log_path: format!("{name}.log"),
            // Read-write host directories (a hostPath or emptyDir volume).
            mounts: mounts
                .iter()
                .map(|(at, host)| cri::Mount {
                    container_path: at.to_string(),
                    host_path: host.display().to_string(),
                    ..Default::default()
                })
                .collect(),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: memory_limit,
                    oom_score_adj,
                    ..Default::default()
                }),
                // The restricted Pod Security Standard's choices:
                // `allowPrivilegeEscalation: false`, seccomp RuntimeDefault.
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(
                        pod.linux
                            .as_ref()
                            .and_then(|l| l.security_context.as_ref())
                            .and_then(|c| c.namespace_options.clone())
                            .unwrap_or_else(|| namespaces(false)),
                    ),
                    no_new_privs: true,
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        let r = self.rt.block_on(self.rs.create_container(req))?;
        Ok(r.into_inner().container_id)
    }

    fn start_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        let req = cri::StartContainerRequest {
            container_id: id.into(),
        };
        self.rt.block_on(self.rs.start_container(req)).map(drop)
    }

    fn status(&mut self, id: &str) -> cri::ContainerStatus {
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let r = self.rt.block_on(self.rs.container_status(req));
        r.expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a container status")
    }

    /// Waits (up to `limit`) until the container has exited; its status.
    fn wait_exited(&mut self, id: &str, limit: Duration) -> cri::ContainerStatus {
        let start = Instant::now();
        loop {
            let st = self.status(id);
            if st.state() == cri::ContainerState::ContainerExited {
                return st;
            }
            assert!(start.elapsed() < limit, "{id} never exited: {st:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// PortForward, as `kubectl port-forward` has the kubelet ask it: the
    /// streaming URL containerd answers, then a WebSocket to it (the
    /// kubelet's and kubectl's other choice, SPDY, has no client here)
    /// for `port`, `send` sent on the data channel; what came back on the
    /// data channel and on the error channel, once containerd closed it.
    fn port_forward(&mut self, pod_id: &str, port: u16, send: &[u8]) -> (Vec<u8>, String) {
        let req = cri::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: vec![i32::from(port)],
        };
        let url = self
            .rt
            .block_on(self.rs.port_forward(req))
            .unwrap_or_else(|e| panic!("PortForward: {e}\n{}", self.d.log()))
            .into_inner()
            .url;
        let (data, error) = websocket_port_forward(&url, port, send);
        (data, String::from_utf8_lossy(&error).into_owned())
    }

    /// ExecSync: (exit code, stdout, stderr).
    fn exec(&mut self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let req = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|a| a.to_string()).collect(),
            timeout: 120,
        };
        let r = self.rt.block_on(self.rs.exec_sync(req));
        let r = r.unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}\n{}", self.d.log()));
        let r = r.into_inner();
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    fn stop_container(&mut self, id: &str) {
        let req = cri::StopContainerRequest {
            container_id: id.into(),
            timeout: 2,
        };
        let r = self.rt.block_on(self.rs.stop_container(req));
        r.unwrap_or_else(|e| panic!("StopContainer {id}: {e}"));
    }

    fn remove_container(&mut self, id: &str) {
        let req = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        let r = self.rt.block_on(self.rs.remove_container(req));
        r.unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
    }

    /// StopPodSandbox (which stops its containers), then RemovePodSandbox.
    fn stop_and_remove_pod(&mut self, id: &str) {
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let r = self.rt.block_on(self.rs.stop_pod_sandbox(req));
        r.unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e}\n{}", self.d.log()));
        assert_eq!(self.pod_state(id), cri::PodSandboxState::SandboxNotready);
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let r = self.rt.block_on(self.rs.remove_pod_sandbox(req));
        r.unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e}\n{}", self.d.log()));
    }

    fn pod_ids(&mut self) -> Vec<String> {
        let r = self.rt.block_on(
            self.rs
                .list_pod_sandbox(cri::ListPodSandboxRequest::default()),
        );
        let items = r.expect("ListPodSandbox").into_inner().items;
        items.into_iter().map(|p| p.id).collect()
    }

    /// The tier moat recorded for a container (its state file under the
    /// handlers' `Root`), None when moat has no state for it.
    fn tier(&self, id: &str) -> Option<String> {
        let p = self.moat_root.join(K8S_NS).join(id).join("state.json");
        let text = std::fs::read_to_string(p).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).expect("moat state JSON");
        Some(
            v["tier"]
                .as_str()
                .expect("a tier in moat's state")
                .to_owned(),
        )
    }

    /// The pod whose microVM a container joined (moat's state), if it did.
    fn joined_pod(&self, id: &str) -> Option<String> {
        let p = self.moat_root.join(K8S_NS).join(id).join("state.json");
        let text = std::fs::read_to_string(p).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).expect("moat state JSON");
        v["tier_state"]["joined"]["pod"].as_str().map(str::to_owned)
    }

    /// The host PID moat recorded for a container's process.
    fn pid(&self, id: &str) -> i64 {
        let p = self.moat_root.join(K8S_NS).join(id).join("state.json");
        let text = std::fs::read_to_string(p).expect("moat state");
        let v: serde_json::Value = serde_json::from_str(&text).expect("moat state JSON");
        v["pid"].as_i64().expect("a pid in moat's state")
    }

    /// The CRI log of a container: (stream, line) pairs.
    fn log_lines(&self, pod: &str, name: &str) -> Vec<(String, String)> {
        let p = self
            .d
            .path()
            .join("logs")
            .join(pod)
            .join(format!("{name}.log"));
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                // "<RFC 3339 time> <stream> <P|F> <text>"
                let f: Vec<&str> = l.splitn(4, ' ').collect();
                (f.len() == 4).then(|| (f[1].to_owned(), f[3].to_owned()))
            })
            .collect()
    }

    /// Stops and removes every pod, then asserts nothing of them is left:
    /// no moat state, no shim or container process, no mount, no cgroup.
    fn remove_all_and_check_clean(&mut self, ids: &[String]) {
        for id in self.pod_ids() {
            self.stop_and_remove_pod(&id);
        }
        assert!(self.pod_ids().is_empty());
        let states = self.moat_root.join(K8S_NS);
        // `.cache` holds what moat compiles once for many containers.
        let left: Vec<_> = std::fs::read_dir(&states)
            .map(|r| r.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n != ".cache")
            .collect();
        assert!(left.is_empty(), "moat state left in {states:?}: {left:?}");
        // The shims exit once their last container is deleted.
        let base = s(self.d.path());
        let start = Instant::now();
        loop {
            let procs = processes_mentioning(&base, ids);
            if procs.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "processes left: {procs:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let left: Vec<&str> = mounts
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
            .collect();
        assert!(left.is_empty(), "mounts left: {left:?}");
        let cg = cgroups_named(&self.cgroup_parent, ids);
        assert!(cg.is_empty(), "cgroups left: {cg:?}");
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // Pods first, while containerd still answers (a failed test leaves
        // some); the Daemon guard then stops containerd, kills what is left
        // and unmounts.
        let r = self.rt.block_on(
            self.rs
                .list_pod_sandbox(cri::ListPodSandboxRequest::default()),
        );
        for p in r.map(|r| r.into_inner().items).unwrap_or_default() {
            let stop = cri::StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            };
            let _ = self.rt.block_on(self.rs.stop_pod_sandbox(stop));
            let rm = cri::RemovePodSandboxRequest {
                pod_sandbox_id: p.id,
            };
            let _ = self.rt.block_on(self.rs.remove_pod_sandbox(rm));
        }
        remove_cgroup_tree(&self.cgroup_parent);
    }
}

/// Debian's CNI plugins.
const CNI_BIN: &str = "/usr/lib/cni";
/// The pod network's bridge on the node, and its subnet.
const CNI_BRIDGE: &str = "moatcni0";
const CNI_SUBNET: &str = "10.213.0.0/24";

/// The namespaces the kubelet asks for by default: the pod's network (the
/// node's unless `pod_network`, then one the CNI plugin sets up) and IPC,
/// a PID namespace per container.
fn namespaces(pod_network: bool) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: if pod_network {
            cri::NamespaceMode::Pod as i32
        } else {
            cri::NamespaceMode::Node as i32
        },
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

async fn connect(sock: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(sock).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// Processes whose command line names `base` or one of `ids`.
fn processes_mentioning(base: &str, ids: &[String]) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("containerd --config") {
            continue; // the daemon itself
        }
        if cmd.contains(base) || ids.iter().any(|id| cmd.contains(id.as_str())) {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

/// The cgroup hierarchies' mount points (each v1 controller, or the v2 root).
fn cgroup_roots() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// Directories under `parent` in any hierarchy whose name holds one of `ids`.
fn cgroups_named(parent: &str, ids: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in cgroup_roots() {
        let mut stack = vec![root.join(parent.trim_start_matches('/'))];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    continue;
                }
                let n = e.file_name().to_string_lossy().into_owned();
                if ids.iter().any(|id| n.contains(id.as_str())) {
                    found.push(e.path());
                }
                stack.push(e.path());
            }
        }
    }
    found
}

/// Removes the test's parent cgroup in every hierarchy, deepest first (the
/// kubelet's job for its pod cgroups).
fn remove_cgroup_tree(parent: &str) {
    for root in cgroup_roots() {
        let top = root.join(parent.trim_start_matches('/'));
        let mut dirs = Vec::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if !d.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff). Without
/// it (some VMs' root lacks it) no runtime can give the pod sandbox the
/// kubelet's -998 OOM score adjustment; containerd is then told to
/// restrict adjustments to its own (`restrict_oom_score_adj`), as for a
/// containerd in a user namespace. With it, the sandbox gets -998.
fn have_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapEff");
    eff & (1 << 24) != 0
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("osrelease")
        .trim()
        .to_owned()
}

/// The host ID that container UID 0 maps to, from an exec's uid_map.
fn host_uid_of_root(uid_map: &str) -> Option<u64> {
    uid_map.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"0")).then(|| f.get(1)?.parse().ok())?
    })
}

fn wait_for_log(c: &Cri, pod: &str, name: &str, want: (&str, &str)) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let lines = c.log_lines(pod, name);
        if lines.iter().any(|(st, l)| st == want.0 && l == want.1) {
            return lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{want:?} never in {name}'s log: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn can_run_cri(test: &str) -> bool {
    can_run(test, &["containerd", "ctr", "containerd-shim-runc-v2"])
}

/// The whole life of a pod through the `moat` runtime handler, as the kubelet
/// drives it.
#[test]
fn cri_runs_a_pod_with_the_moat_handler() {
    if !can_run_cri("cri_runs_a_pod_with_the_moat_handler") {
        return;
    }
    let mut c = Cri::start("moat-k8s");
    let v = c.rt.block_on(c.rs.version(cri::VersionRequest::default()));
    let v = v.expect("Version").into_inner();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("containerd", "v1")
    );

    let pod = Pod::new("web", "moat");
    let (pod_id, pod_cfg) = c
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.d.log()));
    assert_eq!(c.pod_state(&pod_id), cri::PodSandboxState::SandboxReady);
    assert_eq!(
        c.tier(&pod_id).as_deref(),
        Some("container"),
        "the pause container is moat's"
    );
    // The sandbox's OOM score adjustment (-998 from containerd, restricted
    // to containerd's own, 0, where no process may lower it).
    let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", c.pid(&pod_id)));
    let want = if have_cap_sys_resource() { "-998" } else { "0" };
    assert_eq!(adj.expect("pause oom_score_adj").trim(), want);

    let cmd = [
        "sh",
        "-c",
        "echo hello-from-pod; echo to-stderr >&2; exec sleep 1000",
    ];
    // A Burstable pod's container: the kubelet's OOM score adjustment.
    let app = c
        .create_with(&pod_id, &pod_cfg, "app", &cmd, (256 << 20, 900), &[])
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.d.log()));
    assert_eq!(
        c.status(&app).state(),
        cri::ContainerState::ContainerCreated
    );
    c.start_container(&app)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.d.log()));
    let st = c.status(&app);
    assert_eq!(st.state(), cri::ContainerState::ContainerRunning, "{st:?}");
    assert_eq!(c.tier(&app).as_deref(), Some("container"));

    // Logs, in CRI's format, from the file containerd writes.
    let lines = wait_for_log(&c, "web", "app", ("stdout", "hello-from-pod"));
    wait_for_log(&c, "web", "app", ("stderr", "to-stderr"));
    assert!(lines.iter().all(|(_, l)| !l.is_empty()), "{lines:?}");

    // ExecSync: the pod spec's environment, exit status, both streams.
    let (code, out, err) = c.exec(&app, &["sh", "-c", "echo $FOO; echo oops >&2; exit 3"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (3, "from-the-pod-spec\n", "oops\n")
    );
    // The security context reached the process (and its execs): seccomp
    // filter, no_new_privs. CRI configs carry no user namespace, and moat
    // follows the config there: root inside is host root, as with runc
    // (docs/integrations.md).
    let (_, status, _) = c.exec(
        &app,
        &["grep", "-E", "^(Seccomp|NoNewPrivs):", "/proc/self/status"],
    );
    assert_eq!(status, "NoNewPrivs:\t1\nSeccomp:\t2\n");
    let (_, map, _) = c.exec(&app, &["cat", "/proc/self/uid_map"]);
    assert_eq!(host_uid_of_root(&map), Some(0), "{map}");
    // The OOM score adjustments the kubelet asked for, in the container and
    // in an exec (which containerd gives the container's process spec).
    let (_, adj, _) = c.exec(
        &app,
        &["cat", "/proc/1/oom_score_adj", "/proc/self/oom_score_adj"],
    );
    assert_eq!(adj, "900\n900\n");
    // A PID namespace of its own (the kubelet's default): the pause
    // container's `sleep infinity` is not in it; the pod's IPC namespace is
    // the pause container's.
    let (_, ps, _) = c.exec(&app, &["ps", "-o", "args"]);
    assert!(
        !ps.contains("sleep infinity") && ps.contains("sleep 1000"),
        "{ps}"
    );
    let pause_ipc = std::fs::read_link(format!("/proc/{}/ns/ipc", c.pid(&pod_id))).expect("ipc ns");
    let app_ipc = std::fs::read_link(format!("/proc/{}/ns/ipc", c.pid(&app))).expect("ipc ns");
    assert_eq!(pause_ipc, app_ipc, "one IPC namespace for the pod");

    // Stop: SIGTERM, then SIGKILL once the grace period ends (sh's exec'd
    // sleep is PID 1 and ignores SIGTERM).
    c.stop_container(&app);
    let st = c.wait_exited(&app, Duration::from_secs(30));
    assert_eq!(st.exit_code, 137, "{st:?}");
    // A container that runs to completion: its exit code and log.
    let done = c
        .create(
            &pod_id,
            &pod_cfg,
            "done",
            &["sh", "-c", "echo finished; exit 7"],
            0,
        )
        .expect("CreateContainer");
    c.start_container(&done).expect("StartContainer");
    let st = c.wait_exited(&done, Duration::from_secs(60));
    assert_eq!((st.exit_code, st.reason.as_str()), (7, "Error"), "{st:?}");
    wait_for_log(&c, "web", "done", ("stdout", "finished"));
    c.remove_container(&app);
    assert_eq!(c.tier(&app), None, "RemoveContainer deletes moat's state");

    c.remove_all_and_check_clean(&[pod_id, app, done]);
}

/// A container that exceeds its memory limit is OOM-killed inside its own
/// cgroup, and CRI reports it as the kubelet expects: reason `OOMKilled`.
/// Under `moat-microvm` the kill is the guest kernel's, in the guest's
/// cgroup, which containerd never sees: the VMM echoes it in the
/// container's cgroup on the host once the VM is gone (before, the reason
/// was `Error`).
#[test]
fn cri_reports_an_oom_killed_container() {
    if !can_run_cri("cri_reports_an_oom_killed_container") {
        return;
    }
    let mut c = Cri::start("moat-k8s-oom");
    let mut ids = Vec::new();
    for (name, handler) in [("hog", "moat"), ("vmhog", "moat-microvm")] {
        let pod = Pod::new(name, handler);
        let (pod_id, pod_cfg) = c
            .run_pod(&pod)
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.d.log()));
        // A string that doubles until it is far over 32 MiB. (Not one
        // large block: a guest of ~200 MiB refuses a 256 MiB allocation
        // outright, as its kernel's overcommit heuristic says.)
        // It waits for the test's word (an exec), so that moat's state of
        // it can be read while it runs (containerd deletes it once it
        // ends).
        let cmd = [
            "sh",
            "-c",
            "until [ -e /tmp/go ]; do sleep 0.1; done; exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'",
        ];
        let hog = c
            .create(&pod_id, &pod_cfg, "hog", &cmd, 32 << 20)
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.d.log()));
        c.start_container(&hog)
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.d.log()));
        if handler == "moat-microvm" {
            // It runs in the pod's VM; the kill there is echoed in its own
            // cgroup by the host process that stands for it.
            assert_eq!(c.joined_pod(&hog).as_deref(), Some(pod_id.as_str()));
        }
        let (code, out, err) = c.exec(&hog, &["touch", "/tmp/go"]);
        assert_eq!(code, 0, "{handler}: {out} {err}");
        // A microVM on a loaded machine may boot cold first.
        let st = c.wait_exited(&hog, Duration::from_secs(180));
        assert_eq!(
            (st.reason.as_str(), st.exit_code),
            ("OOMKilled", 137),
            "{handler}: {st:?}"
        );

        // The pod itself lives on.
        assert_eq!(c.pod_state(&pod_id), cri::PodSandboxState::SandboxReady);
        ids.extend([pod_id, hog]);
    }
    c.remove_all_and_check_clean(&ids);
}

/// A pod of each runtime handler in deploy/ runs its tier, and the pod
/// annotation `dev.moat.isolation` (passed through by `pod_annotations`)
/// raises the tier of a pod whose handler is `moat`. A `moat-microvm`
/// pod's container with a read-write volume joins the pod's VM through
/// its share, unless the pod's annotation `dev.moat.pod.volumes: none`
/// left the VM without one: then it gets a VM of its own.
#[test]
fn cri_runs_every_handler_and_the_tier_annotation() {
    if !can_run_cri("cri_runs_every_handler_and_the_tier_annotation") {
        return;
    }
    let mut c = Cri::start("moat-k8s-tiers");
    let mut ids = Vec::new();

    let mut annotated = Pod::new("annotated", "moat");
    annotated
        .annotations
        .insert("dev.moat.isolation".into(), "sandbox".into());
    let mut unshared = Pod::new("vm-unshared", "moat-microvm");
    unshared
        .annotations
        .insert("dev.moat.pod.volumes".into(), "none".into());
    for (pod, tier) in [
        (annotated, "sandbox"),
        (Pod::new("sandboxed", "moat-sandbox"), "sandbox"),
        (Pod::new("vm", "moat-microvm"), "microvm"),
        (unshared, "microvm"),
    ] {
        let (pod_id, pod_cfg) = c
            .run_pod(&pod)
            .unwrap_or_else(|e| panic!("RunPodSandbox {}: {e}\n{}", pod.name, c.d.log()));
        // A microvm pod's pause container boots the pod's VM.
        assert_eq!(
            c.tier(&pod_id).as_deref(),
            Some(tier),
            "{}'s pause container",
            pod.name
        );
        let cmd = [
            "sh",
            "-c",
            "echo \"from $(uname -r)\" > /data/app; echo \"kernel $(uname -r)\"; exec sleep 1000",
        ];
        // A read-write volume (as a hostPath or emptyDir gives), writable
        // by the container's host IDs.
        let vol = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            vol.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let app = c
            .create_with(
                &pod_id,
                &pod_cfg,
                "app",
                &cmd,
                (0, 0),
                &[("/data", vol.path())],
            )
            .unwrap_or_else(|e| panic!("CreateContainer {}: {e}\n{}", pod.name, c.d.log()));
        c.start_container(&app)
            .unwrap_or_else(|e| panic!("StartContainer {}: {e}\n{}", pod.name, c.d.log()));
        assert_eq!(
            c.tier(&app).as_deref(),
            Some(tier),
            "{}'s container",
            pod.name
        );
        // A microVM pod's container with a read-write volume joins the
        // pod's VM (its volume bound into the VM's share), unless the pod
        // asked for no share.
        let joins = tier == "microvm"
            && pod
                .annotations
                .get("dev.moat.pod.volumes")
                .map(String::as_str)
                != Some("none");
        assert_eq!(
            c.joined_pod(&app),
            joins.then(|| pod_id.clone()),
            "{}",
            pod.name
        );
        let start = Instant::now();
        let kernel = loop {
            let lines = c.log_lines(pod.name, "app");
            if let Some((_, l)) = lines
                .iter()
                .find(|(s, l)| s == "stdout" && l.starts_with("kernel "))
            {
                break l["kernel ".len()..].to_owned();
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{}: no kernel line: {lines:?}",
                pod.name
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // (The sandbox tier's default policy lets the workload read, not
        // write, its volumes.)
        if tier == "microvm" {
            assert_eq!(
                std::fs::read_to_string(vol.path().join("app")).unwrap_or_default(),
                format!("from {kernel}\n"),
                "{}: the volume is the host directory",
                pod.name
            );
        }
        match tier {
            "microvm" => assert_ne!(kernel, host_kernel(), "the guest's own kernel"),
            // The supervisor answers uname with the policy's release.
            "sandbox" => assert_eq!(kernel, moat_sandbox::policy::DEFAULT_RELEASE),
            _ => assert_eq!(kernel, host_kernel()),
        }
        let (code, out, _) = c.exec(&app, &["sh", "-c", "echo in-$FOO; exit 4"]);
        assert_eq!(
            (code, out.as_str()),
            (4, "in-from-the-pod-spec\n"),
            "{}",
            pod.name
        );
        c.stop_and_remove_pod(&pod_id);
        ids.extend([pod_id, app]);
    }
    c.remove_all_and_check_clean(&ids);
}

/// A `moat-microvm` pod that asks for moat's network through pod
/// annotations (`pod_annotations` in deploy/containerd/moat.toml passes
/// them to every container of the pod): its container's guest gets the
/// stack, with the port it publishes answering on the node (the pod is on
/// the node's network here). The stack is the pod VM's, booted by the
/// pause container; the pod's container joins that VM and serves on its
/// network.
#[test]
fn cri_gives_a_microvm_pods_container_the_stacks_network() {
    if !can_run_cri("cri_gives_a_microvm_pods_container_the_stacks_network") {
        return;
    }
    let mut c = Cri::start("moat-k8s-net");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut pod = Pod::new("web", "moat-microvm");
    pod.annotations
        .insert("dev.moat.net.egress".into(), String::new());
    pod.annotations.insert(
        "dev.moat.net.publish".into(),
        format!("127.0.0.1:{port}:8000"),
    );
    let (pod_id, cfg) = c
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.d.log()));
    assert_eq!(c.tier(&pod_id).as_deref(), Some("microvm"));
    let cmd = ["sh", "-c", GUEST_SERVER];
    let app = c
        .create(&pod_id, &cfg, "web", &cmd, 0)
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.d.log()));
    c.start_container(&app)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.d.log()));
    assert_eq!(c.tier(&app).as_deref(), Some("microvm"));
    assert_eq!(c.joined_pod(&app).as_deref(), Some(pod_id.as_str()));
    assert_guest_serves(&format!("http://127.0.0.1:{port}"));
    c.stop_and_remove_pod(&pod_id);
    c.remove_all_and_check_clean(&[pod_id, app]);
}

/// A `moat-microvm` pod on a pod network (the CNI bridge plugin), as a
/// Kubernetes pod is: the pod's VM (its pause container's) takes over the
/// pod's interface, so the pod's address — the one CRI reports — reaches
/// the guest's kernel from the node, with no annotation; the pod's
/// containers join that VM and share its network: one `localhost`.
#[test]
fn cri_gives_a_microvm_pods_container_the_pods_address() {
    if !can_run_cri("cri_gives_a_microvm_pods_container_the_pods_address") {
        return;
    }
    let mut c = Cri::start("moat-k8s-podip");
    let mut pod = Pod::new("podip", "moat-microvm");
    pod.pod_network = true;
    let (pod_id, cfg) = c
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.d.log()));
    // The bridge is the node's until the test ends, however it ends.
    struct Bridge;
    impl Drop for Bridge {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", CNI_BRIDGE])
                .output();
        }
    }
    let _bridge = Bridge;
    assert_eq!(c.tier(&pod_id).as_deref(), Some("microvm"));
    let req = cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod_id.clone(),
        verbose: false,
    };
    let status =
        c.rt.block_on(c.rs.pod_sandbox_status(req))
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("a pod status");
    let ip = status.network.expect("the pod's network").ip;
    assert!(ip.starts_with("10.213.0."), "the pod's address: {ip:?}");
    // An emptyDir the two containers share (where the kubelet makes them):
    // in the pod's guest.
    let kubelet = tempfile::tempdir().unwrap();
    let empty_dir = kubelet
        .path()
        .join("pods/u1/volumes/kubernetes.io~empty-dir/notes");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let server = format!("echo shared-note > /notes/n; {GUEST_SERVER}");
    let cmd = ["sh", "-c", server.as_str()];
    let notes = [("/notes", empty_dir.as_path())];
    let app = c
        .create_with(&pod_id, &cfg, "web", &cmd, (0, 0), &notes)
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.d.log()));
    c.start_container(&app)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.d.log()));
    assert_eq!(c.tier(&app).as_deref(), Some("microvm"));
    assert_eq!(c.joined_pod(&app).as_deref(), Some(pod_id.as_str()));
    assert_guest_serves(&format!("http://{ip}:8000"));
    // A second container of the pod (a sidecar) joins the same VM: it
    // reaches the first's server on `localhost` and the node from the
    // pod's address, while the first keeps serving on it.
    let gateway = CNI_SUBNET.replace(".0/24", ".1");
    let node = OneConnection::listen(&gateway);
    let cmd = [
        "sh",
        "-c",
        &format!(
            "echo sidecar-up; echo sidecar-err >&2; (wget -qO- http://127.0.0.1:8000/f; cat /notes/n; echo from-the-sidecar) | nc -w 10 {gateway} {}; sleep 600",
            node.port
        ),
    ];
    let sidecar = c
        .create_with(&pod_id, &cfg, "sidecar", &cmd, (0, 0), &notes)
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.d.log()));
    c.start_container(&sidecar)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.d.log()));
    assert_eq!(c.tier(&sidecar).as_deref(), Some("microvm"));
    assert_eq!(c.joined_pod(&sidecar).as_deref(), Some(pod_id.as_str()));
    let (peer, text) = node.wait();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(peer, ip, "the sidecar's address is the pod's");
    assert!(
        text.starts_with("inside-")
            && !text.contains(host.trim())
            && text.ends_with("\nshared-note\nfrom-the-sidecar\n"),
        "the app's server, reached by the sidecar on localhost, and the app's note in their emptyDir: {text:?}"
    );
    assert_eq!(std::fs::read_dir(&empty_dir).unwrap().count(), 0);
    // Its stdio is the engine's: both streams in its CRI log.
    wait_for_log(&c, "podip", "sidecar", ("stdout", "sidecar-up"));
    wait_for_log(&c, "podip", "sidecar", ("stderr", "sidecar-err"));
    // They share the pod's hostname (its UTS namespace), not their
    // process trees.
    let (_, app_host, _) = c.exec(&app, &["hostname"]);
    let (_, car_host, _) = c.exec(&sidecar, &["hostname"]);
    assert_eq!(app_host, car_host);
    let (_, car_ps, _) = c.exec(&sidecar, &["ps", "-o", "args"]);
    assert!(
        !car_ps.contains("httpd"),
        "the sidecar's processes: {car_ps}"
    );
    assert_guest_serves(&format!("http://{ip}:8000"));
    // `kubectl port-forward`: containerd connects to localhost:8000 inside
    // the pod's namespace, which reaches the guest's server.
    let (data, error) = c.port_forward(&pod_id, 8000, b"GET /f HTTP/1.0\r\n\r\n");
    let data = String::from_utf8_lossy(&data);
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        data.starts_with("HTTP/1.") && data.contains("inside-") && !data.contains(host.trim()),
        "the guest's server through the port forward: {data:?} (errors: {error:?})"
    );
    c.stop_and_remove_pod(&pod_id);
    c.remove_all_and_check_clean(&[pod_id, app, sidecar]);
}
