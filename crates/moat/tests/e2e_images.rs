//! `moat run IMAGE`: rootfs tarballs (plain, gzip, zstd), directories, OCI
//! layouts and docker archives built here from busybox-static, and hostile
//! archives that must be refused with nothing written outside the cache.
mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Rt;

fn rt(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() || !Path::new("/bin/busybox").exists() {
        eprintln!("SKIP {test}: moat-only, needs /bin/busybox");
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

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
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
    rt.cmd(&["prune"]).expect_ok();
    assert_eq!(rt.cmd(&["images"]).expect_ok().stdout.lines().count(), 1);
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
