//! fuzz-ci: runs moat's fuzz targets on a stable toolchain, each for a
//! bounded time, by mutating its seed corpus (`seeds/TARGET/`): bit flips,
//! byte changes, inserts, deletes, copies within an input, splices of two
//! inputs, and tokens taken from the seeds (JSON strings, keys, numbers).
//! Seeds that are JSON (after a prefix of at most one byte) are also
//! mutated as JSON trees, so most inputs still parse and reach the checks
//! behind the parser: values replaced by others from the seeds or by edge
//! values, keys added and removed, arrays grown, nodes nested deeper.
//! Not coverage-guided (that is `cargo fuzz run TARGET`, on nightly); its
//! pool keeps a sample of what it made, so mutations pile up.
//!
//! A panic (a failed property, an overflow: this build keeps overflow and
//! debug assertions) or one input running for over a minute is a finding:
//! the input is written to `artifacts/TARGET/` and the run exits 1.
//!
//! Usage: fuzz-ci [--seconds N] [--seed N] [TARGET...]
//! (default: every target, MOAT_FUZZ_SECONDS or 20 seconds each);
//! fuzz-ci --replay FILE TARGET runs one saved input; --list names them.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_fuzz::{Target, TARGETS};
use serde_json::Value;

/// Inputs grow to at most this, or twice the largest seed.
const MAX_INPUT: usize = 64 * 1024;
/// Mutated inputs kept to mutate further.
const POOL: usize = 512;
/// One input running longer than this is a hang.
const HANG: Duration = Duration::from_secs(60);

/// xorshift64*: a seeded, reproducible generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that find edge cases, as text and as little-endian bytes.
const INTERESTING: &[i64] = &[
    0,
    1,
    -1,
    7,
    8,
    127,
    128,
    255,
    256,
    4095,
    4096,
    65535,
    65536,
    i32::MAX as i64,
    i32::MIN as i64,
    u32::MAX as i64,
    i64::MAX,
    i64::MIN,
];

struct Corpus {
    seeds: Vec<Vec<u8>>,
    /// The seeds that are JSON after a prefix: (prefix, document).
    json: Vec<(Vec<u8>, Value)>,
    /// Every value and key found in them, to graft elsewhere.
    values: Vec<Value>,
    keys: Vec<String>,
    pool: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
    max_len: usize,
}

impl Corpus {
    fn load(dir: &Path) -> Corpus {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        let seeds: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
        let mut tokens = BTreeSet::new();
        for s in &seeds {
            extract_tokens(s, &mut tokens);
        }
        for t in [
            "{", "}", "[", "]", ":", ",", "\"", "null", "true", "false", "\"\"", "{}", "[]",
            "\\u0000", "1e999", "-0", "..", "/", "../../", "\n", "---\n", "&a", "*a", "!!binary",
        ] {
            tokens.insert(t.as_bytes().to_vec());
        }
        for v in INTERESTING {
            tokens.insert(v.to_string().into_bytes());
        }
        let largest = seeds.iter().map(Vec::len).max().unwrap_or(0);
        let mut json = Vec::new();
        for s in &seeds {
            for k in 0..=1.min(s.len()) {
                if let Ok(v) = serde_json::from_slice::<Value>(&s[k..]) {
                    json.push((s[..k].to_vec(), v));
                    break;
                }
            }
        }
        let mut values = Vec::new();
        let mut keys = BTreeSet::new();
        for (_, v) in &json {
            collect(v, &mut values, &mut keys);
        }
        values.extend(edge_values());
        Corpus {
            json,
            values,
            keys: keys.into_iter().collect(),
            seeds,
            pool: Vec::new(),
            tokens: tokens.into_iter().collect(),
            max_len: MAX_INPUT.max(largest * 2),
        }
    }

    /// A JSON seed changed as a tree, serialised after its prefix.
    fn json_input(&self, rng: &mut Rng) -> Option<Vec<u8>> {
        if self.json.is_empty() {
            return None;
        }
        let (prefix, doc) = &self.json[rng.below(self.json.len())];
        let mut doc = doc.clone();
        for _ in 0..1 + rng.below(4) {
            mutate_json(rng, self, &mut doc, 0);
        }
        let mut out = prefix.clone();
        let body = if rng.below(2) == 0 {
            serde_json::to_vec(&doc)
        } else {
            serde_json::to_vec_pretty(&doc)
        };
        out.extend(body.ok()?);
        Some(out)
    }

