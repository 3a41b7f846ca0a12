//! Device access rules: `devices.allow`/`devices.deny` lines for v1 and an
//! eBPF `BPF_PROG_TYPE_CGROUP_DEVICE` program for v2. Generation is pure.
//!
//! Semantics (both versions): everything is denied unless a rule allows it,
//! and a later rule overrides an earlier one. An allow rule matches a request
//! whose access bits are all in the rule's; a deny rule matches a request
//! sharing any access bit with it (so "deny w" refuses an "rw" open, as v1
//! does). FIFO ("p") rules are skipped: the device controller never sees FIFOs.
use moat_sys::bpf::BpfInsn;
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::CgroupError;

/// `BPF_DEVCG_ACC_*` bits.
const ACC_MKNOD: u8 = 1;
const ACC_READ: u8 = 2;
const ACC_WRITE: u8 = 4;
const ACC_ALL: u8 = ACC_MKNOD | ACC_READ | ACC_WRITE;
/// `BPF_DEVCG_DEV_*` types.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;

/// One validated rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DevRule {
    pub allow: bool,
    /// 'b' or 'c'; None for all.
    pub kind: Option<char>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u8,
}

fn num(field: &str, v: Option<i64>) -> Result<Option<u32>, CgroupError> {
    match v {
        None => Ok(None),
        Some(n) if n < 0 => Ok(None), // -1 is the conventional wildcard
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| CgroupError::InvalidValue {
                setting: format!("devices.{field}"),
                reason: format!("{n} is out of range"),
            }),
    }
}

/// Validates the OCI rules; FIFO rules are dropped (see module docs).
pub(crate) fn parse_rules(rules: &[LinuxDeviceCgroup]) -> Result<Vec<DevRule>, CgroupError> {
    let mut out = Vec::new();
    for r in rules {
        let kind = match r.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some('b'),
            LinuxDeviceType::C | LinuxDeviceType::U => Some('c'),
            LinuxDeviceType::P => continue,
        };
        let access_str = r.access().as_deref().unwrap_or("rwm");
        let access_str = if access_str.is_empty() {
            "rwm"
        } else {
            access_str
        };
        let mut access = 0;
        for c in access_str.chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                _ => {
                    return Err(CgroupError::InvalidValue {
                        setting: "devices.access".into(),
                        reason: format!("{access_str:?} is not made of r, w, m"),
                    })
                }
            };
        }
        out.push(DevRule {
            allow: r.allow(),
            kind,
            major: num("major", r.major())?,
            minor: num("minor", r.minor())?,
            access,
        });
    }
    Ok(out)
}

/// v1: (write to devices.allow?, line) after the initial "a" to devices.deny.
pub(crate) fn v1_lines(rules: &[DevRule]) -> Vec<(bool, String)> {
    let acc = |a: u8| {
        let mut s = String::new();
        for (bit, c) in [(ACC_READ, 'r'), (ACC_WRITE, 'w'), (ACC_MKNOD, 'm')] {
            if a & bit != 0 {
                s.push(c);
            }
        }
        s
    };
    let n = |v: Option<u32>| v.map_or("*".to_owned(), |v| v.to_string());
    let mut out = Vec::new();
    for r in rules {
        match r.kind {
            None if r.major.is_none() && r.minor.is_none() && r.access == ACC_ALL => {
                out.push((r.allow, "a".into()))
            }
            None => {
                for k in ['b', 'c'] {
                    out.push((
                        r.allow,
                        format!("{k} {}:{} {}", n(r.major), n(r.minor), acc(r.access)),
                    ));
                }
            }
            Some(k) => out.push((
                r.allow,
                format!("{k} {}:{} {}", n(r.major), n(r.minor), acc(r.access)),
            )),
        }
    }
    out
}

// Opcodes used below (class | op | source).
const LDX_MEM_W: u8 = 0x61;
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const ALU32_MOV_X: u8 = 0xbc;
const ALU64_MOV_K: u8 = 0xb7;
const JMP32_JNE_K: u8 = 0x56;
const JMP32_JNE_X: u8 = 0x5e;
const JMP32_JEQ_K: u8 = 0x16;
const EXIT: u8 = 0x95;

