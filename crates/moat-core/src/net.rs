//! How a config asks for moat's user-space network (every tier reads the
//! same annotations; `moat run --net egress=… -p …` writes them).

/// The egress rules, comma-separated `HOST[:PORT]`, `CIDR[:PORT]` or
/// `*.DOMAIN[:PORT]` (an empty value allows nothing, but still gives the
/// container the device, a DNS that refuses every name, and published ports).
pub const EGRESS_ANNOTATION: &str = "dev.moat.net.egress";

/// Published ports, comma-separated `[HOSTADDR:]HOSTPORT:PORT`.
pub const PUBLISH_ANNOTATION: &str = "dev.moat.net.publish";
