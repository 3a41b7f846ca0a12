//! A real virtiofsd for the virtio-fs tests (`virtio_fs.rs`,
//! `kvm_payloads.rs`): Debian's `qemu-system-common` or `virtiofsd`
//! package's (`MOAT_VIRTIOFSD` names another). It needs root (its sandbox).
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bounds a virtiofsd that never listens: far above what it takes.
const LISTEN_LIMIT: Duration = Duration::from_secs(20);

fn virtiofsd() -> PathBuf {
    let found = std::env::var_os("MOAT_VIRTIOFSD")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"].map(PathBuf::from))
        .find(|p| p.is_file());
    found.expect("no virtiofsd (Debian: qemu-system-common or virtiofsd; scripts/deps --test)")
}

/// virtiofsd serving `dir` on a socket it listens on, connected.
pub struct Backend {
    pub child: Child,
    pub socket: UnixStream,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// virtiofsd serving `dir`, listening on `socket_path`, connected.
pub fn backend(dir: &Path, socket_path: &Path) -> Backend {
    let mut child = Command::new(virtiofsd())
        .arg(format!("--socket-path={}", socket_path.display()))
        .arg("-o")
        .arg(format!("source={}", dir.display()))
        .arg("-o")
        .arg("cache=none")
        .stdin(Stdio::null())
        .spawn()
        .expect("start virtiofsd");
    // It listens once it has set up its sandbox: a bound on a hung one.
    let deadline = Instant::now() + LISTEN_LIMIT;
    loop {
        match UnixStream::connect(socket_path) {
            Ok(socket) => return Backend { child, socket },
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("virtiofsd exited ({status}) before it listened: {e}");
                }
                assert!(Instant::now() < deadline, "virtiofsd never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A fresh directory (`share`, in a temporary directory that goes with
/// it) and a virtiofsd serving it. Asserts root: virtiofsd sets up its
/// sandbox. (Not every test that includes this file serves one.)
#[allow(dead_code)]
pub struct Served {
    pub share: PathBuf,
    pub backend: Backend,
    _dir: tempfile::TempDir,
}

/// See [`Served`].
#[allow(dead_code)]
pub fn served() -> Served {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root: virtiofsd sets up its sandbox"
    );
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let backend = backend(&share, &dir.path().join("fs.sock"));
    Served {
        share,
        backend,
        _dir: dir,
    }
}
