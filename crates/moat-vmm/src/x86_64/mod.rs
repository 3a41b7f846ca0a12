//! x86_64 specifics: CPUID, MSRs, registers and page tables for a 64-bit
//! entry, the Linux zero page, and the MP table that tells Linux about the
//! vCPUs.

pub mod boot;
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;
