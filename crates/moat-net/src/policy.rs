//! The egress allow-list: rules `HOST[:PORT]`, `CIDR[:PORT]` and
//! `*.DOMAIN[:PORT]`, and the decision for one destination.
//!
//! A rule with no port allows every port. A name rule (`pypi.org`,
//! `*.pythonhosted.org`) does two things: the stack's DNS responder answers
//! for names it covers, and the addresses those answers carried become
//! reachable (on the rule's port) for as long as the stack remembers them
//! (see [`Learned`]). `*.DOMAIN` covers every name below DOMAIN, at any depth,
//! but not DOMAIN itself (write both rules for both).
//!
//! Some destinations are never reachable, whatever the rules say: loopback,
//! unspecified, multicast and broadcast addresses, the host's own addresses
//! (given to [`Egress`] by the IO shell), and link-local addresses (the cloud
//! metadata service lives at 169.254.169.254) unless a rule names a link-local
//! address or network explicitly. IPv4-mapped IPv6 addresses are judged as
//! the IPv4 address they carry. A rule naming only addresses of the first
//! four kinds could allow nothing, and is refused when parsed.
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Why one rule could not be parsed. Each message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("empty egress rule")]
    Empty,
    #[error("egress rule {rule:?}: port {port:?} is not a number from 1 to 65535")]
    Port { rule: String, port: String },
    #[error("egress rule {rule:?}: {addr:?} is not an IP address")]
    Address { rule: String, addr: String },
    #[error("egress rule {rule:?}: prefix length {prefix:?} is not a number from 0 to {max}")]
    Prefix {
        rule: String,
        prefix: String,
        max: u8,
    },
    #[error("egress rule {rule:?}: host bits are set; did you mean {suggestion}?")]
    HostBits { rule: String, suggestion: String },
    #[error("egress rule {rule:?}: {name:?} is not a host name ({why})")]
    Name {
        rule: String,
        name: String,
        why: &'static str,
    },
    #[error(
        "egress rule {rule:?}: unbalanced '[' (write an IPv6 address with a port as [ADDR]:PORT)"
    )]
    Bracket { rule: String },
    #[error(
        "egress rule {rule:?} names {what}, which the stack never reaches, whatever the rules"
    )]
    Unreachable { rule: String, what: String },
}

/// An IP network: an address and a prefix length, host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network `addr/prefix`, or `None` when the prefix is too long or
    /// host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<IpNet> {
        let net = IpNet { addr, prefix };
        (prefix <= max_prefix(addr) && net.network() == addr).then_some(net)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// `addr` with its host bits cleared.
    fn network(&self) -> IpAddr {
        mask(self.addr, self.prefix)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }

    /// Whether every address of `self` is inside `other`.
    pub fn within(&self, other: &IpNet) -> bool {
        self.prefix >= other.prefix && other.contains(self.addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One address.
    Addr(IpAddr),
    /// A network.
    Net(IpNet),
    /// One host name, lower case, without a trailing dot.
    Name(String),
    /// Every name below this domain (`*.DOMAIN`), lower case.
    Below(String),
}

/// One egress rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    /// `None`: every port.
    pub port: Option<u16>,
}

impl Rule {
    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// Whether this rule covers host name `name` (lower case, no trailing dot).
    pub fn covers_name(&self, name: &str) -> bool {
        match &self.target {
            Target::Name(n) => n == name,
            Target::Below(d) => {
                name.len() > d.len() + 1
                    && name.ends_with(d.as_str())
                    && name.as_bytes()[name.len() - d.len() - 1] == b'.'
            }
            Target::Addr(_) | Target::Net(_) => false,
        }
    }

    fn covers_addr(&self, ip: IpAddr) -> bool {
        match &self.target {
            Target::Addr(a) => *a == ip,
            Target::Net(n) => n.contains(ip),
            Target::Name(_) | Target::Below(_) => false,
        }
    }

