//! `moat run IMAGE`: rootfs tarballs (plain, gzip, zstd), directories, OCI
//! layouts and docker archives built here from busybox-static, images built
//! by the real tools (podman, skopeo, umoci), and hostile archives that must
//! be refused with nothing written outside the cache.
mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{Opts, Rt};

fn rt(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat-only");
        return None;
    }
    if !Path::new("/bin/busybox").exists() {
        moat_core::testing::skip(test, "needs /bin/busybox (busybox-static)");
        return None;
    }
    Some(rt)
}

/// A scratch directory the container's unmapped host user can traverse.
fn fixtures() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("moat-e2e-img-")
        .tempdir()
        .unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o711)).unwrap();
    t
}

/// A busybox root: /bin/busybox, /bin/sh, /etc/passwd with user `app`
/// (1000), an empty /work.
fn busybox_root(dir: &Path) -> PathBuf {
    let r = dir.join("rootfs");
    fs::create_dir_all(r.join("bin")).unwrap();
    fs::create_dir_all(r.join("etc")).unwrap();
    fs::create_dir_all(r.join("work")).unwrap();
    fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    symlink("busybox", r.join("bin/sh")).unwrap();
    fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/work:/bin/sh\n",
    )
    .unwrap();
    r
}

/// Runs `prog args`, which must succeed; its stdout. Through the harness,
/// whose reaper would otherwise take the child's exit status.
#[track_caller]
fn tool(prog: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = common::run_binary(
        Path::new(prog),
        &args,
        common::Opts::default(),
        &dir.path().join("out"),
        &dir.path().join("err"),
    );
    assert!(out.ok(), "{prog} {args:?}: {out:?}");
    out.stdout
}

fn sh(cmd: &str) {
    tool("sh", &["-c", cmd]);
}

fn sha256(p: &Path) -> String {
    tool("sha256sum", &[p.to_str().unwrap()])[..64].to_string()
}

/// Moves `p` into `blobs/sha256/<digest>` of `layout`; returns the digest.
fn blob(layout: &Path, p: &Path) -> (String, u64) {
    let d = sha256(p);
    let size = fs::metadata(p).unwrap().len();
    fs::rename(p, layout.join("blobs/sha256").join(&d)).unwrap();
    (format!("sha256:{d}"), size)
}

const PROBE: &str = "echo \"cwd=$(pwd) greet=$GREET id=$(id -u)\"";

fn config_json(diff_id: &str) -> String {
    serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREET=hello"], "Entrypoint": ["/bin/sh", "-c"],
                   "Cmd": [PROBE], "WorkingDir": "/work", "User": "app"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    })
    .to_string()
}

#[test]
fn tarballs_and_directories() {
    let Some(rt) = rt("tarballs_and_directories") else {
        return;
    };
    let t = fixtures();
    let r = busybox_root(t.path());
    let d = t.path().display();
    sh(&format!("tar -C {d}/rootfs -cf {d}/r.tar . && tar -C {d}/rootfs -czf {d}/r.tgz . && tar -C {d}/rootfs --zstd -cf {d}/r.tar.zst ."));
    for img in ["r.tar", "r.tgz", "r.tar.zst"] {
        let p = t.path().join(img);
        let out = rt
            .cmd(&[
                "run",
                p.to_str().unwrap(),
                "--",
                "/bin/busybox",
                "cat",
                "/etc/passwd",
            ])
            .expect_ok();
        assert!(out.stdout.contains("app:x:1000"), "{img}: {}", out.stdout);
    }
    // A second run reuses the cache: one entry per tarball.
    rt.cmd(&[
        "run",
        t.path().join("r.tar").to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "true",
    ])
    .expect_ok();
    let list = rt.cmd(&["images"]).expect_ok();
    assert_eq!(list.stdout.lines().count(), 4, "{}", list.stdout);
    // A directory, and -w/-e/-u over it.
    let out = rt
        .cmd(&[
            "run",
            "-w",
            "/work",
            "-e",
            "GREET=dir",
            "-u",
            "1000",
            r.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            PROBE,
        ])
        .expect_ok();
    assert_eq!(out.stdout.trim(), "cwd=/work greet=dir id=1000");
    // An image without a command, with none given: one clear error.
    let out = rt.cmd(&["run", r.to_str().unwrap()]).expect_fail();
    assert!(out.stderr.contains("no command"), "{}", out.stderr);
    // `--` first: the embedded default, even with a path.
    let out = rt.cmd(&["run", "--", "/bin/echo", "default"]).expect_ok();
    assert_eq!(out.stdout.trim(), "default");
    // The embedded run filled the runtime's caches (prebuilt root,
    // compiled seccomp program); a full prune clears them with the images.
    assert!(rt.root().join(".cache/rootfs").is_dir());
    assert!(rt.root().join(".cache/seccomp").is_dir());
    rt.cmd(&["prune"]).expect_ok();
    assert_eq!(rt.cmd(&["images"]).expect_ok().stdout.lines().count(), 1);
    assert!(!rt.root().join(".cache").exists());
    let out = rt.cmd(&["run", "--", "/bin/echo", "again"]).expect_ok();
    assert_eq!(out.stdout.trim(), "again");
}

