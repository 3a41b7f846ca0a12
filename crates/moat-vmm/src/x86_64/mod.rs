//! x86_64 specifics: CPUID, MSRs, registers and page tables for a 64-bit
//! entry, the Linux zero page, and the ACPI and MP tables that tell Linux
//! about the vCPUs and devices.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod mptable;
pub mod msr;
pub mod regs;