    /// Whether this rule names link-local addresses on purpose.
    fn names_link_local(&self) -> bool {
        match &self.target {
            Target::Addr(a) => link_local(*a),
            Target::Net(n) => LINK_LOCAL.iter().any(|ll| n.within(ll)),
            Target::Name(_) | Target::Below(_) => false,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bracket = self.port.is_some()
            && matches!(
                self.target,
                Target::Addr(IpAddr::V6(_))
                    | Target::Net(IpNet {
                        addr: IpAddr::V6(_),
                        ..
                    })
            );
        let target = match &self.target {
            Target::Addr(a) => a.to_string(),
            Target::Net(n) => n.to_string(),
            Target::Name(n) => n.clone(),
            Target::Below(d) => format!("*.{d}"),
        };
        if bracket {
            write!(f, "[{target}]")?;
        } else {
            f.write_str(&target)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Rule, RuleError> {
        let rule = text.trim();
        if rule.is_empty() {
            return Err(RuleError::Empty);
        }
        let (host, port) = split_port(rule)?;
        let port = port.map(|p| parse_port(rule, p)).transpose()?;
        let target = parse_target(rule, host)?;
        if let Some(what) = never_reached(&target) {
            return Err(RuleError::Unreachable {
                rule: rule.into(),
                what,
            });
        }
        Ok(Rule { target, port })
    }
}

/// What a rule names that no destination it could allow is ever reached
/// ([`reserved`]: loopback, unspecified, multicast, broadcast): such a
/// rule allowed nothing, silently (`--net egress=127.0.0.1:8080`, meant for
/// the host's own service, ran and could not connect).
fn never_reached(target: &Target) -> Option<String> {
    match target {
        Target::Addr(a) => reserved(*a).map(|why| why.to_string()),
        Target::Net(n) => {
            let v4 = |a, b, c, d, prefix| IpNet {
                addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
                prefix,
            };
            let v6 = |addr: Ipv6Addr, prefix| IpNet {
                addr: IpAddr::V6(addr),
                prefix,
            };
            let classes = [
                (v4(127, 0, 0, 0, 8), "loopback"),
                (v6(Ipv6Addr::LOCALHOST, 128), "loopback"),
                (v4(0, 0, 0, 0, 8), "unspecified"),
                (v6(Ipv6Addr::UNSPECIFIED, 128), "unspecified"),
                (v4(224, 0, 0, 0, 4), "multicast"),
                (
                    v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
                    "multicast",
                ),
                (v4(255, 255, 255, 255, 32), "broadcast"),
            ];
            classes
                .iter()
                .find(|(net, _)| n.within(net))
                .map(|(_, kind)| format!("{n}, whose addresses are all {kind}"))
        }
        Target::Name(_) | Target::Below(_) => None,
    }
}

/// Splits `HOST[:PORT]`, `[V6]:PORT` or a bare IPv6 address or network.
fn split_port(rule: &str) -> Result<(&str, Option<&str>), RuleError> {
    if let Some(rest) = rule.strip_prefix('[') {
        let bracket = || RuleError::Bracket { rule: rule.into() };
        let (host, after) = rest.split_once(']').ok_or_else(bracket)?;
        return match after {
            "" => Ok((host, None)),
            _ => Ok((host, Some(after.strip_prefix(':').ok_or_else(bracket)?))),
        };
    }
    if rule.contains(']') {
        return Err(RuleError::Bracket { rule: rule.into() });
    }
    match rule.matches(':').count() {
        0 => Ok((rule, None)),
        1 => {
            let (h, p) = rule.split_once(':').unwrap_or((rule, ""));
            Ok((h, Some(p)))
        }
        _ => Ok((rule, None)), // a bare IPv6 address or network
    }
}

fn parse_port(rule: &str, port: &str) -> Result<u16, RuleError> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(RuleError::Port {
            rule: rule.into(),
            port: port.into(),
        }),
    }
}

fn parse_target(rule: &str, host: &str) -> Result<Target, RuleError> {
    if let Some((addr, prefix)) = host.split_once('/') {
        let ip = IpAddr::from_str(addr).map_err(|_| RuleError::Address {
            rule: rule.into(),
            addr: addr.into(),
        })?;
        let max = max_prefix(ip);
        let len = prefix
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max && prefix.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| RuleError::Prefix {
                rule: rule.into(),
                prefix: prefix.into(),
                max,
            })?;
        let ip = canonical(ip);
        return match IpNet::new(ip, len) {
            Some(net) => Ok(Target::Net(net)),
            None => Err(RuleError::HostBits {
                rule: rule.into(),
                suggestion: format!("{}/{}", mask(ip, len), len),
            }),
        };
    }
    if let Ok(ip) = IpAddr::from_str(host) {
        return Ok(Target::Addr(canonical(ip)));
    }
    if host.contains(':') {
        return Err(RuleError::Address {
            rule: rule.into(),
            addr: host.into(),
        });
    }
    if let Some(domain) = host.strip_prefix("*.") {
        return Ok(Target::Below(parse_name(rule, domain)?));
    }
    if host == "*" {
        return Err(RuleError::Name {
            rule: rule.into(),
            name: host.into(),
            why: "for every address write 0.0.0.0/0 and ::/0",
        });
    }
    Ok(Target::Name(parse_name(rule, host)?))
}

