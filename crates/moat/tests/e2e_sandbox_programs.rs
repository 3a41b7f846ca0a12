//! Real programs, unchanged, in the sandbox tier (issue 10, item 8), each
//! also run in the container tier: a program that works there and fails
//! in the sandbox is a defect of the supervisor (or a documented policy
//! decision, docs/sandbox.md). On the embedded default root, which holds
//! the host's /usr: CPython's own regression tests (Debian's
//! libpython3.11-testsuite), git, a C compile and link with make, a
//! coreutils pipeline, `pip install` of a wheel built in the test into a
//! writable volume; and `moat policy learn` of such a program, whose
//! policy then runs it again with no denial.
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Out, Rt};

const PYTHON: &str = "/usr/bin/python3.11";
const TESTSUITE: &str = "/usr/lib/python3.11/test/regrtest.py";

fn rt(test: &str) -> Option<Rt> {
    let rt = Rt::root_or_skip(test)?;
    if !rt.is_moat() {
        eprintln!("SKIP {test}: moat-only tier");
        return None;
    }
    Some(rt)
}

/// `moat run --isolation TIER [flags] -- ARGS…` with a deadline longer
/// than the harness's (a test module takes a while on a loaded machine).
fn run_long(rt: &Rt, tier: &str, flags: &[&str], args: &[&str], limit: Duration) -> Out {
    let mut full = vec!["run", "--isolation", tier];
    full.extend_from_slice(flags);
    full.push("--");
    full.extend_from_slice(args);
    let out = rt.scratch_file("stdout");
    let err = rt.scratch_file("stderr");
    let mut cmd = rt.command();
    cmd.args(&full)
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = common::spawn_own(&mut cmd);
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Collects the status try_wait saw and unregisters the child.
    let status = common::wait_own(&mut child);
    use std::os::unix::process::ExitStatusExt;
    Out {
        code: status.code(),
        signal: status.signal(),
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
        args: full.iter().map(|s| s.to_string()).collect(),
    }
}

/// `sh -c SCRIPT` in `tier`.
fn sh(rt: &Rt, tier: &str, flags: &[&str], script: &str) -> Out {
    run_long(
        rt,
        tier,
        flags,
        &["sh", "-c", script],
        Duration::from_secs(300),
    )
}

/// The sandbox's denial lines in `stderr`.
fn denials(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("sandbox: denied"))
        .collect()
}

/// Runs `script` in both tiers; both must succeed with the same output,
/// which is returned.
fn same_in_both(rt: &Rt, flags: &[&str], script: &str) -> String {
    let c = sh(rt, "container", flags, script);
    assert!(c.ok(), "container tier: {c:?}");
    let s = sh(rt, "sandbox", flags, script);
    assert!(s.ok(), "sandbox tier: {s:?}");
    assert_eq!(s.stdout, c.stdout, "sandbox vs container:\n{}", s.stderr);
    assert!(denials(&s.stderr).is_empty(), "{}", s.stderr);
    s.stdout
}

fn have_testsuite(test: &str) -> bool {
    if Path::new(TESTSUITE).exists() && Path::new(PYTHON).exists() {
        return true;
    }
    !moat_core::testing::skip(
        test,
        "Debian's libpython3.11-testsuite is not installed (scripts/deps --test)",
    )
}

/// CPython's regression tests `modules` in `tier`: the whole output.
fn regrtest(rt: &Rt, tier: &str, modules: &[&str]) -> Out {
    let mut args = vec![
        PYTHON, "-m", "test", // loopback only: the sandbox has `lo` alone
        "-u", "network", // the failing tests again, verbosely, for the report
        "-w",
    ];
    args.extend_from_slice(modules);
    run_long(rt, tier, &[], &args, Duration::from_secs(900))
}

fn python_modules_pass_in_both(test: &str, modules: &[&str]) {
    let Some(rt) = rt(test) else { return };
    if !have_testsuite(test) {
        return;
    }
    for tier in ["container", "sandbox"] {
        let out = regrtest(&rt, tier, modules);
        assert!(
            out.ok() && out.stdout.contains("Tests result: SUCCESS"),
            "{tier} tier, CPython's {modules:?}:\n{}\n{}",
            out.stdout,
            out.stderr
        );
        for m in modules {
            assert!(
                out.stdout.contains(m),
                "{m} did not run in {tier}: {}",
                out.stdout
            );
        }
    }
}