#[test]
fn oci_layout_and_docker_archive() {
    let Some(rt) = rt("oci_layout_and_docker_archive") else {
        return;
    };
    let t = fixtures();
    busybox_root(t.path());
    let d = t.path().display();
    // OCI layout, by hand: a gzip layer, config, manifest, index.json.
    let layout = t.path().join("layout");
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    sh(&format!(
        "tar -C {d}/rootfs -cf {d}/layer.tar . && gzip -k {d}/layer.tar"
    ));
    let diff_id = format!("sha256:{}", sha256(&t.path().join("layer.tar")));
    let (layer, lsize) = blob(&layout, &t.path().join("layer.tar.gz"));
    fs::write(t.path().join("config"), config_json(&diff_id)).unwrap();
    let (config, csize) = blob(&layout, &t.path().join("config"));
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": csize},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": lsize}]
    });
    fs::write(t.path().join("manifest"), manifest.to_string()).unwrap();
    let (mdigest, msize) = blob(&layout, &t.path().join("manifest"));
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let oci = format!("oci:{}:v1", layout.display());
    // The image's Entrypoint, Cmd, Env, WorkingDir and User apply.
    let out = rt.cmd(&["run", &oci, "--"]).expect_ok();
    assert_eq!(out.stdout.trim(), "cwd=/work greet=hello id=1000");
    // CMD replaces Cmd, the Entrypoint (sh -c) stays.
    let out = rt
        .cmd(&["run", &oci, "--", "echo replaced $GREET"])
        .expect_ok();
    assert_eq!(out.stdout.trim(), "replaced hello");
    let out = rt
        .cmd(&["run", &format!("oci:{}:nope", layout.display()), "--"])
        .expect_fail();
    assert!(out.stderr.contains("nope"), "{}", out.stderr);

    // docker save layout: manifest.json + config + <id>/layer.tar.
    let da = t.path().join("da");
    fs::create_dir_all(da.join("abc")).unwrap();
    fs::copy(t.path().join("layer.tar"), da.join("abc/layer.tar")).unwrap();
    fs::write(da.join("cfg.json"), config_json(&diff_id)).unwrap();
    fs::write(
        da.join("manifest.json"),
        r#"[{"Config":"cfg.json","RepoTags":["bb:latest"],"Layers":["abc/layer.tar"]}]"#,
    )
    .unwrap();
    sh(&format!(
        "tar -C {d}/da -cf {d}/docker.tar manifest.json cfg.json abc"
    ));
    for arg in [
        t.path().join("docker.tar").display().to_string(),
        format!("docker-archive:{d}/docker.tar"),
    ] {
        let out = rt.cmd(&["run", &arg, "--"]).expect_ok();
        assert_eq!(out.stdout.trim(), "cwd=/work greet=hello id=1000", "{arg}");
    }
    // A tampered blob is refused.
    let lp = layout.join("blobs/sha256").join(&layer["sha256:".len()..]);
    sh(&format!(
        "gzip -dc {} | gzip -9 > {d}/re.gz && cat {d}/re.gz > {}",
        lp.display(),
        lp.display()
    ));
    rt.cmd(&["prune"]).expect_ok();
    let out = rt.cmd(&["run", &oci, "--"]).expect_fail();
    assert!(out.stderr.contains("digest mismatch"), "{}", out.stderr);
}

/// A ustar header + data for one entry, written by hand (tar(1) refuses
/// to write most of these).
fn entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn hostile_archives_are_refused() {
    let Some(rt) = rt("hostile_archives_are_refused") else {
        return;
    };
    let t = fixtures();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let o = outside.display().to_string();
    let evil_abs = format!("{o}/abs-evil");
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "dotdot",
            entry("../../../../../../../../../../../..", b'5', "", b""),
            String::new(),
        ),
        (
            "dotdot-file",
            entry(
                &format!("../../../../../../../../..{o}/dd-evil"),
                b'0',
                "",
                b"x",
            ),
            format!("{o}/dd-evil"),
        ),
        (
            "absolute",
            entry(&evil_abs, b'0', "", b"x"),
            evil_abs.clone(),
        ),
        (
            "symlink-then-write",
            [
                entry("link", b'2', &o, b""),
                entry("link/sl-evil", b'0', "", b"x"),
            ]
            .concat(),
            format!("{o}/sl-evil"),
        ),
        (
            "hardlink",
            entry("passwd", b'1', "/etc/passwd", b""),
            String::new(),
        ),
    ];
    for (what, mut body, outside_path) in cases {
        body.extend_from_slice(&[0u8; 1024]);
        let p = t.path().join(format!("{what}.tar"));
        fs::write(&p, body).unwrap();
        let out = rt
            .cmd(&["run", p.to_str().unwrap(), "--", "/bin/sh", "-c", "true"])
            .expect_fail();
        let err = out.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(err.contains("refused archive entry"), "{what}: {err}");
        if !outside_path.is_empty() {
            assert!(!Path::new(&outside_path).exists(), "{what}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{what}");
    }
    // Nothing half-unpacked stays in the cache.
    let list = rt.cmd(&["images"]).expect_ok();
    assert_eq!(list.stdout.lines().count(), 1, "{}", list.stdout);
    let tmp = rt.root().join(".images/tmp");
    assert_eq!(fs::read_dir(&tmp).map(|r| r.count()).unwrap_or(0), 0);
}

/// True when every program in `progs` is on PATH. A missing one fails the
/// test under CI (`CI` set and not empty), where scripts/deps --test has
/// installed them; elsewhere the test prints why it skips.
fn tools(test: &str, progs: &[&str]) -> bool {
    for p in progs {
        let found = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
            .unwrap_or(false);
        if !found {
            moat_core::testing::skip(
                test,
                &format!("{p} is not installed (scripts/deps --test installs it)"),
            );
            return false;
        }
    }
    true
}

/// `podman` with storage of its own under `dir` (vfs: no mounts), so
/// nothing reaches the host's image store.
fn podman(dir: &Path, args: &[&str]) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    let mut a = vec![
        "--root".to_string(),
        p("root"),
        "--runroot".into(),
        p("runroot"),
        "--tmpdir".into(),
        p("tmp"),
        "--storage-driver".into(),
        "vfs".into(),
        "--events-backend".into(),
        "file".into(),
        "--cgroup-manager".into(),
        "cgroupfs".into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    tool("podman", &a)
}