/// Checks a host name (letters, digits, '-' and '_' in dot-separated labels
/// of 1 to 63 characters, 253 in all) and returns it in lower case without
/// a trailing dot.
fn parse_name(rule: &str, name: &str) -> Result<String, RuleError> {
    let err = |why| RuleError::Name {
        rule: rule.into(),
        name: name.into(),
        why,
    };
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(err("it is empty"));
    }
    if trimmed.len() > 253 {
        return Err(err("longer than 253 characters"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() {
            return Err(err("it has an empty label"));
        }
        if label.len() > 63 {
            return Err(err("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err("only letters, digits, '-', '_' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(err("a label starts or ends with '-'"));
        }
    }
    if trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(err("it looks like a malformed IPv4 address"));
    }
    Ok(trimmed.to_ascii_lowercase())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; any other
/// address unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// The policy: rules in the order given. The first rule that covers a
/// destination decides; with none, the destination is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// The policy that allows nothing.
    pub fn deny_all() -> Policy {
        Policy::default()
    }

    pub fn new(rules: Vec<Rule>) -> Policy {
        Policy { rules }
    }

    /// The policy that allows every destination, any port (`0.0.0.0/0`
    /// and `::/0`; what is never reachable stays so).
    pub fn allow_all() -> Policy {
        let any = |addr: IpAddr| Rule {
            target: Target::Net(IpNet { addr, prefix: 0 }),
            port: None,
        };
        Policy::new(vec![
            any(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            any(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
        ])
    }

    /// Parses `RULE[,RULE…]` (the value of `--net egress=`).
    pub fn parse(list: &str) -> Result<Policy, RuleError> {
        let rules = list
            .split(',')
            .map(Rule::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first rule that lets the DNS responder answer for `name`.
    pub fn rule_for_name(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.covers_name(name))
    }
}

/// Why a destination is never reachable, whatever the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    Loopback,
    Unspecified,
    Multicast,
    Broadcast,
    LinkLocal,
    HostAddress,
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reserved::Loopback => "a loopback address",
            Reserved::Unspecified => "the unspecified address",
            Reserved::Multicast => "a multicast address",
            Reserved::Broadcast => "the broadcast address",
            Reserved::LinkLocal => "a link-local address no rule names",
            Reserved::HostAddress => "one of the host's own addresses",
        })
    }
}

/// What was decided for one destination, and what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this rule.
    Allow(Rule),
    /// No rule covers the destination.
    NoRule,
    /// Never reachable.
    Reserved(Reserved),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow(r) => write!(f, "allowed by rule {r}"),
            Decision::NoRule => f.write_str("refused: no rule allows it"),
            Decision::Reserved(why) => write!(f, "refused: {why}"),
        }
    }
}

const LINK_LOCAL: [IpNet; 2] = [
    IpNet {
        addr: IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)),
        prefix: 16,
    },
    IpNet {
        addr: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
        prefix: 10,
    },
];

fn link_local(ip: IpAddr) -> bool {
    LINK_LOCAL.iter().any(|n| n.contains(ip))
}

fn reserved(ip: IpAddr) -> Option<Reserved> {
    if ip.is_loopback() {
        return Some(Reserved::Loopback);
    }
    if ip.is_unspecified() {
        return Some(Reserved::Unspecified);
    }
    if ip.is_multicast() {
        return Some(Reserved::Multicast);
    }
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() => Some(Reserved::Broadcast),
        // 0.0.0.0/8 means "this network": the kernel treats it as local.
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(Reserved::Unspecified),
        _ => None,
    }
}

/// Names the DNS responder answered, by address: an address is reachable
/// through a name rule once a name that rule covers resolved to it. Bounded:
/// the oldest addresses are forgotten first.
#[derive(Debug, Clone)]
pub struct Learned {
    names: HashMap<IpAddr, Vec<String>>,
    order: VecDeque<IpAddr>,
    capacity: usize,
}

