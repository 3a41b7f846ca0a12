//! The embedded default root of `moat run` (no image): which host files it
//! shows, read-only. `moat audit` knows them too, to rate such mounts.
//! docs/run.md lists them with the files never shown and why.

/// Top-level host directories shared read-only (those that exist).
pub const HOST_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib64", "lib32"];

/// Host /etc entries ordinary programs read, shown read-only where the host
/// has them (a `*` matches any run of characters in one name). None holds a
/// secret or a host identifier; what is left out on purpose is
/// [`NEVER_ETC`].
pub const HOST_ETC: &[&str] = &[
    // The dynamic linker.
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    // Name resolution and address selection (getaddrinfo).
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    // The netdb files: getservbyname, getprotobyname, getrpcbyname,
    // getnetbyname, ethertypes.
    "services",
    "protocols",
    "rpc",
    "networks",
    "ethertypes",
    // Time zone.
    "localtime",
    "timezone",
    // TLS: CA certificates and OpenSSL's configuration, not /etc/ssl/private.
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "pki/tls/certs",
    "pki/ca-trust",
    "crypto-policies",
    // What system this is (programs and language runtimes read it).
    "os-release",
    "lsb-release",
    // Locale, MIME types, terminals, readline, fonts.
    "locale.alias",
    "locale.conf",
    "mime.types",
    "mailcap",
    "terminfo",
    "inputrc",
    "fonts",
    // Debian's alternatives (targets of /usr/bin links) and language
    // runtime configuration that /usr links into /etc (the JDK's
    // conf/security/java.security).
    "alternatives",
    "java-*-openjdk",
];

/// Host /etc entries never shown, each for a reason (docs/run.md says it to
/// users; a test checks none of them is reachable).
pub const NEVER_ETC: &[(&str, &str)] = &[
    ("shadow", "password hashes"),
    ("gshadow", "group password hashes"),
    ("passwd", "the host's accounts (a synthesized one is shown)"),
    ("group", "the host's groups (a synthesized one is shown)"),
    ("sudoers", "who may become root on the host"),
    ("sudoers.d", "who may become root on the host"),
    ("ssh", "SSH host private keys"),
    ("ssl/private", "TLS private keys"),
    ("pki/tls/private", "TLS private keys"),
    ("krb5.keytab", "Kerberos credentials"),
    ("machine-id", "a stable identifier of the host (tracking)"),
    ("subuid", "the host's ID delegation"),
    ("subgid", "the host's ID delegation"),
    ("fstab", "the host's disks and mounts"),
    ("docker", "the Docker daemon's configuration and TLS keys"),
    ("containerd", "the container runtime's configuration"),
    ("gitconfig", "may hold credentials or tokens"),
    ("npmrc", "may hold registry tokens"),
    ("pip.conf", "may hold index credentials"),
    ("environment", "may hold proxy credentials"),
    ("apt/auth.conf.d", "package repository credentials"),
    ("NetworkManager", "Wi-Fi and VPN secrets"),
    ("wireguard", "VPN private keys"),
    ("letsencrypt", "TLS private keys"),
    ("hostname", "the host's name (the container has its own)"),
];

/// Whether `name` (a path under /etc) matches `pattern` (one `*` at most).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((pre, post)) => {
            name.len() >= pre.len() + post.len()
                && name.starts_with(pre)
                && name.ends_with(post)
                && !name[pre.len()..name.len() - post.len()].contains('/')
        }
    }
}

/// Whether /etc/`name` is one of [`HOST_ETC`].
pub fn shown_etc(name: &str) -> bool {
    HOST_ETC.iter().any(|p| matches(p, name))
}

/// The entries of [`HOST_ETC`] under `etc`, patterns expanded (sorted); an
/// entry may not exist (the caller checks).
pub fn host_etc_entries(etc: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for p in HOST_ETC {
        if !p.contains('*') {
            out.push(p.to_string());
            continue;
        }
        let mut found: Vec<String> = std::fs::read_dir(etc)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| matches(p, n))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        out.extend(found);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_one_name() {
        assert!(matches("java-*-openjdk", "java-17-openjdk"));
        assert!(!matches("java-*-openjdk", "java-17-openjdk-x"));
        assert!(!matches("java-*-openjdk", "java-1/x-openjdk"));
        assert!(matches("services", "services"));
        assert!(shown_etc("java-21-openjdk") && shown_etc("ssl/certs"));
        assert!(!shown_etc("ssl") && !shown_etc("ssl/private"));
    }

    #[test]
    fn nothing_secret_is_shown() {
        for (never, _) in NEVER_ETC {
            assert!(!shown_etc(never), "{never}");
            assert!(
                !HOST_ETC
                    .iter()
                    .any(|s| never.starts_with(&format!("{s}/"))
                        || s.starts_with(&format!("{never}/"))),
                "{never}"
            );
        }
    }
}