#[test]
fn podman_and_skopeo_images() {
    let test = "podman_and_skopeo_images";
    let Some(rt) = rt(test) else { return };
    if !tools(test, &["podman", "skopeo"]) {
        return;
    }
    let t = fixtures();
    busybox_root(t.path());
    let d = t.path().display().to_string();
    sh(&format!("tar -C {d}/rootfs -cf {d}/bb.tar ."));
    let store = t.path().join("podman");
    podman(
        &store,
        &[
            "import",
            "--change",
            "ENV=GREET=podman",
            "--change",
            "WORKDIR=/work",
            "--change",
            "USER=app",
            "--change",
            &format!("CMD [\"/bin/sh\", \"-c\", {PROBE:?}]"),
            &format!("{d}/bb.tar"),
            "moatbb",
        ],
    );
    podman(
        &store,
        &[
            "save",
            "--format",
            "docker-archive",
            "-o",
            &format!("{d}/da.tar"),
            "moatbb",
        ],
    );
    podman(
        &store,
        &[
            "save",
            "--format",
            "oci-dir",
            "-o",
            &format!("{d}/ocidir"),
            "moatbb",
        ],
    );
    tool(
        "skopeo",
        &[
            "copy",
            "-q",
            &format!("docker-archive:{d}/da.tar"),
            &format!("oci:{d}/sk:v1"),
        ],
    );
    // The image's Cmd, Env, WorkingDir and User (podman import --change)
    // apply whichever way it was saved.
    for img in [
        format!("{d}/da.tar"),
        format!("docker-archive:{d}/da.tar"),
        format!("oci:{d}/ocidir:latest"),
        format!("oci:{d}/sk:v1"),
    ] {
        let out = rt.cmd(&["run", &img]).expect_ok();
        assert_eq!(out.stdout.trim(), "cwd=/work greet=podman id=1000", "{img}");
        let out = rt
            .cmd(&["run", &img, "--", "/bin/busybox", "cat", "/etc/passwd"])
            .expect_ok();
        assert!(out.stdout.contains("app:x:1000"), "{img}: {}", out.stdout);
    }
}

/// The names in the gzip layer blobs of an OCI layout.
fn layer_names(layout: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let head = fs::read(&p).unwrap();
        if head.starts_with(&[0x1f, 0x8b]) {
            names.extend(
                tool("tar", &["-tzf", p.to_str().unwrap()])
                    .lines()
                    .map(String::from),
            );
        }
    }
    names
}

/// An OCI layout made by umoci: a base layer, then a layer that deletes a
/// file and a directory tree (whiteouts), replaces a directory's contents
/// and overwrites a file. Returns the layout; its tags are `base` and `v2`.
fn umoci_layout(t: &Path) -> PathBuf {
    let lay = t.join("lay");
    let l = lay.display().to_string();
    let b1 = t.join("b1");
    let b2 = t.join("b2");
    tool("umoci", &["init", "--layout", &l]);
    tool("umoci", &["new", "--image", &format!("{l}:base")]);
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{l}:base"),
            b1.to_str().unwrap(),
        ],
    );
    let src = busybox_root(&t.join("src"));
    let r1 = b1.join("rootfs");
    sh(&format!("cp -a {}/. {}/", src.display(), r1.display()));
    for dir in ["gone/sub", "opq"] {
        fs::create_dir_all(r1.join(dir)).unwrap();
    }
    for (f, text) in [
        ("etc/ver", "v1"),
        ("etc/del", "bye"),
        ("gone/sub/f", "x"),
        ("opq/old", "o"),
        ("work/secret", "s3cret"),
    ] {
        fs::write(r1.join(f), text).unwrap();
    }
    std::os::unix::fs::chown(r1.join("work/secret"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(r1.join("work/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    tool(
        "umoci",
        &[
            "repack",
            "--image",
            &format!("{l}:base"),
            b1.to_str().unwrap(),
        ],
    );
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{l}:base"),
            b2.to_str().unwrap(),
        ],
    );
    let r2 = b2.join("rootfs");
    fs::remove_file(r2.join("etc/del")).unwrap();
    fs::remove_dir_all(r2.join("gone")).unwrap();
    fs::remove_dir_all(r2.join("opq")).unwrap();
    fs::create_dir(r2.join("opq")).unwrap();
    fs::write(r2.join("opq/new"), "n").unwrap();
    fs::write(r2.join("etc/ver"), "v2").unwrap();
    tool(
        "umoci",
        &[
            "repack",
            "--image",
            &format!("{l}:v2"),
            b2.to_str().unwrap(),
        ],
    );
    lay
}

