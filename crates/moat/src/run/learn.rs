//! `moat policy learn [-o FILE] [RUN OPTIONS] [IMAGE] -- CMD…`: runs the
//! command as `moat run --isolation sandbox` would, with the sandbox in
//! learning mode (nothing refused by the policy, every path use recorded),
//! and writes the smallest policy that would have let it run
//! (docs/sandbox.md, "Learning a policy"). The run's options are those of
//! `moat run`; the exit status is the command's.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{GLOBAL_VALUE_FLAGS, RUN_VALUE_FLAGS};

pub const USAGE: &str = "\
Run a command in the sandbox tier and write the smallest sandbox policy it needed

Usage: moat policy learn [-o FILE] [RUN OPTIONS] [IMAGE] [--] CMD [ARGS...]

Options:
  -o, --output FILE  Where the policy goes (default: standard output, after the command's own output)
  -h, --help         Print help

RUN OPTIONS are those of `moat run` (see `moat run --help`), but --policy and
an --isolation other than sandbox. Then `moat run --isolation sandbox --policy
FILE` runs the command with that policy enforced.";

/// Learning mode, as asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Learn {
    pub output: Option<PathBuf>,
}

/// Where the supervisor writes the policy, and whether it is printed.
pub struct Destination {
    pub file: PathBuf,
    print: bool,
}

impl Learn {
    /// The file the supervisor writes: `-o FILE`, or one in the run's
    /// directory that [`Destination::finish`] prints.
    pub fn destination(&self, run_dir: &Path) -> Result<Destination> {
        Ok(match &self.output {
            Some(f) => Destination {
                file: std::path::absolute(f)
                    .with_context(|| format!("-o: cannot resolve {}", f.display()))?,
                print: false,
            },
            None => Destination {
                file: run_dir.join("learned-policy.json"),
                print: true,
            },
        })
    }
}

impl Destination {
    /// Once the sandbox is deleted: the policy is there (and printed when
    /// no file was named).
    pub fn finish(&self) -> Result<()> {
        let text = std::fs::read_to_string(&self.file)
            .with_context(|| format!("cannot read the learned policy {}", self.file.display()))?;
        if text.is_empty() {
            bail!("the sandbox supervisor wrote no policy");
        }
        moat_sandbox::Policy::parse(text.as_bytes())
            .context("the learned policy does not parse")?;
        if self.print {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .context("cannot print the learned policy")?;
        } else {
            tracing::info!("policy written to {}", self.file.display());
        }
        Ok(())
    }
}

/// A `moat policy learn` command line: the argv for `moat run`'s parser
/// and `-o`'s value, or the usage (`None`) or a usage error.
pub type Parsed = Result<(Vec<String>, Option<PathBuf>), Option<String>>;

/// What `args` (argv[0] included) asks for when it is `moat [GLOBAL]
/// policy learn …`: `None` for any other command line; else the argv for
/// `moat run`'s parser (the global options, then the run's), and `-o`'s
/// value. `Err(None)` asks for the usage text, `Err(Some(msg))` is a usage
/// error.
pub fn argv(args: &[String]) -> Option<Parsed> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if GLOBAL_VALUE_FLAGS.contains(&a) {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            break;
        }
    }
    if args.get(i).map(String::as_str) != Some("policy")
        || args.get(i + 1).map(String::as_str) != Some("learn")
    {
        return None;
    }
    let mut run = vec!["moat run".to_string()];
    run.extend_from_slice(&args[1..i]);
    let mut output = None;
    let rest = &args[i + 2..];
    let mut j = 0;
    // Options come before the first positional argument or `--`; what
    // follows is the image and the command, passed on untouched.
    while j < rest.len() {
        let a = rest[j].as_str();
        if a == "--" || !a.starts_with('-') || a == "-" {
            break;
        }
        if a == "-h" || a == "--help" {
            return Some(Err(None));
        }
        let value = if a == "-o" || a == "--output" {
            j += 1;
            match rest.get(j) {
                Some(v) => Some(v.clone()),
                None => return Some(Err(Some(format!("{a} needs a FILE")))),
            }
        } else {
            a.strip_prefix("--output=").map(str::to_string)
        };
        if let Some(v) = value {
            if output.replace(PathBuf::from(v)).is_some() {
                return Some(Err(Some("-o is given twice".into())));
            }
            j += 1;
            continue;
        }
        run.push(rest[j].clone());
        if (RUN_VALUE_FLAGS.contains(&a) || GLOBAL_VALUE_FLAGS.contains(&a)) && j + 1 < rest.len() {
            j += 1;
            run.push(rest[j].clone());
        }
        j += 1;
    }
    run.extend_from_slice(&rest[j..]);
    Some(Ok((run, output)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn learn_command_lines_become_run_command_lines() {
        let (run, out) = argv(&v(
            "moat --root /r policy learn -o p.json -v /a:/b -- ls -o x",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            run,
            v("moat@run --root /r -v /a:/b -- ls -o x")
                .into_iter()
                .map(|a| a.replace('@', " "))
                .collect::<Vec<_>>()
        );
        assert_eq!(out, Some(PathBuf::from("p.json")));
        let (run, out) = argv(&v("moat policy learn --output=q -- true"))
            .unwrap()
            .unwrap();
        assert_eq!(run[1..], v("-- true"));
        assert_eq!(out, Some(PathBuf::from("q")));
        // A value that looks like -o belongs to its option.
        let (run, out) = argv(&v("moat policy learn -e -o -- true"))
            .unwrap()
            .unwrap();
        assert_eq!(run[1..], v("-e -o -- true"));
        assert_eq!(out, None);
        assert!(matches!(
            argv(&v("moat policy learn --help")),
            Some(Err(None))
        ));
        assert!(matches!(
            argv(&v("moat policy learn -o")),
            Some(Err(Some(_)))
        ));
        assert!(matches!(
            argv(&v("moat policy learn -o a -o b -- true")),
            Some(Err(Some(_)))
        ));
        assert!(argv(&v("moat policy show")).is_none());
        assert!(argv(&v("moat run -- policy learn")).is_none());
    }
}
