//! The workload side: micro-benchmarks that run inside a container (or on
//! the host, as the floor), started as `moat bench-helper micro …`. moat
//! is one static binary, so the same helper runs unchanged under every
//! runtime. Each benchmark runs in batches and reports the mean cost of one
//! operation per batch; the caller summarises the batches.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// How much each batch does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sizes {
    pub batches: usize,
    pub getpid: usize,
    pub open_close: usize,
    pub stat: usize,
    pub fork_exec: usize,
    pub write_fsync: usize,
    pub round_trips: usize,
    pub touch_mib: usize,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                batches: 7,
                getpid: 5_000,
                open_close: 500,
                stat: 1_000,
                fork_exec: 3,
                write_fsync: 5,
                round_trips: 200,
                touch_mib: 16,
            }
        } else {
            Sizes {
                batches: 21,
                getpid: 20_000,
                open_close: 2_000,
                stat: 4_000,
                fork_exec: 10,
                write_fsync: 20,
                round_trips: 1_000,
                touch_mib: 64,
            }
        }
    }

    fn to_args(self) -> Vec<String> {
        [
            self.batches,
            self.getpid,
            self.open_close,
            self.stat,
            self.fork_exec,
            self.write_fsync,
            self.round_trips,
            self.touch_mib,
        ]
        .iter()
        .map(usize::to_string)
        .collect()
    }

    fn from_args(a: &[String]) -> Option<Sizes> {
        let n: Vec<usize> = a.iter().map(|s| s.parse().ok()).collect::<Option<_>>()?;
        let [batches, getpid, open_close, stat, fork_exec, write_fsync, round_trips, touch_mib] =
            n.as_slice().try_into().ok()?;
        Some(Sizes {
            batches,
            getpid,
            open_close,
            stat,
            fork_exec,
            write_fsync,
            round_trips,
            touch_mib,
        })
    }
}

/// The micro-benchmarks, as the helper prints them: per batch, the mean
/// cost of one operation (ns for the cheap ones, µs for the others).
/// Empty when the operation failed; `errors` says why.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Micro {
    pub getpid_ns: Vec<f64>,
    pub open_close_ns: Vec<f64>,
    pub stat_ns: Vec<f64>,
    pub fork_exec_wait_us: Vec<f64>,
    pub write_fsync_us: Vec<f64>,
    pub pipe_rtt_us: Vec<f64>,
    pub tcp_rtt_us: Vec<f64>,
    pub touch_ns_per_page: Vec<f64>,
    pub errors: Vec<String>,
}

/// The argv (after the program) that runs the micro-benchmarks: `exe` is
/// the helper's own path where it runs, `data` a writable directory on a
/// real filesystem there.
pub fn micro_args(exe: &Path, data: &Path, sizes: Sizes) -> Vec<String> {
    let mut v = vec![
        "bench-helper".to_string(),
        "micro".to_string(),
        exe.display().to_string(),
        data.display().to_string(),
    ];
    v.extend(sizes.to_args());
    v
}

/// `moat bench-helper …`: returns the exit status.
pub fn main(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("sleep") => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        Some("micro") if args.len() == 11 => {
            let (exe, data) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
            let Some(sizes) = Sizes::from_args(&args[3..]) else {
                eprintln!("moat bench-helper: bad sizes");
                return 2;
            };
            let m = micro(&exe, &data, sizes);
            println!("{}", serde_json::to_string(&m).unwrap_or_default());
            0
        }
        _ => {
            eprintln!("moat bench-helper: usage: bench-helper sleep | micro EXE DATA SIZES…");
            2
        }
    }
}

fn per_op(start: Instant, n: usize, unit_ns: f64) -> f64 {
    start.elapsed().as_nanos() as f64 / n.max(1) as f64 / unit_ns
}

/// Runs `op` `n` times per batch; records the mean per op in `unit_ns`
/// units, or the first error.
fn batches(
    out: &mut Vec<f64>,
    errors: &mut Vec<String>,
    name: &str,
    sizes: Sizes,
    n: usize,
    unit_ns: f64,
    mut op: impl FnMut() -> std::io::Result<()>,
) {
    for _ in 0..sizes.batches {
        let t = Instant::now();
        for _ in 0..n {
            if let Err(e) = op() {
                errors.push(format!("{name}: {e}"));
                out.clear();
                return;
            }
        }
        let v = per_op(t, n, unit_ns);
        if v <= 0.0 {
            // A clock coarser than the batch (a guest on jiffies): no figure
            // rather than a false zero.
            errors.push(format!(
                "{name}: the clock did not advance over a batch of {n}"
            ));
            out.clear();
            return;
        }
        out.push(v);
    }
}