/// The v2 device filter for `rules`: registers after the prologue hold
/// r2 = type, r3 = access, r4 = major, r5 = minor (from `bpf_cgroup_dev_ctx`);
/// rules are tested last-first and the first match returns; no match denies.
pub(crate) fn bpf_program(rules: &[DevRule]) -> Vec<BpfInsn> {
    let mut p = vec![
        BpfInsn::new(LDX_MEM_W, 2, 1, 0, 0),
        BpfInsn::new(ALU32_AND_K, 2, 0, 0, 0xffff),
        BpfInsn::new(LDX_MEM_W, 3, 1, 0, 0),
        BpfInsn::new(ALU32_RSH_K, 3, 0, 0, 16),
        BpfInsn::new(LDX_MEM_W, 4, 1, 4, 0),
        BpfInsn::new(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        let (block, unconditional) = rule_block(r);
        p.extend(block);
        if unconditional {
            // Anything after would be unreachable, which the verifier refuses.
            return p;
        }
    }
    p.push(BpfInsn::new(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(BpfInsn::new(EXIT, 0, 0, 0, 0));
    p
}

/// One rule's instructions; every conditional jump skips to the block's end.
fn rule_block(r: &DevRule) -> (Vec<BpfInsn>, bool) {
    // (instruction, is a jump to the next block)
    let mut b: Vec<(BpfInsn, bool)> = Vec::new();
    if let Some(k) = r.kind {
        let t = if k == 'b' { DEV_BLOCK } else { DEV_CHAR };
        b.push((BpfInsn::new(JMP32_JNE_K, 2, 0, 0, t), true));
    }
    if r.allow && r.access != ACC_ALL {
        // Requested access must be within the rule's: (r3 & acc) == r3.
        b.push((BpfInsn::new(ALU32_MOV_X, 1, 3, 0, 0), false));
        b.push((
            BpfInsn::new(ALU32_AND_K, 1, 0, 0, i32::from(r.access)),
            false,
        ));
        b.push((BpfInsn::new(JMP32_JNE_X, 1, 3, 0, 0), true));
    } else if !r.allow {
        // Requested access shares a bit with the rule's: (r3 & acc) != 0.
        b.push((BpfInsn::new(ALU32_MOV_X, 1, 3, 0, 0), false));
        b.push((
            BpfInsn::new(ALU32_AND_K, 1, 0, 0, i32::from(r.access)),
            false,
        ));
        b.push((BpfInsn::new(JMP32_JEQ_K, 1, 0, 0, 0), true));
    }
    if let Some(m) = r.major {
        b.push((BpfInsn::new(JMP32_JNE_K, 4, 0, 0, m as i32), true));
    }
    if let Some(m) = r.minor {
        b.push((BpfInsn::new(JMP32_JNE_K, 5, 0, 0, m as i32), true));
    }
    let unconditional = !b.iter().any(|(_, j)| *j);
    b.push((
        BpfInsn::new(ALU64_MOV_K, 0, 0, 0, i32::from(r.allow)),
        false,
    ));
    b.push((BpfInsn::new(EXIT, 0, 0, 0, 0), false));
    let len = b.len();
    let insns = b
        .into_iter()
        .enumerate()
        .map(|(i, (mut insn, jump))| {
            if jump {
                // Blocks are a handful of instructions: the offset fits in i16.
                insn.off = (len - i - 1) as i16;
            }
            insn
        })
        .collect();
    (insns, unconditional)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs a device program the way the kernel would for one request;
    /// supports exactly the instructions `bpf_program` emits.
    pub(crate) fn eval(p: &[BpfInsn], kind: char, major: u32, minor: u32, access: u8) -> bool {
        let t: u32 = if kind == 'b' {
            DEV_BLOCK as u32
        } else {
            DEV_CHAR as u32
        };
        let ctx = [(u32::from(access) << 16) | t, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let imm32 = i.imm as u32;
            let mut next = pc + 1;
            match i.code {
                LDX_MEM_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                ALU32_AND_K => r[dst] = u64::from(r[dst] as u32 & imm32),
                ALU32_RSH_K => r[dst] = u64::from((r[dst] as u32) >> imm32),
                ALU32_MOV_X => r[dst] = u64::from(r[src] as u32),
                ALU64_MOV_K => r[dst] = i.imm as i64 as u64,
                JMP32_JNE_K if r[dst] as u32 != imm32 => next += i.off as usize,
                JMP32_JNE_X if r[dst] as u32 != r[src] as u32 => next += i.off as usize,
                JMP32_JEQ_K if r[dst] as u32 == imm32 => next += i.off as usize,
                JMP32_JNE_K | JMP32_JNE_X | JMP32_JEQ_K => {}
                EXIT => return r[0] == 1,
                c => panic!("unexpected opcode {c:#x}"),
            }
            pc = next;
        }
    }

    fn rules(json: &str) -> Vec<DevRule> {
        let v: Vec<LinuxDeviceCgroup> = serde_json::from_str(json).expect("test rules parse");
        parse_rules(&v).expect("valid rules")
    }

    const R: u8 = ACC_READ;
    const W: u8 = ACC_WRITE;
    const M: u8 = ACC_MKNOD;

    #[test]
    fn default_runc_like_list() {
        let p = bpf_program(&rules(
            r#"[{"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},
                {"allow":true,"type":"c","major":5,"minor":0,"access":"rw"},
                {"allow":true,"type":"c","major":136,"access":"rwm"}]"#,
        ));
        assert!(eval(&p, 'c', 1, 3, R | W));
        assert!(eval(&p, 'c', 1, 3, M));
        assert!(!eval(&p, 'b', 1, 3, R));
        assert!(eval(&p, 'c', 5, 0, R | W));
        assert!(!eval(&p, 'c', 5, 0, M), "mknod not in rw");
        assert!(eval(&p, 'c', 136, 7, W), "minor wildcard");
        assert!(!eval(&p, 'c', 8, 0, R));
        assert!(!eval(&p, 'b', 8, 0, R));
    }

    #[test]
    fn later_rules_win_and_deny_intersects() {
        let p = bpf_program(&rules(
            r#"[{"allow":true,"access":"rwm"},{"allow":false,"type":"b","major":8,"access":"w"}]"#,
        ));
        assert!(eval(&p, 'b', 8, 1, R));
        assert!(!eval(&p, 'b', 8, 1, W));
        assert!(!eval(&p, 'b', 8, 1, R | W));
        assert!(eval(&p, 'c', 8, 1, W));
        // The allow-all is the last block and unconditional: no default tail.
        assert_eq!(p.last().unwrap().code, EXIT);
    }

    #[test]
    fn unconditional_last_rule_stops_generation() {
        let p = bpf_program(&rules(
            r#"[{"allow":false,"type":"c","major":1},{"allow":true}]"#,
        ));
        assert_eq!(
            p.len(),
            6 + 2,
            "earlier rules are unreachable and must not be emitted"
        );
        assert!(eval(&p, 'c', 1, 1, R));
    }

    #[test]
    fn empty_list_denies_everything() {
        let p = bpf_program(&[]);
        assert!(!eval(&p, 'c', 1, 3, R));
    }

    #[test]
    fn big_major_uses_32_bit_compare() {
        let p = bpf_program(&rules(
            r#"[{"allow":true,"type":"c","major":4294967295,"minor":0}]"#,
        ));
        assert!(eval(&p, 'c', u32::MAX, 0, R));
        assert!(!eval(&p, 'c', 1, 0, R));
    }

    #[test]
    fn refuses_bad_access_and_skips_fifo() {
        let bad: Vec<LinuxDeviceCgroup> =
            serde_json::from_str(r#"[{"allow":true,"access":"rx"}]"#).unwrap();
        assert!(parse_rules(&bad).is_err());
        assert!(rules(r#"[{"allow":true,"type":"p"}]"#).is_empty());
    }

    #[test]
    fn v1_lines_for_rules() {
        let l = v1_lines(&rules(
            r#"[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rw"},
                {"allow":true,"major":10,"access":"m"}]"#,
        ));
        assert_eq!(
            l,
            [
                (false, "a".into()),
                (true, "c 1:3 rw".into()),
                (true, "b 10:* m".into()),
                (true, "c 10:* m".into())
            ]
        );
    }
}