#[test]
fn umoci_layers_and_whiteouts() {
    let test = "umoci_layers_and_whiteouts";
    let Some(rt) = rt(test) else { return };
    if !tools(test, &["umoci"]) {
        return;
    }
    let t = fixtures();
    let lay = umoci_layout(t.path());
    // The second layer really carries whiteouts (umoci writes one per
    // removed name; it makes no opaque directories).
    let names = layer_names(&lay);
    for w in ["etc/.wh.del", ".wh.gone", "opq/.wh.old"] {
        assert!(
            names.iter().any(|n| n.trim_start_matches("./") == w),
            "{w} in {names:?}"
        );
    }
    let l = lay.display();
    let look = "cat /etc/ver; echo; for p in /etc/del /gone /opq/old /opq/new; do \
                test -e $p && echo \"has $p\"; done; true";
    let out = rt
        .cmd(&["run", &format!("oci:{l}:v2"), "--", "/bin/sh", "-c", look])
        .expect_ok();
    assert_eq!(out.stdout.trim(), "v2\nhas /opq/new", "{}", out.stdout);
    let out = rt
        .cmd(&["run", &format!("oci:{l}:base"), "--", "/bin/sh", "-c", look])
        .expect_ok();
    assert_eq!(
        out.stdout.trim(),
        "v1\nhas /etc/del\nhas /gone\nhas /opq/old",
        "{}",
        out.stdout
    );
    // umoci recorded the owner of /work/secret; the container sees it.
    let out = rt
        .cmd(&[
            "run",
            "-u",
            "1000",
            &format!("oci:{l}:v2"),
            "--",
            "/bin/sh",
            "-c",
            "stat -c %u:%a /work/secret; cat /work/secret",
        ])
        .expect_ok();
    assert_eq!(out.stdout, "1000:600\ns3cret");
}

/// Mounts whose mount point is under `dir`, from our own mountinfo (moat
/// runs in the test's mount namespace).
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| m == dir || m.starts_with(&format!("{dir}/")))
        })
        .map(String::from)
        .collect()
}