    fn pick<'a>(&'a self, rng: &mut Rng) -> &'a [u8] {
        let n = self.seeds.len() + self.pool.len();
        if n == 0 {
            return &[];
        }
        let i = rng.below(n);
        if i < self.seeds.len() {
            &self.seeds[i]
        } else {
            &self.pool[i - self.seeds.len()]
        }
    }

    fn keep(&mut self, rng: &mut Rng, input: Vec<u8>) {
        if self.pool.len() < POOL {
            self.pool.push(input);
        } else {
            let i = rng.below(POOL);
            self.pool[i] = input;
        }
    }
}

/// Sub-values (at most 4096) and object keys of `v`.
fn collect(v: &Value, values: &mut Vec<Value>, keys: &mut BTreeSet<String>) {
    if values.len() < 4096 {
        values.push(v.clone());
    }
    match v {
        Value::Array(a) => a.iter().for_each(|x| collect(x, values, keys)),
        Value::Object(o) => {
            for (k, x) in o {
                keys.insert(k.clone());
                collect(x, values, keys);
            }
        }
        _ => {}
    }
}

fn edge_values() -> Vec<Value> {
    let mut v: Vec<Value> = vec![
        Value::Null,
        Value::Bool(true),
        Value::Bool(false),
        Value::from(""),
        Value::from("/"),
        Value::from("../../../etc/shadow"),
        Value::from("a\u{0}b"),
        Value::from("x".repeat(5000)),
        Value::from("\u{202e}\u{feff}é"),
        Value::from(1e308),
        Value::from(-0.5),
        Value::from(u64::MAX),
        Value::Array(Vec::new()),
        Value::Object(Default::default()),
    ];
    v.extend(INTERESTING.iter().map(|&i| Value::from(i)));
    // Deep nesting.
    let mut deep = Value::Null;
    for _ in 0..100 {
        deep = Value::Array(vec![deep]);
    }
    v.push(deep);
    v
}

/// One structural change somewhere in `v`.
fn mutate_json(rng: &mut Rng, corpus: &Corpus, v: &mut Value, depth: usize) {
    // Go down to a child with some probability, else change this node.
    let children = match v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if children > 0 && depth < 64 && rng.below(3) != 0 {
        let i = rng.below(children);
        let child = match v {
            Value::Array(a) => &mut a[i],
            Value::Object(o) => o.values_mut().nth(i).expect("index below len"),
            _ => unreachable!("only containers have children"),
        };
        return mutate_json(rng, corpus, child, depth + 1);
    }
    let graft = |rng: &mut Rng| corpus.values[rng.below(corpus.values.len())].clone();
    match (rng.below(8), &mut *v) {
        (0 | 1, _) => *v = graft(rng),
        (2, Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(rng.below(o.len())).cloned().expect("a key");
            o.remove(&k);
        }
        (2 | 3, Value::Object(o)) if !corpus.keys.is_empty() => {
            let k = corpus.keys[rng.below(corpus.keys.len())].clone();
            o.insert(k, graft(rng));
        }
        (2, Value::Array(a)) if !a.is_empty() => {
            a.remove(rng.below(a.len()));
        }
        (3, Value::Array(a)) => {
            let x = if a.is_empty() || rng.below(2) == 0 {
                graft(rng)
            } else {
                a[rng.below(a.len())].clone()
            };
            let most = if rng.below(8) == 0 { 300 } else { 3 };
            let n = 1 + rng.below(most);
            for _ in 0..n {
                a.push(x.clone());
            }
        }
        (4, Value::Number(_)) => {
            *v = Value::from(INTERESTING[rng.below(INTERESTING.len())]);
        }
        (4, Value::String(s)) => {
            let mut b = s.clone().into_bytes();
            let i = rng.below(b.len() + 1);
            let t: &[u8] = [&b"/.."[..], b"\0", b"%", b"*", b":", b",", b" ", b"\n"][rng.below(8)];
            b.splice(i..i, t.iter().copied());
            *s = String::from_utf8_lossy(&b).into_owned();
        }
        (5, _) => *v = Value::Array(vec![v.take()]),
        (6, _) if !corpus.keys.is_empty() => {
            let k = corpus.keys[rng.below(corpus.keys.len())].clone();
            let mut o = serde_json::Map::new();
            o.insert(k, v.take());
            *v = Value::Object(o);
        }
        _ => *v = graft(rng),
    }
}