fn micro(exe: &Path, data: &Path, s: Sizes) -> Micro {
    let mut m = Micro::default();
    let e = &mut m.errors;
    batches(&mut m.getpid_ns, e, "getpid", s, s.getpid, 1.0, || {
        std::hint::black_box(rustix::process::getpid());
        Ok(())
    });
    batches(
        &mut m.open_close_ns,
        e,
        "open",
        s,
        s.open_close,
        1.0,
        || {
            let fd = rustix::fs::open(exe, rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty())?;
            drop(fd);
            Ok(())
        },
    );
    batches(&mut m.stat_ns, e, "stat", s, s.stat, 1.0, || {
        std::hint::black_box(rustix::fs::stat(exe)?);
        Ok(())
    });
    batches(
        &mut m.fork_exec_wait_us,
        e,
        "fork+exec",
        s,
        s.fork_exec,
        1e3,
        || {
            let st = std::process::Command::new(exe).arg("bench-true").status()?;
            if st.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("helper exited {st}")))
            }
        },
    );
    let file = data.join(format!("fsync-{}", std::process::id()));
    match std::fs::File::create(&file) {
        Ok(mut f) => {
            let page = [0x5au8; 4096];
            batches(
                &mut m.write_fsync_us,
                e,
                "write+fsync",
                s,
                s.write_fsync,
                1e3,
                || {
                    f.write_all(&page)?;
                    f.sync_all()
                },
            );
            let _ = std::fs::remove_file(&file);
        }
        Err(err) => e.push(format!("write+fsync: create {}: {err}", file.display())),
    }
    match pipe_pair() {
        Ok((mut to, mut from, echo)) => {
            batches(&mut m.pipe_rtt_us, e, "pipe", s, s.round_trips, 1e3, || {
                round_trip(&mut to, &mut from)
            });
            drop(to);
            let _ = echo.join();
        }
        Err(err) => e.push(format!("pipe: {err}")),
    }
    match tcp_pair() {
        Ok((mut conn, echo)) => {
            let mut reader = conn.try_clone();
            match &mut reader {
                Ok(r) => batches(&mut m.tcp_rtt_us, e, "tcp", s, s.round_trips, 1e3, || {
                    round_trip(&mut conn, r)
                }),
                Err(err) => e.push(format!("tcp: {err}")),
            }
            drop(conn);
            drop(reader);
            let _ = echo.join();
        }
        Err(err) => e.push(format!("tcp loopback: {err}")),
    }
    const PAGE: usize = 4096;
    let pages = s.touch_mib * (1 << 20) / PAGE;
    for _ in 0..s.batches {
        let t = Instant::now();
        // Fresh zero pages each batch: every touch is a page fault.
        let mut buf = vec![0u8; pages * PAGE];
        for p in 0..pages {
            buf[p * PAGE] = 1;
        }
        std::hint::black_box(&buf);
        m.touch_ns_per_page.push(per_op(t, pages, 1.0));
    }
    m
}

fn round_trip(to: &mut impl Write, from: &mut impl Read) -> std::io::Result<()> {
    to.write_all(b"x")?;
    let mut b = [0u8; 1];
    from.read_exact(&mut b)
}

type Echo = std::thread::JoinHandle<()>;

/// Two pipes and a thread that echoes one into the other.
fn pipe_pair() -> std::io::Result<(std::fs::File, std::fs::File, Echo)> {
    let (r1, w1) = rustix::pipe::pipe()?;
    let (r2, w2) = rustix::pipe::pipe()?;
    let (mut r1, mut w2) = (std::fs::File::from(r1), std::fs::File::from(w2));
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while r1.read_exact(&mut b).is_ok() && w2.write_all(&b).is_ok() {}
    });
    Ok((std::fs::File::from(w1), std::fs::File::from(r2), echo))
}

/// A loopback TCP connection (no Nagle) to a thread that echoes it.
fn tcp_pair() -> std::io::Result<(std::net::TcpStream, Echo)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.set_nodelay(true);
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
        }
    });
    let c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    Ok((c, echo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip_through_argv() {
        let s = Sizes::new(true);
        let args = micro_args(Path::new("/usr/bin/moat-bench"), Path::new("/var/tmp"), s);
        assert_eq!(args.len(), 12);
        let back = Sizes::from_args(&args[4..]).unwrap();
        assert_eq!(back.getpid, s.getpid);
        assert_eq!(back.touch_mib, s.touch_mib);
        assert!(Sizes::from_args(&args[5..]).is_none());
    }

    #[test]
    fn micro_benchmarks_measure_on_the_host() {
        let data = tempfile::tempdir().unwrap();
        let tiny = Sizes {
            batches: 2,
            getpid: 10,
            open_close: 5,
            stat: 5,
            fork_exec: 0,
            write_fsync: 2,
            round_trips: 5,
            touch_mib: 1,
        };
        // `/bin/true` stands in for the helper; fork+exec is off (0 per batch).
        let m = micro(Path::new("/bin/true"), data.path(), tiny);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        for (name, v) in [
            ("getpid", &m.getpid_ns),
            ("open", &m.open_close_ns),
            ("stat", &m.stat_ns),
            ("fsync", &m.write_fsync_us),
            ("pipe", &m.pipe_rtt_us),
            ("tcp", &m.tcp_rtt_us),
            ("touch", &m.touch_ns_per_page),
        ] {
            assert_eq!(v.len(), 2, "{name}");
            assert!(v.iter().all(|x| *x > 0.0), "{name}: {v:?}");
        }
        assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0);
    }
}