/// Everything about the cache's entries and layers that a run could change: each
/// path's type, mode, owner, size, mtime, ctime, link target and contents
/// (`last-used` aside: runs touch it on purpose).
fn cache_snapshot(root: &Path) -> Vec<(String, String, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    fn walk(base: &Path, p: &Path, out: &mut Vec<(String, String, Vec<u8>)>) {
        let md = fs::symlink_metadata(p).unwrap();
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        if rel.ends_with("last-used") {
            return;
        }
        let meta = format!(
            "{:o} {}:{} {} {}.{} {}.{}",
            md.mode(),
            md.uid(),
            md.gid(),
            md.size(),
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec()
        );
        let body = if md.file_type().is_symlink() {
            fs::read_link(p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else if md.is_file() {
            fs::read(p).unwrap()
        } else {
            Vec::new()
        };
        out.push((rel, meta, body));
        if md.is_dir() {
            let mut names: Vec<PathBuf> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            for n in names {
                walk(base, &n, out);
            }
        }
    }
    let mut out = Vec::new();
    for dir in ["sha256", "layers"] {
        let base = root.join(".images").join(dir);
        walk(&base, &base, &mut out);
    }
    out
}

/// A busybox tarball whose /work/secret belongs to 1000:1000, mode 0600,
/// and with no command in it.
fn owned_tarball(t: &Path) -> PathBuf {
    let r = busybox_root(t);
    fs::write(r.join("work/secret"), "s3cret").unwrap();
    std::os::unix::fs::chown(r.join("work/secret"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(r.join("work/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let tar = t.join("owned.tar");
    sh(&format!(
        "tar --numeric-owner -C {} -cf {} .",
        r.display(),
        tar.display()
    ));
    tar
}

#[test]
fn image_files_keep_their_owners() {
    let Some(rt) = rt("image_files_keep_their_owners") else {
        return;
    };
    let t = fixtures();
    let tar = owned_tarball(t.path());
    let img = tar.to_str().unwrap();
    let read = "stat -c %u:%g:%a /work/secret; cat /work/secret 2>&1; echo; echo rc=$?";
    let out = rt
        .cmd(&["run", "-u", "1000", img, "--", "/bin/sh", "-c", read])
        .expect_ok();
    assert_eq!(out.stdout, "1000:1000:600\ns3cret\nrc=0\n");
    let out = rt
        .cmd(&[
            "run",
            "-u",
            "1001",
            img,
            "--",
            "/bin/sh",
            "-c",
            "cat /work/secret",
        ])
        .expect_fail();
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    // The image's root-owned files belong to the container's root.
    let out = rt
        .cmd(&[
            "run",
            img,
            "--",
            "/bin/busybox",
            "stat",
            "-c",
            "%u:%g",
            "/etc/passwd",
            "/",
        ])
        .expect_ok();
    assert_eq!(out.stdout, "0:0\n0:0\n");
    // Only root can reach the cache on the host.
    let md = fs::metadata(rt.root().join(".images")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    assert!(mounts_under(rt.root()).is_empty());
}

#[test]
fn read_write_images_never_touch_the_cache() {
    let Some(rt) = rt("read_write_images_never_touch_the_cache") else {
        return;
    };
    let t = fixtures();
    let tar = owned_tarball(t.path());
    let img = tar.to_str().unwrap();
    // Read-only by default: the root refuses writes, even root's (`-u 0`:
    // an image without User runs as nobody).
    let out = rt
        .cmd(&[
            "run",
            "-u",
            "0",
            img,
            "--",
            "/bin/sh",
            "-c",
            "echo x > /etc/x",
        ])
        .expect_fail();
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    let before = cache_snapshot(rt.root());
    assert!(before
        .iter()
        .any(|(p, _, _)| p.ends_with("diff/etc/passwd")));
    // Root in the container has no capabilities: it writes as the owner.
    let write = "echo new > /etc/new && echo more >> /etc/passwd && rm /work/secret \
                 && mkdir /etc/d && stat -c %u /etc/new && tail -n1 /etc/passwd && ls /work";
    let out = rt
        .cmd(&[
            "run",
            "--read-write",
            "-u",
            "0",
            img,
            "--",
            "/bin/sh",
            "-c",
            write,
        ])
        .expect_ok();
    assert_eq!(out.stdout, "0\nmore\n");
    // A user other than root writes where the image lets it.
    let out = rt
        .cmd(&[
            "run",
            "--read-write",
            "-u",
            "1000",
            img,
            "--",
            "/bin/sh",
            "-c",
            "echo mine >> /work/secret && cat /work/secret",
        ])
        .expect_ok();
    assert_eq!(out.stdout, "s3cretmine\n");
    assert_eq!(cache_snapshot(rt.root()), before, "the cache changed");
    // The writes were thrown away with the run.
    let out = rt
        .cmd(&[
            "run",
            "-u",
            "1000",
            img,
            "--",
            "/bin/sh",
            "-c",
            "ls /etc; cat /work/secret",
        ])
        .expect_ok();
    assert_eq!(out.stdout, "passwd\ns3cret");
    assert!(mounts_under(rt.root()).is_empty());
}

#[test]
fn no_mounts_are_left_behind() {
    let Some(rt) = rt("no_mounts_are_left_behind") else {
        return;
    };
    let t = fixtures();
    let tar = owned_tarball(t.path());
    let img = tar.to_str().unwrap();
    for rw in [&[][..], &["--read-write"][..]] {
        let run = |extra: &[&str]| {
            let mut a = vec!["run"];
            a.extend_from_slice(rw);
            a.extend_from_slice(extra);
            rt.cmd(&a)
        };
        // The workload fails.
        let out = run(&[img, "--", "/bin/sh", "-c", "exit 3"]);
        assert_eq!(out.code, Some(3), "{rw:?}: {out:?}");
        // Its program does not exist.
        run(&[img, "--", "/nonexistent"]).expect_fail();
        // moat fails after mounting the image: no command, a bad volume.
        let out = run(&[img]).expect_fail();
        assert!(out.stderr.contains("no command"), "{rw:?}: {}", out.stderr);
        let out = run(&["-v", "/does/not/exist:/d", img, "--", "/bin/sh"]).expect_fail();
        assert!(
            out.stderr.contains("does not exist"),
            "{rw:?}: {}",
            out.stderr
        );
        // moat fails before: bad flags.
        run(&["-u", "x", img, "--", "/bin/sh"]).expect_fail();
        let left = mounts_under(rt.root());
        assert!(left.is_empty(), "{rw:?}: {left:#?}");
        let run_dir = rt.root().join(".run");
        assert_eq!(fs::read_dir(&run_dir).unwrap().count(), 0, "{rw:?}");
    }
}

/// The digests `moat images` lists (short form, as shown).
fn listed(rt: &Rt) -> Vec<String> {
    rt.cmd(&["images"])
        .expect_ok()
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn prune_single_and_unused_images() {
    let Some(rt) = rt("prune_single_and_unused_images") else {
        return;
    };
    let t = fixtures();
    let owned = owned_tarball(t.path());
    let d = t.path().display();
    sh(&format!("tar -C {d}/rootfs -cf {d}/plain.tar ./bin ./etc"));
    let true_in = |img: &Path| {
        rt.cmd(&["run", img.to_str().unwrap(), "--", "/bin/sh", "-c", "true"])
            .expect_ok();
    };
    true_in(&owned);
    let owned_digest = listed(&rt)[0].clone();
    true_in(&t.path().join("plain.tar"));
    assert_eq!(listed(&rt).len(), 2);
    // Bad names are refused, nothing is removed.
    for bad in ["sha256:", "zz", "sha256:ffffffffffff0000"] {
        let out = rt.cmd(&["prune", bad]).expect_fail();
        assert!(
            out.stderr.contains("no cached image"),
            "{bad}: {}",
            out.stderr
        );
    }
    rt.cmd(&["prune", "--unused-for", "1x"]).expect_fail();
    assert_eq!(listed(&rt).len(), 2);

    // An image a run uses is kept: the run waits for a file from us.
    let sync = t.path().join("sync");
    fs::create_dir(&sync).unwrap();
    fs::set_permissions(&sync, fs::Permissions::from_mode(0o777)).unwrap();
    let vol = format!("{}:/s", sync.display());
    std::thread::scope(|scope| {
        let run = scope.spawn(|| {
            rt.cmd(&[
                "run",
                "--name",
                "prune-user",
                "-v",
                &vol,
                owned.to_str().unwrap(),
                "--",
                "/bin/sh",
                "-c",
                "touch /s/started; while [ ! -e /s/go ]; do sleep 0.05; done",
            ])
        });
        while !sync.join("started").exists() {
            assert!(!run.is_finished(), "the run ended early");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = rt.cmd(&["prune", &owned_digest]).expect_fail();
        assert!(out.stderr.contains("prune-user"), "{}", out.stderr);
        let out = rt.cmd(&["prune", "--unused-for", "0s"]).expect_ok();
        assert!(out.stderr.contains("keeping"), "{}", out.stderr);
        assert_eq!(listed(&rt), vec![owned_digest.clone()]);
        fs::write(sync.join("go"), "").unwrap();
        run.join().unwrap().expect_ok();
    });

    // Unused for a day: only the entry last used two days ago goes.
    true_in(&t.path().join("plain.tar"));
    let plain_digest = listed(&rt)
        .into_iter()
        .find(|x| *x != owned_digest)
        .unwrap();
    let hex = &owned_digest["sha256:".len()..];
    let entry = fs::read_dir(rt.root().join(".images/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(hex))
        .unwrap();
    sh(&format!(
        "touch -d '2 days ago' {}/last-used",
        entry.display()
    ));
    rt.cmd(&["prune", "--unused-for", "1d"]).expect_ok();
    assert_eq!(listed(&rt), vec![plain_digest.clone()]);
    // A prefix names one image.
    let out = rt.cmd(&["prune", &plain_digest[..12]]).expect_ok();
    assert!(out.stdout.contains("removed 1"), "{}", out.stdout);
    assert!(listed(&rt).is_empty());
    assert!(mounts_under(rt.root()).is_empty());
}

/// Adds to the OCI layout `layout` (created if needed) an image tagged
/// `tag` whose layers are the tarballs `layers` (bottom first, stored
/// gzipped) under the config of [`config_json`].
fn add_oci_image(layout: &Path, tag: &str, layers: &[PathBuf]) {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        diff_ids.push(format!("sha256:{}", sha256(l)));
        let gz = l.with_extension("tar.gz");
        sh(&format!("gzip -nc {} > {}", l.display(), gz.display()));
        let (d, size) = blob(layout, &gz);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size}));
    }
    let mut config: serde_json::Value = serde_json::from_str(&config_json("")).unwrap();
    config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    let cfg = layout.join(format!("{tag}.config"));
    fs::write(&cfg, config.to_string()).unwrap();
    let (config, csize) = blob(layout, &cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": csize},
        "layers": descs
    });
    let mp = layout.join(format!("{tag}.manifest"));
    fs::write(&mp, manifest.to_string()).unwrap();
    let (mdigest, msize) = blob(layout, &mp);
    let ip = layout.join("index.json");
    let mut index: serde_json::Value = fs::read(&ip)
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_else(|_| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
            "size": msize, "annotations": {"org.opencontainers.image.ref.name": tag}}));
    fs::write(&ip, index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

/// The layer directories of the cache: name → inode.
fn cached_layers(rt: &Rt) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dir = rt.root().join(".images/layers/sha256");
    let mut v: Vec<(String, u64)> = fs::read_dir(&dir)
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                let ino = fs::metadata(e.path().join("diff")).unwrap().ino();
                (e.file_name().to_string_lossy().into_owned(), ino)
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn images_share_layers() {
    // The images' Entrypoint is `/bin/sh -c`: commands are scripts.
    let Some(rt) = rt("images_share_layers") else {
        return;
    };
    let t = fixtures();
    let d = t.path().display().to_string();
    // The base: busybox, /opq/old, /gone/f, /work/secret (1000, 0600).
    let r = busybox_root(t.path());
    fs::create_dir_all(r.join("opq/keep")).unwrap();
    fs::write(r.join("opq/old"), "o").unwrap();
    fs::create_dir(r.join("gone")).unwrap();
    fs::write(r.join("gone/f"), "f").unwrap();
    fs::write(r.join("work/secret"), "s3cret").unwrap();
    std::os::unix::fs::chown(r.join("work/secret"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(r.join("work/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    sh(&format!(
        "tar --numeric-owner -C {d}/rootfs -cf {d}/base.tar ."
    ));
    // One upper layer makes /opq opaque (only /opq/new shows) and deletes
    // /gone; the other only adds a file.
    let u1 = t.path().join("u1");
    fs::create_dir_all(u1.join("opq")).unwrap();
    fs::write(u1.join("opq/new"), "n").unwrap();
    fs::write(u1.join("opq/.wh..wh..opq"), "").unwrap();
    fs::write(u1.join(".wh.gone"), "").unwrap();
    let u2 = t.path().join("u2");
    fs::create_dir_all(u2.join("etc")).unwrap();
    fs::write(u2.join("etc/two"), "2").unwrap();
    sh(&format!(
        "tar --numeric-owner -C {d}/u1 -cf {d}/u1.tar . && tar --numeric-owner -C {d}/u2 -cf {d}/u2.tar ."
    ));
    let lay = t.path().join("lay");
    let base = t.path().join("base.tar");
    add_oci_image(&lay, "one", &[base.clone(), t.path().join("u1.tar")]);
    add_oci_image(&lay, "two", &[base, t.path().join("u2.tar")]);
    let one = format!("oci:{}:one", lay.display());
    let two = format!("oci:{}:two", lay.display());
    let look = "ls /opq; ls / | grep -c gone; cat /work/secret; stat -c %u:%a /work/secret";
    let out = rt.cmd(&["run", "-u", "1000", &one, "--", look]).expect_ok();
    assert_eq!(out.stdout, "new\n0\ns3cret1000:600\n");
    let after_one = cached_layers(&rt);
    assert_eq!(after_one.len(), 2, "{after_one:?}");
    // The second image unpacks only its own layer: the base stays the
    // very same directory.
    let out = rt.cmd(&["run", "-u", "1000", &two, "--", look]).expect_ok();
    assert_eq!(out.stdout, "keep\nold\n1\ns3cret1000:600\n");
    let after_two = cached_layers(&rt);
    assert_eq!(after_two.len(), 3, "{after_two:?}");
    assert!(after_one.iter().all(|l| after_two.contains(l)));
    let list = rt.cmd(&["images"]).expect_ok().stdout;
    assert_eq!(list.lines().count(), 3, "{list}");
    // Read-only by default, writable with --read-write, the cache
    // unchanged either way; a failing run leaves no mount either.
    let before = cache_snapshot(rt.root());
    let out = rt
        .cmd(&["run", &one, "--", "echo x > /opq/new"])
        .expect_fail();
    assert!(out.stderr.contains("Read-only"), "{}", out.stderr);
    let write = "echo x > /opq/new && rm /work/secret && rm -r /gone; cat /opq/new";
    let out = rt
        .cmd(&["run", "--read-write", "-u", "0", &one, "--", write])
        .expect_ok();
    assert_eq!(out.stdout, "x\n");
    rt.cmd(&["run", &two, "--", "exit 3"]).expect_fail();
    // A volume's mount point is made in the run's upper layer, not in
    // the cache, and the root stays read-only.
    let vol = format!("{d}/u2:/vol/sub");
    let out = rt
        .cmd(&[
            "run",
            "-v",
            &vol,
            &two,
            "--",
            "cat /vol/sub/etc/two; touch /x",
        ])
        .expect_fail();
    assert_eq!(out.stdout, "2", "{}", out.stderr);
    assert!(out.stderr.contains("Read-only"), "{}", out.stderr);
    assert_eq!(cache_snapshot(rt.root()), before, "the cache changed");
    assert!(mounts_under(rt.root()).is_empty());
    // Pruning one image keeps the layer the other uses.
    let digests = listed(&rt);
    let first = digests.last().unwrap();
    let out = rt.cmd(&["prune", first]).expect_ok();
    assert!(out.stdout.contains("1 unused layer"), "{}", out.stdout);
    let left = cached_layers(&rt);
    assert_eq!(left.len(), 2, "{left:?}");
    let out = rt.cmd(&["run", "-u", "1000", &two, "--", look]).expect_ok();
    assert_eq!(out.stdout, "keep\nold\n1\ns3cret1000:600\n");
    let out = rt.cmd(&["prune", "--unused-for", "0s"]).expect_ok();
    assert!(out.stdout.contains("2 unused layer"), "{}", out.stdout);
    assert!(cached_layers(&rt).is_empty());
    assert!(listed(&rt).is_empty());
}

#[test]
fn flattened_entries_of_earlier_moats_still_run() {
    let Some(rt) = rt("flattened_entries_of_earlier_moats_still_run") else {
        return;
    };
    let t = fixtures();
    let tar = owned_tarball(t.path());
    // An entry as an earlier moat wrote it for this tarball: one rootfs,
    // no layers listed; a marker shows it is the one used.
    let entry = rt.root().join(".images/sha256").join(sha256(&tar));
    fs::create_dir_all(&entry).unwrap();
    fs::set_permissions(rt.root().join(".images"), fs::Permissions::from_mode(0o700)).unwrap();
    sh(&format!(
        "mkdir {e}/rootfs && tar -C {e}/rootfs -xf {t} && echo legacy > {e}/rootfs/etc/marker \
         && mkdir {e}/rootfs/proc {e}/rootfs/dev {e}/rootfs/sys {e}/rootfs/tmp",
        e = entry.display(),
        t = tar.display()
    ));
    let meta = serde_json::json!({"source": tar.display().to_string(), "config": {}, "size": 1});
    fs::write(entry.join("image.json"), meta.to_string()).unwrap();
    let img = tar.to_str().unwrap();
    for rw in [&[][..], &["--read-write"][..]] {
        let mut a = vec!["run", "-u", "1000"];
        a.extend_from_slice(rw);
        a.extend_from_slice(&[img, "--", "/bin/sh", "-c", "cat /etc/marker /work/secret"]);
        let out = rt.cmd(&a).expect_ok();
        assert_eq!(out.stdout, "legacy\ns3cret", "{rw:?}");
    }
    assert!(!rt.root().join(".images/layers").exists());
    assert!(mounts_under(rt.root()).is_empty());
    let out = rt.cmd(&["prune", "--unused-for", "0s"]).expect_ok();
    assert!(out.stdout.contains("removed 1 "), "{}", out.stdout);
    assert!(!entry.exists());
}

#[test]
fn a_changed_archive_is_unpacked_again() {
    let Some(rt) = rt("a_changed_archive_is_unpacked_again") else {
        return;
    };
    // The cache remembers an archive by its identity (device, inode, size,
    // mtime, ctime) so later runs neither hash nor unpack it again; a
    // rewrite of the same path, even to the same size, must be seen.
    let t = fixtures();
    busybox_root(t.path());
    let d = t.path().display();
    let tar = t.path().join("r.tar");
    let cat = |rt: &Rt| {
        rt.cmd(&[
            "run",
            tar.to_str().unwrap(),
            "--",
            "/bin/busybox",
            "cat",
            "/msg",
        ])
        .expect_ok()
        .stdout
    };
    sh(&format!(
        "echo one > {d}/rootfs/msg && tar -C {d}/rootfs -cf {d}/r.tar.new . && mv {d}/r.tar.new {d}/r.tar"
    ));
    // Recorded only once the file is 2 s old (racily clean otherwise).
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(cat(&rt), "one\n");
    assert_eq!(cat(&rt), "one\n", "cached run");
    let by_file = rt.root().join(".images/by-file");
    assert_eq!(
        fs::read_dir(&by_file).unwrap().count(),
        1,
        "one record per path"
    );
    // Rewritten in place to the same size (same inode): only mtime and
    // ctime tell.
    for msg in ["two", "six"] {
        let size = fs::metadata(&tar).unwrap().len();
        sh(&format!(
            "echo {msg} > {d}/rootfs/msg && tar -C {d}/rootfs -cf {d}/r.tmp . && cat {d}/r.tmp > {d}/r.tar"
        ));
        assert_eq!(fs::metadata(&tar).unwrap().len(), size);
        assert_eq!(cat(&rt), format!("{msg}\n"), "rewritten in place");
        assert_eq!(cat(&rt), format!("{msg}\n"), "cached run");
    }
    assert_eq!(
        fs::read_dir(&by_file).unwrap().count(),
        1,
        "one record per path"
    );
}

#[test]
fn user_names_come_from_the_image() {
    let Some(rt) = rt("user_names_come_from_the_image") else {
        return;
    };
    let t = fixtures();
    busybox_root(t.path());
    let d = t.path().display();
    sh(&format!(
        "printf 'root:x:0:\\napp:x:1000:\\nstaff:x:50:\\n' > {d}/rootfs/etc/group && tar -C {d}/rootfs -cf {d}/r.tar ."
    ));
    let tar = t.path().join("r.tar");
    let id = |user: &str| {
        rt.cmd(&[
            "run",
            "-u",
            user,
            tar.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "echo $(/bin/busybox id -u):$(/bin/busybox id -g)",
        ])
    };
    for (user, want) in [
        ("app", "1000:1000"),
        ("app:staff", "1000:50"),
        ("root", "0:0"),
        ("7:staff", "7:50"),
    ] {
        assert_eq!(id(user).expect_ok().stdout.trim(), want, "{user}");
    }
    let o = id("nosuch");
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("no such user"), "{o:?}");
}

/// Issue #14, 7: `moat run DIR` with DIR inside a private (0700) directory
/// of root (`/root/rootfs`, a `mktemp -d`): moat opens the root; the
/// container's unmapped host IDs need not traverse the path to it.
#[test]
fn directory_images_in_private_directories() {
    let Some(rt) = rt("directory_images_in_private_directories") else {
        return;
    };
    let private = tempfile::tempdir().unwrap();
    fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let r = busybox_root(private.path());
    let out = rt
        .cmd(&[
            "run",
            r.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "echo in-private",
        ])
        .expect_ok();
    assert_eq!(out.stdout, "in-private\n");
    assert!(mounts_under(rt.root()).is_empty());
}

/// Issue #14, 9: an image without `User` runs as `nobody` (65534), as the
/// embedded default does; `-u 0` opts into root, `-u` and an image's own
/// `User` are honoured.
#[test]
fn images_without_a_user_run_as_nobody() {
    let Some(rt) = rt("images_without_a_user_run_as_nobody") else {
        return;
    };
    let t = fixtures();
    let r = busybox_root(t.path());
    let d = t.path().display();
    sh(&format!("tar -C {d}/rootfs -cf {d}/r.tar ."));
    let who = "echo $(/bin/busybox id -u):$(/bin/busybox id -g) home=$HOME";
    for img in [r.clone(), t.path().join("r.tar")] {
        let img = img.to_str().unwrap();
        let run = |flags: &[&str]| {
            let mut a = vec!["run"];
            a.extend_from_slice(flags);
            a.extend_from_slice(&[img, "--", "/bin/sh", "-c", who]);
            rt.cmd(&a).expect_ok().stdout
        };
        assert_eq!(run(&[]), "65534:65534 home=/\n", "{img}");
        assert_eq!(run(&["-u", "0"]), "0:0 home=/root\n", "{img}");
        assert_eq!(run(&["-u", "app"]), "1000:1000 home=/\n", "{img}");
    }
}

/// Issue 15, defect 6: what one unpack may cost is bounded, with a clear
/// error, and nothing is left in the cache: a deeply nested archive (it
/// cost quadratic time and memory), a compression bomb past the byte bound
/// (`MOAT_IMAGE_MAX_BYTES`), and a docker archive whose manifest names
/// "/etc/shadow" (the error names it as a member of the archive, not a host
/// path).
#[test]
fn unpacking_is_bounded_and_says_why() {
    let Some(rt) = Rt::root_or_skip("unpacking_is_bounded_and_says_why") else {
        return;
    };
    if !rt.is_moat() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // 3,000 directories deep, each level an entry.
    let deep = dir.path().join("deep.tar");
    tool(
        "python3",
        &[
            "-c",
            &format!(
                "import tarfile\nt = tarfile.open('{}', 'w', format=tarfile.GNU_FORMAT)\np = ''\nfor _ in range(3000):\n    p += 'd/'\n    i = tarfile.TarInfo(p)\n    i.type = tarfile.DIRTYPE\n    t.addfile(i)\nt.close()",
                deep.display()
            ),
        ],
    );
    let o = rt.cmd(&["run", deep.to_str().unwrap(), "--", "true"]);
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("deeper than 128 directories"), "{o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{o:?}");
    // 64 MiB of zeros, compressed to a few KB, against a 16 MiB bound.
    let bomb = dir.path().join("bomb.tar.zst");
    sh(&format!(
        "mkdir {d}/b && head -c 67108864 /dev/zero > {d}/b/zeros && tar -C {d}/b --zstd -cf {d}/bomb.tar.zst zeros && rm -r {d}/b"
    ));
    let o = rt.cmd_with(
        &["run", bomb.to_str().unwrap(), "--", "true"],
        Opts {
            env: vec![("MOAT_IMAGE_MAX_BYTES".into(), "16m".into())],
            ..Opts::default()
        },
    );
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(
        o.stderr.contains("unpacks to more than 16777216 bytes"),
        "{o:?}"
    );
    // A docker archive whose manifest names a host-looking path.
    let evil = dir.path().join("evil.tar");
    sh(&format!(
        "mkdir {d}/e && printf '%s' '[{{\"Config\":\"/etc/shadow\",\"RepoTags\":[],\"Layers\":[]}}]' > {d}/e/manifest.json && tar -C {d}/e -cf {d}/evil.tar manifest.json"
    ));
    let o = rt.cmd(&[
        "run",
        &format!("docker-archive:{}", evil.display()),
        "--",
        "true",
    ]);
    assert_eq!(o.code, Some(125), "{o:?}");
    assert!(o.stderr.contains("\"/etc/shadow\" in the archive"), "{o:?}");
    assert!(!o.stderr.contains("cannot read /etc/shadow"), "{o:?}");
    // Nothing half-unpacked stays in the cache.
    let tmp = rt.root().join(".images/tmp");
    let left: Vec<_> = fs::read_dir(&tmp)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let o = rt.cmd(&["images"]).expect_ok();
    assert_eq!(o.stdout.lines().count(), 1, "{o:?}");
}