/// JSON string literals (with and without quotes) and numbers in `s`.
fn extract_tokens(s: &[u8], out: &mut BTreeSet<Vec<u8>>) {
    let mut i = 0;
    while i < s.len() && out.len() < 4096 {
        match s[i] {
            b'"' => {
                let end = s[i + 1..]
                    .iter()
                    .position(|&b| b == b'"')
                    .map(|p| i + 1 + p);
                if let Some(e) = end {
                    if e - i <= 64 {
                        out.insert(s[i..=e].to_vec());
                        out.insert(s[i + 1..e].to_vec());
                    }
                    i = e + 1;
                    continue;
                }
            }
            b'0'..=b'9' => {
                let len = s[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                out.insert(s[i..i + len].to_vec());
                i += len;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

fn mutate(rng: &mut Rng, corpus: &Corpus, input: &mut Vec<u8>) {
    let rounds = 1 + rng.below(6);
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                // Copy a range of the input elsewhere in it.
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(256));
                let chunk = input[from..from + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, chunk);
            }
            5 => {
                // Splice: our head, another input's tail.
                let other = corpus.pick(rng);
                if !other.is_empty() {
                    let cut = rng.below(len + 1);
                    let from = rng.below(other.len());
                    input.truncate(cut);
                    input.extend_from_slice(&other[from..]);
                }
            }
            6 | 7 if !corpus.tokens.is_empty() => {
                let t = &corpus.tokens[rng.below(corpus.tokens.len())];
                let i = rng.below(len + 1);
                if rng.below(2) == 0 && len > 0 {
                    // Overwrite what is there.
                    let end = (i + t.len()).min(len);
                    input.splice(i..end, t.iter().copied());
                } else {
                    input.splice(i..i, t.iter().copied());
                }
            }
            8 if len >= 4 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.below(4)].min(len);
                let i = rng.below(len - width + 1);
                input[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            9 if len > 1 => input.truncate(rng.below(len)),
            10 if len > 0 => {
                // Repeat a range: deep nesting, long runs.
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(16));
                let chunk = input[from..from + n].to_vec();
                let times = 1 + rng.below(64);
                for _ in 0..times {
                    input.splice(from..from, chunk.iter().copied());
                }
            }
            _ => {}
        }
    }
    input.truncate(corpus.max_len);
}