#[test]
fn cpython_files_os_and_text_modules_pass() {
    python_modules_pass_in_both(
        "cpython_files_os_and_text_modules_pass",
        &[
            "test_os",
            "test_posix",
            "test_fileio",
            "test_shutil",
            "test_tempfile",
            "test_pathlib",
            "test_json",
            "test_re",
        ],
    );
}

#[test]
fn cpython_process_thread_and_socket_modules_pass() {
    python_modules_pass_in_both(
        "cpython_process_thread_and_socket_modules_pass",
        &[
            "test_subprocess",
            "test_threading",
            "test_select",
            "test_socket",
            "test_socketserver",
        ],
    );
}

#[test]
fn git_init_commit_and_log() {
    let Some(rt) = rt("git_init_commit_and_log") else {
        return;
    };
    // Fixed identities and dates: the same commits, so the same hashes, in
    // both tiers.
    let out = same_in_both(
        &rt,
        &[
            "-e",
            "GIT_AUTHOR_DATE=2024-01-01T00:00:00Z",
            "-e",
            "GIT_COMMITTER_DATE=2024-01-01T00:00:00Z",
        ],
        "set -e; cd /tmp && git init -q -b main repo && cd repo && \
         git config user.email t@example.org && git config user.name tester && \
         printf 'one\\n' > a && mkdir -p d/e && printf 'two\\n' > d/e/b && \
         git add -A && git commit -qm first && \
         git checkout -q -b topic && printf 'three\\n' >> a && git commit -qam second && \
         git checkout -q main && git merge -q --ff-only topic && \
         git mv a c && git commit -qm rename && git tag v1 && \
         git log --oneline --name-status && git status --porcelain && \
         git show --stat HEAD~1 | tail -n 2 && git gc -q && git fsck --no-progress && \
         git rev-parse v1",
    );
    assert!(out.contains("rename"), "{out}");
    assert!(out.contains("R100\ta\tc"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.len() == 40).count(),
        1,
        "one full hash (the tag's): {out}"
    );
}

#[test]
fn a_c_program_compiles_links_and_runs() {
    let Some(rt) = rt("a_c_program_compiles_links_and_runs") else {
        return;
    };
    let out = same_in_both(
        &rt,
        &[],
        r#"set -e; mkdir /tmp/c && cd /tmp/c
cat > sq.h <<'EOF'
double sq(double);
EOF
cat > sq.c <<'EOF'
#include "sq.h"
double sq(double x) { return x * x; }
EOF
cat > main.c <<'EOF'
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include "sq.h"
static void *run(void *a) { *(double *)a = sqrt(sq(12.0)); return 0; }
int main(void) {
    pthread_t t; double r = 0;
    pthread_create(&t, 0, run, &r); pthread_join(t, 0);
    printf("result=%.1f\n", r);
    return 0;
}
EOF
cat > Makefile <<'EOF'
prog: main.o libsq.a
	$(CC) -pthread -o $@ main.o -L. -lsq -lm
libsq.a: sq.o
	ar rcs $@ $^
%.o: %.c sq.h
	$(CC) -O2 -Wall -c -o $@ $<
EOF
make -s -j2 prog && ./prog && nm libsq.a | grep -c ' T sq'
gcc -shared -fPIC -o libsq.so sq.c && gcc -o dyn main.c -L. -lsq -lm -pthread && LD_LIBRARY_PATH=. ./dyn"#,
    );
    assert_eq!(out, "result=12.0\n1\nresult=12.0\n");
}