/// The most names remembered for one address.
const NAMES_PER_ADDR: usize = 8;

impl Learned {
    pub fn new(capacity: usize) -> Learned {
        Learned {
            names: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Remembers that `name` resolved to `ip`.
    pub fn insert(&mut self, ip: IpAddr, name: &str) {
        let ip = canonical(ip);
        if let Some(names) = self.names.get_mut(&ip) {
            if !names.iter().any(|n| n == name) {
                if names.len() == NAMES_PER_ADDR {
                    names.remove(0);
                }
                names.push(name.to_owned());
            }
            return;
        }
        while self.names.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.names.remove(&old);
                }
                None => break,
            }
        }
        self.names.insert(ip, vec![name.to_owned()]);
        self.order.push_back(ip);
    }

    pub fn names(&self, ip: IpAddr) -> &[String] {
        self.names.get(&ip).map_or(&[], |v| v.as_slice())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The policy with what the stack knows at run time: the host's own
/// addresses and the names it resolved.
#[derive(Debug, Clone)]
pub struct Egress {
    policy: Policy,
    host_addrs: HashSet<IpAddr>,
    learned: Learned,
}

impl Egress {
    pub fn new(
        policy: Policy,
        host_addrs: impl IntoIterator<Item = IpAddr>,
        learn: usize,
    ) -> Egress {
        Egress {
            policy,
            host_addrs: host_addrs.into_iter().map(canonical).collect(),
            learned: Learned::new(learn),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn learned_mut(&mut self) -> &mut Learned {
        &mut self.learned
    }

    /// Whether the workload may reach `dst` (TCP or UDP).
    pub fn decide(&self, dst: SocketAddr) -> Decision {
        let ip = canonical(dst.ip());
        if let Some(why) = reserved(ip) {
            return Decision::Reserved(why);
        }
        if self.host_addrs.contains(&ip) {
            return Decision::Reserved(Reserved::HostAddress);
        }
        let names = self.learned.names(ip);
        let found = self.policy.rules.iter().find(|r| {
            r.port_matches(dst.port())
                && (r.covers_addr(ip) || names.iter().any(|n| r.covers_name(n)))
        });
        match found {
            Some(r) if link_local(ip) && !r.names_link_local() => {
                Decision::Reserved(Reserved::LinkLocal)
            }
            Some(r) => Decision::Allow(r.clone()),
            None => Decision::NoRule,
        }
    }

    /// Whether an address the host resolved for an allowed name may be given
    /// to the workload (never a reserved or host address).
    pub fn answerable(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        reserved(ip).is_none() && !self.host_addrs.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        s.parse::<Rule>().unwrap_err().to_string()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_all_is_the_two_zero_prefixes() {
        assert_eq!(
            Policy::allow_all(),
            Policy::parse("0.0.0.0/0,::/0").unwrap()
        );
        let e = Egress::new(Policy::allow_all(), [], 0);
        assert!(e.decide(sa("203.0.113.9:443")).allowed());
        assert!(e.decide(sa("[2001:db8::1]:53")).allowed());
        assert!(!e.decide(sa("127.0.0.1:80")).allowed());
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            rule("1.2.3.4").target,
            Target::Addr("1.2.3.4".parse().unwrap())
        );
        assert_eq!(rule("1.2.3.4:443").port, Some(443));
        assert_eq!(
            rule("10.0.0.0/8:22").target,
            Target::Net(IpNet::new("10.0.0.0".parse().unwrap(), 8).unwrap())
        );
        assert_eq!(rule("2001:db8::1").port, None);
        assert_eq!(rule("[2001:db8::1]:443").port, Some(443));
        assert_eq!(rule("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(rule("[2001:db8::/32]:80").to_string(), "[2001:db8::/32]:80");
        assert_eq!(
            rule("PyPI.org.:443").target,
            Target::Name("pypi.org".into())
        );
        assert_eq!(
            rule("*.Example.com").target,
            Target::Below("example.com".into())
        );
        assert_eq!(rule("::ffff:192.0.2.1").to_string(), "192.0.2.1");
        assert_eq!(rule(" host_1.test ").to_string(), "host_1.test");
    }

    #[test]
    fn bad_rules_get_one_line_errors() {
        assert_eq!(
            err("example.com:0"),
            "egress rule \"example.com:0\": port \"0\" is not a number from 1 to 65535"
        );
        assert!(err("example.com:http").contains("port \"http\""));
        assert!(err("example.com:+80").contains("port \"+80\""));
        assert!(err("example.com:").contains("port \"\""));
        assert_eq!(
            err("10.0.0.1/8"),
            "egress rule \"10.0.0.1/8\": host bits are set; did you mean 10.0.0.0/8?"
        );
        assert!(err("10.0.0.0/33").contains("from 0 to 32"));
        assert!(err("10.0.0.0/x").contains("prefix length \"x\""));
        assert!(err("300.1.1.1/8").contains("\"300.1.1.1\" is not an IP address"));
        assert!(err("bad name.com").contains("only letters"));
        assert!(err("a..b").contains("empty label"));
        assert!(err("-a.b").contains("starts or ends"));
        assert!(err("*").contains("0.0.0.0/0"));
        assert!(err("*.").contains("empty"));
        assert!(err("1.2.3").contains("malformed IPv4"));
        assert!(err("[::1:80").contains("unbalanced"));
        assert!(err("[::1]80").contains("unbalanced"));
        assert!(err("::1]:80").contains("unbalanced"));
        assert!(err("2001:db8::zz").contains("is not an IP address"));
        assert_eq!(err(""), "empty egress rule");
        assert!(err(&"a".repeat(64)).contains("63"));
        for e in ["a:b:c]", "x:1:2", "[", "]", "/", ":", "*.*"] {
            assert!(!err(e).contains('\n'), "{e}");
        }
    }

    #[test]
    fn policy_lists() {
        let p = Policy::parse("1.2.3.4:443,*.pypi.org").unwrap();
        assert_eq!(p.rules().len(), 2);
        assert!(Policy::parse("1.2.3.4,,x").is_err());
    }

    #[test]
    fn names_and_wildcards() {
        let below = rule("*.example.com");
        assert!(below.covers_name("a.example.com"));
        assert!(below.covers_name("a.b.example.com"));
        assert!(!below.covers_name("example.com"));
        assert!(!below.covers_name("badexample.com"));
        assert!(!below.covers_name("example.com.evil"));
        let exact = rule("example.com");
        assert!(exact.covers_name("example.com"));
        assert!(!exact.covers_name("a.example.com"));
        let p = Policy::parse("example.com:443").unwrap();
        assert!(p.rule_for_name("example.com").is_some());
        assert!(p.rule_for_name("other.com").is_none());
    }

    #[test]
    fn decisions_by_address_port_and_name() {
        let p = Policy::parse("192.0.2.1:80,198.51.100.0/24,*.allowed.test:443,[2001:db8::1]:80")
            .unwrap();
        let mut e = Egress::new(p, [], 16);
        assert_eq!(
            e.decide(sa("192.0.2.1:80")),
            Decision::Allow(rule("192.0.2.1:80"))
        );
        assert_eq!(e.decide(sa("192.0.2.1:81")), Decision::NoRule);
        assert!(e.decide(sa("198.51.100.77:5")).allowed());
        assert!(e.decide(sa("[2001:db8::1]:80")).allowed());
        assert_eq!(e.decide(sa("[2001:db8::2]:80")), Decision::NoRule);
        // A name rule allows an address only once a covered name resolved to it.
        assert_eq!(e.decide(sa("203.0.113.9:443")), Decision::NoRule);
        e.learned_mut()
            .insert("203.0.113.9".parse().unwrap(), "www.allowed.test");
        assert_eq!(
            e.decide(sa("203.0.113.9:443")),
            Decision::Allow(rule("*.allowed.test:443"))
        );
        assert_eq!(e.decide(sa("203.0.113.9:80")), Decision::NoRule);
        // Mapped addresses are judged as IPv4.
        assert!(e.decide(sa("[::ffff:192.0.2.1]:80")).allowed());
    }

    #[test]
    fn reserved_destinations_are_never_reachable() {
        let p = Policy::parse("0.0.0.0/0,::/0").unwrap();
        let e = Egress::new(p, ["192.0.2.7".parse().unwrap()], 16);
        let cases = [
            ("127.0.0.1:22", Reserved::Loopback),
            ("[::1]:22", Reserved::Loopback),
            ("[::ffff:127.0.0.1]:22", Reserved::Loopback),
            ("0.0.0.0:22", Reserved::Unspecified),
            ("0.1.2.3:22", Reserved::Unspecified),
            ("[::]:22", Reserved::Unspecified),
            ("224.0.0.1:22", Reserved::Multicast),
            ("[ff02::1]:22", Reserved::Multicast),
            ("255.255.255.255:22", Reserved::Broadcast),
            ("169.254.169.254:80", Reserved::LinkLocal),
            ("[fe80::1]:80", Reserved::LinkLocal),
            ("192.0.2.7:80", Reserved::HostAddress),
        ];
        for (dst, why) in cases {
            assert_eq!(e.decide(sa(dst)), Decision::Reserved(why), "{dst}");
        }
        assert!(e.decide(sa("192.0.2.8:80")).allowed());
        assert!(!e.answerable("127.0.0.1".parse().unwrap()));
        assert!(e.answerable("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn a_rule_that_could_reach_nothing_is_refused() {
        for (rule, says) in [
            ("127.0.0.1:8080", "names a loopback address"),
            ("[::1]:22", "names a loopback address"),
            ("[::ffff:127.0.0.1]:22", "names a loopback address"),
            (
                "127.0.0.0/8",
                "127.0.0.0/8, whose addresses are all loopback",
            ),
            ("127.1.0.0/16:80", "whose addresses are all loopback"),
            ("0.0.0.0", "names the unspecified address"),
            ("224.0.0.0/4", "whose addresses are all multicast"),
            ("ff02::/16", "whose addresses are all multicast"),
            ("255.255.255.255:67", "names the broadcast address"),
        ] {
            let e = rule.parse::<Rule>().unwrap_err();
            assert!(matches!(e, RuleError::Unreachable { .. }), "{rule}: {e}");
            let text = e.to_string();
            assert!(text.contains(says), "{rule}: {text}");
            assert!(text.contains("never reaches"), "{text}");
            assert!(!text.contains('\n'));
        }
        // Networks that hold reachable addresses too stay rules.
        for rule in [
            "0.0.0.0/0",
            "::/0",
            "120.0.0.0/5",
            "169.254.169.254:80",
            "10.0.0.0/8",
        ] {
            assert!(rule.parse::<Rule>().is_ok(), "{rule}");
        }
    }

    #[test]
    fn link_local_needs_a_rule_that_names_it() {
        let e = Egress::new(Policy::parse("169.254.169.254:80").unwrap(), [], 4);
        assert!(e.decide(sa("169.254.169.254:80")).allowed());
        let e = Egress::new(Policy::parse("169.254.0.0/16").unwrap(), [], 4);
        assert!(e.decide(sa("169.254.1.1:80")).allowed());
    }

    #[test]
    fn decisions_say_what_decided() {
        let e = Egress::new(Policy::parse("*.a.test:443").unwrap(), [], 4);
        assert_eq!(
            e.decide(sa("10.9.9.9:443")).to_string(),
            "refused: no rule allows it"
        );
        assert_eq!(
            e.decide(sa("127.0.0.1:443")).to_string(),
            "refused: a loopback address"
        );
        assert_eq!(
            Decision::Allow(rule("*.a.test:443")).to_string(),
            "allowed by rule *.a.test:443"
        );
    }

    #[test]
    fn learned_is_bounded() {
        let mut l = Learned::new(2);
        for i in 0..10u8 {
            l.insert(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)), "x.test");
        }
        assert_eq!(l.len(), 2);
        assert!(l.names("192.0.2.0".parse().unwrap()).is_empty());
        assert_eq!(l.names("192.0.2.9".parse().unwrap()), ["x.test"]);
        for i in 0..20 {
            l.insert("192.0.2.9".parse().unwrap(), &format!("n{i}.test"));
        }
        assert_eq!(l.names("192.0.2.9".parse().unwrap()).len(), NAMES_PER_ADDR);
    }

    #[test]
    fn networks() {
        let n = IpNet::new("10.0.0.0".parse().unwrap(), 8).unwrap();
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(!n.contains("::a00:1".parse().unwrap()));
        assert!(IpNet::new("10.0.0.1".parse().unwrap(), 8).is_none());
        assert!(IpNet::new("0.0.0.0".parse().unwrap(), 0)
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(IpNet::new("::".parse().unwrap(), 129).is_none());
    }
}