/// What the watchdog sees of the input running now.
struct Current {
    target: Mutex<&'static str>,
    input: Mutex<Vec<u8>>,
    /// Milliseconds since `epoch` when it started; 0 when idle.
    started: AtomicU64,
    epoch: Instant,
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a finding; returns its path.
fn save(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = fuzz_dir().join("artifacts").join(target);
    let _ = std::fs::create_dir_all(&dir);
    // FNV-1a names it by content.
    let h = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let p = dir.join(format!("{kind}-{h:016x}"));
    let _ = std::fs::write(&p, input);
    p
}

struct Report {
    seeds: usize,
    iterations: u64,
    /// Inputs that got past the target's first parser.
    reached: u64,
    findings: Vec<PathBuf>,
}

fn run_target(t: &Target, seconds: u64, seed: u64, current: &Current) -> Report {
    moat_fuzz::take_reached();
    let mut corpus = Corpus::load(&fuzz_dir().join("seeds").join(t.name));
    let mut rng = Rng(seed
        ^ t.name.bytes().fold(0x9e37_79b9_7f4a_7c15_u64, |h, b| {
            h.rotate_left(5) ^ u64::from(b)
        })
        | 1);
    *current.target.lock().unwrap_or_else(|e| e.into_inner()) = t.name;
    let mut findings = Vec::new();
    let mut iterations = 0u64;
    let one = |input: &[u8], findings: &mut Vec<PathBuf>| {
        *current.input.lock().unwrap_or_else(|e| e.into_inner()) = input.to_vec();
        let ms = current.epoch.elapsed().as_millis() as u64;
        current.started.store(ms.max(1), Ordering::SeqCst);
        let r = catch_unwind(AssertUnwindSafe(|| (t.run)(input)));
        current.started.store(0, Ordering::SeqCst);
        if r.is_err() {
            let p = save(t.name, "crash", input);
            eprintln!(
                "fuzz-ci: {}: panicked; input saved as {}",
                t.name,
                p.display()
            );
            findings.push(p);
        }
    };
    // Every seed as it is first: a seed that fails is a finding too.
    for s in corpus.seeds.clone() {
        one(&s, &mut findings);
        iterations += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline && findings.len() < 8 {
        // Half the time a JSON tree change (now and then with a byte-level
        // change on top), else byte-level changes of any input.
        let json = if rng.below(2) == 0 {
            corpus.json_input(&mut rng)
        } else {
            None
        };
        let input = match json {
            Some(mut j) => {
                if rng.below(4) == 0 {
                    mutate(&mut rng, &corpus, &mut j);
                }
                j
            }
            None => {
                let mut i = corpus.pick(&mut rng).to_vec();
                mutate(&mut rng, &corpus, &mut i);
                i
            }
        };
        one(&input, &mut findings);
        iterations += 1;
        if rng.below(8) == 0 {
            corpus.keep(&mut rng, input);
        }
    }
    Report {
        seeds: corpus.seeds.len(),
        iterations,
        reached: moat_fuzz::take_reached(),
        findings,
    }
}

fn main() {
    let mut seconds: u64 = std::env::var("MOAT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut seed: u64 = 0x6d6f_6174;
    let mut names = Vec::new();
    let mut replay: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{what} needs a number")))
        };
        match a.as_str() {
            "--seconds" => seconds = num("--seconds"),
            "--seed" => seed = num("--seed"),
            "--replay" => {
                replay = Some(
                    args.next()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| usage("--replay needs a file")),
                )
            }
            "--list" => {
                for t in TARGETS {
                    println!("{}: {}", t.name, t.covers);
                }
                return;
            }
            "-h" | "--help" => usage(""),
            n => match moat_fuzz::target(n) {
                Some(t) => names.push(t),
                None => usage(&format!("unknown target {n}")),
            },
        }
    }
    if let Some(file) = replay {
        let [t] = names.as_slice() else {
            usage("--replay needs one target")
        };
        let input = std::fs::read(&file)
            .unwrap_or_else(|e| usage(&format!("cannot read {}: {e}", file.display())));
        (t.run)(&input);
        println!(
            "fuzz-ci: {}: {} ran without a finding",
            t.name,
            file.display()
        );
        return;
    }
    if names.is_empty() {
        names = TARGETS.iter().collect();
    }
    // Panics are reported with their input; the default hook's message stays.
    let current = Arc::new(Current {
        target: Mutex::new(""),
        input: Mutex::new(Vec::new()),
        started: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let watch = Arc::clone(&current);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let started = watch.started.load(Ordering::SeqCst);
        let now = watch.epoch.elapsed().as_millis() as u64;
        if started != 0 && now.saturating_sub(started) > HANG.as_millis() as u64 {
            let t = *watch.target.lock().unwrap_or_else(|e| e.into_inner());
            let input = watch
                .input
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let p = save(t, "hang", &input);
            eprintln!(
                "fuzz-ci: {t}: one input ran for over {HANG:?}; saved as {}",
                p.display()
            );
            std::process::exit(1);
        }
    });
    println!("fuzz-ci: seed {seed:#x}, {seconds} s per target");
    let mut failed = 0;
    let mut total = 0;
    let start = Instant::now();
    for t in names {
        let r = run_target(t, seconds, seed, &current);
        total += r.iterations;
        println!(
            "{:<16} {:>9} inputs, {:>8} parsed ({} seeds)  {}",
            t.name,
            r.iterations,
            r.reached,
            r.seeds,
            if r.findings.is_empty() {
                "ok".to_string()
            } else {
                format!("{} FINDINGS", r.findings.len())
            }
        );
        if !r.findings.is_empty() {
            failed += 1;
        }
    }
    println!(
        "fuzz-ci: {total} inputs in {:.0} s, {failed} target(s) with findings",
        start.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

fn usage(why: &str) -> ! {
    if !why.is_empty() {
        eprintln!("fuzz-ci: {why}");
    }
    eprintln!(
        "usage: fuzz-ci [--seconds N] [--seed N] [--list] [TARGET...] | --replay FILE TARGET"
    );
    std::process::exit(2);
}