#[test]
fn a_coreutils_pipeline() {
    let Some(rt) = rt("a_coreutils_pipeline") else {
        return;
    };
    let out = same_in_both(
        &rt,
        &[],
        "set -e; seq 1 20000 | awk '{print $1 % 97}' | sort -n | uniq -c | sort -k1,1nr -k2,2n | \
         head -n 3 | sed 's/^ *//' | tr ' ' ':'; \
         seq 1 1000 | paste -sd' ' | tr ' ' '\\n' | awk '{s += $1} END {print s}'; \
         mkdir -p /tmp/t/a/b && for i in 1 2 3; do seq $i > /tmp/t/a/b/f$i; done; \
         cd /tmp && tar czf t.tgz t && mkdir u && tar xzf t.tgz -C u && \
         find u -type f | sort | xargs cat | sha256sum | cut -c1-16; \
         cut -d: -f1 /etc/passwd | grep -c . >/dev/null && echo passwd-ok; \
         ls /usr/bin | wc -l | awk '$1 > 10 {print \"bin-ok\"}'",
    );
    let want_sum = {
        let mut h = std::process::Command::new("sh");
        h.args([
            "-c",
            "printf '1\\n1\\n2\\n1\\n2\\n3\\n' | sha256sum | cut -c1-16",
        ]);
        String::from_utf8(h.output().unwrap().stdout).unwrap()
    };
    assert!(out.starts_with("207:1\n207:2\n207:3\n500500\n"), "{out}");
    assert!(out.contains(&want_sum), "{out} (want {want_sum})");
    assert!(out.ends_with("passwd-ok\nbin-ok\n"), "{out}");
}

/// A directory the container's user may write, mounted at /vol, and a
/// policy that lets the sandbox write and execute there.
struct Vol {
    dir: tempfile::TempDir,
}

impl Vol {
    fn new() -> Vol {
        let dir = tempfile::Builder::new()
            .prefix("moat-e2e-programs-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        Vol { dir }
    }

    fn flag(&self) -> String {
        format!("{}:/vol", self.dir.path().display())
    }

    fn policy(&self) -> PathBuf {
        let mut v: serde_json::Value =
            serde_json::from_str(moat_sandbox::policy::DEFAULT_POLICY).unwrap();
        v["paths"]["/vol"] = "rwx".into();
        let p = self.dir.path().join("policy.json");
        fs::write(&p, v.to_string()).unwrap();
        p
    }
}

const WHEEL_SCRIPT: &str = r#"set -e
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
mkdir -p /tmp/src/moathello && cd /tmp/src
cat > moathello/__init__.py <<'EOF'
def greet():
    return "hello from a wheel"
def main():
    print(greet())
EOF
cat > pyproject.toml <<'EOF'
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
[project]
name = "moathello"
version = "1.0"
[project.scripts]
moat-hello = "moathello:main"
EOF
python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w /vol/dist /tmp/src
python3 -m pip install -q --no-deps --no-index --target /vol/site /vol/dist/moathello-1.0-py3-none-any.whl
PYTHONPATH=/vol/site python3 -c 'import moathello; print(moathello.greet())'
PYTHONPATH=/vol/site /vol/site/bin/moat-hello
"#;

#[test]
fn pip_installs_a_wheel_built_offline_into_a_volume() {
    let Some(rt) = rt("pip_installs_a_wheel_built_offline_into_a_volume") else {
        return;
    };
    for tier in ["container", "sandbox"] {
        let vol = Vol::new();
        let policy = vol.policy();
        let v = vol.flag();
        let mut flags = vec!["-v", v.as_str()];
        if tier == "sandbox" {
            flags.extend(["--policy", policy.to_str().unwrap()]);
        }
        let out = sh(&rt, tier, &flags, WHEEL_SCRIPT);
        assert!(out.ok(), "{tier}: {out:?}");
        assert_eq!(
            out.stdout, "hello from a wheel\nhello from a wheel\n",
            "{tier}: {out:?}"
        );
        assert!(denials(&out.stderr).is_empty(), "{tier}: {}", out.stderr);
        // Installed on the host's side of the volume.
        assert!(vol.dir.path().join("site/moathello/__init__.py").exists());
    }
}

/// What the learning test runs: a shell pipeline, python, git and a
/// compiler, reading, creating and executing.
const LEARN_SCRIPT: &str = "set -e; head -1 /etc/passwd | cut -d: -f1; \
    mkdir /tmp/w && cd /tmp/w && printf 'int main(void){return 3;}\\n' > m.c && \
    gcc -o m m.c && { ./m || echo status=$?; }; \
    python3 -c 'import json, os; print(json.dumps(sorted(os.listdir(\"/tmp/w\"))))'; \
    git init -q g && cd g && git config user.email a@b && git config user.name n && \
    echo x > f && git add f && git commit -qm c && git log --format=%s";

#[test]
fn a_learned_policy_runs_the_program_with_no_denial() {
    let Some(rt) = rt("a_learned_policy_runs_the_program_with_no_denial") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("learned.json");
    let file_s = file.to_str().unwrap();
    // Learning: the command runs, its output and status are its own.
    let learn = rt.cmd(&[
        "policy",
        "learn",
        "-o",
        file_s,
        "--",
        "sh",
        "-c",
        LEARN_SCRIPT,
    ]);
    assert!(learn.ok(), "{learn:?}");
    assert_eq!(
        learn.stdout, "root\nstatus=3\n[\"m\", \"m.c\"]\nc\n",
        "{learn:?}"
    );
    let text = fs::read_to_string(&file).unwrap();
    let policy = moat_sandbox::Policy::parse(text.as_bytes()).expect("the learned policy parses");
    // Smaller than the default: what it did not touch is not granted.
    use moat_sandbox::policy::{Verdict, Want};
    assert_eq!(
        policy.check(b"/tmp/x", Want::WRITE).0,
        Verdict::Allow,
        "{text}"
    );
    assert_ne!(
        policy
            .check(b"/usr/share/common-licenses/GPL-3", Want::READ)
            .0,
        Verdict::Allow,
        "{text}"
    );
    assert_ne!(
        policy.check(b"/etc/shadow", Want::READ).0,
        Verdict::Allow,
        "{text}"
    );
    // Enforced, it runs the command again with no denial.
    let again = sh(&rt, "sandbox", &["--policy", file_s], LEARN_SCRIPT);
    assert!(again.ok(), "{again:?}\n{text}");
    assert_eq!(again.stdout, learn.stdout);
    assert!(
        denials(&again.stderr).is_empty(),
        "{}\n{text}",
        again.stderr
    );
    // And refuses what it was not seen to need.
    let other = sh(
        &rt,
        "sandbox",
        &["--policy", file_s],
        "cat /usr/share/common-licenses/GPL-3",
    );
    assert!(!other.ok(), "{other:?}");
    assert!(!denials(&other.stderr).is_empty(), "{other:?}");
    // Printed when no file is named; refused with --policy or another tier.
    let printed = rt.cmd(&["policy", "learn", "--", "true"]);
    assert!(printed.ok(), "{printed:?}");
    moat_sandbox::Policy::parse(printed.stdout.as_bytes()).expect("printed policy parses");
    let bad = rt.cmd(&["policy", "learn", "--policy", file_s, "--", "true"]);
    assert_eq!(bad.code, Some(125), "{bad:?}");
    let bad = rt.cmd(&["--isolation", "container", "policy", "learn", "--", "true"]);
    assert_eq!(bad.code, Some(125), "{bad:?}");
    assert_eq!(bad.stderr.lines().count(), 1, "{bad:?}");
}

/// Issue 10's "Cannot fork" report: many short pipelines and background
/// jobs in one sandbox, every fork and exec succeeding (it did not
/// reproduce in 60 runs of this loop; kept so that it stays so).
#[test]
fn many_short_pipelines_all_fork() {
    let Some(rt) = rt("many_short_pipelines_all_fork") else {
        return;
    };
    let out = sh(
        &rt,
        "sandbox",
        &[],
        "i=0; while [ $i -lt 200 ]; do \
           (echo a | cat | wc -l >/dev/null) & (ls / | grep -c x >/dev/null) & \
           wait || echo FAIL $i; i=$((i+1)); done; echo done",
    );
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stdout, "done\n", "{out:?}");
    assert!(!out.stderr.contains("fork"), "{}", out.stderr);
}

/// A sandbox whose create fails (here a volume whose mount point cannot
/// be made in the read-only root) leaves no supervisor or guard behind:
/// they see the runtime give up.
#[test]
fn a_failed_create_leaves_no_supervisor() {
    let Some(rt) = rt("a_failed_create_leaves_no_supervisor") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, "x").unwrap();
    let vol = format!("{}:/usr/moat-no-such-mount-point:ro", file.display());
    let out = rt.cmd(&["run", "--isolation", "sandbox", "-v", &vol, "--", "true"]);
    assert_eq!(out.code, Some(125), "{out:?}");
    let root = rt.root().display().to_string();
    let left = || {
        common::all_processes()
            .into_iter()
            .filter(|(pid, _, _)| {
                let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmd).contains(&root)
            })
            .count()
    };
    // They end as soon as they see EOF; give them a moment on a loaded host.
    for _ in 0..500 {
        if left() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        left(),
        0,
        "a supervisor or guard outlived the failed create"
    );
}
