//! The few bits of DNS the stack's responder needs (RFC 1035): parse one
//! question, build an answer with A/AAAA records or an error code. Every
//! length comes from the untrusted query and is checked; compression
//! pointers are refused in the question.
use std::net::IpAddr;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// The longest answer we send (the classic UDP limit; no EDNS).
pub const MAX_ANSWER: usize = 512;

/// Response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// One parsed query: its header fields we echo and its single question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The opcode and RD bit of the query, in the second header byte.
    flags_hi: u8,
    /// The question as it was on the wire (name, type, class).
    question: Vec<u8>,
    /// The name in lower case, labels joined by '.', no trailing dot;
    /// `None` when a label holds a byte a host name cannot have.
    pub name: Option<String>,
    pub qtype: u16,
    pub qclass: u16,
}

/// What could not be parsed. `Header` means not even an error answer can be
/// sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header, or a response: dropped.
    Header,
    /// A header we can answer with FORMERR.
    Malformed { id: u16, flags_hi: u8 },
    /// Not a standard query: answered NOTIMP.
    Opcode { id: u16, flags_hi: u8 },
}

/// Parses a query datagram.
pub fn parse_query(msg: &[u8]) -> Result<Query, ParseError> {
    if msg.len() < HEADER {
        return Err(ParseError::Header);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags_hi = msg[2];
    if flags_hi & 0x80 != 0 {
        return Err(ParseError::Header); // a response: never answer it
    }
    if (flags_hi >> 3) & 0x0f != 0 {
        return Err(ParseError::Opcode { id, flags_hi });
    }
    let malformed = ParseError::Malformed { id, flags_hi };
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if qdcount != 1 {
        return Err(malformed);
    }
    let (name, end) = parse_name(msg, HEADER).ok_or(malformed)?;
    let fixed = msg.get(end..end + 4).ok_or(malformed)?;
    Ok(Query {
        id,
        flags_hi,
        question: msg[HEADER..end + 4].to_vec(),
        name,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
        qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
    })
}

/// Parses an uncompressed name at `at`; returns it (if it is a host name)
/// and the offset after it.
fn parse_name(msg: &[u8], mut at: usize) -> Option<(Option<String>, usize)> {
    let mut name = String::new();
    let mut hostname = true;
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a compression pointer or a reserved label type
        }
        let label = msg.get(at..at + len)?;
        at += len;
        if !name.is_empty() {
            name.push('.');
        }
        if name.len() + len > 253 {
            return None;
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(char::from(b.to_ascii_lowercase()));
            } else {
                hostname = false;
                name.push('?');
            }
        }
    }
    Some((hostname.then_some(name), at))
}

impl Query {
    /// Whether the question asks for IN A or IN AAAA.
    pub fn asks_address(&self) -> bool {
        self.qclass == CLASS_IN && (self.qtype == TYPE_A || self.qtype == TYPE_AAAA)
    }

    /// An answer: `rcode`, and for NOERROR the addresses of the asked family
    /// among `addrs` (as many as fit in [`MAX_ANSWER`]), each with `ttl`.
    pub fn answer(&self, rcode: Rcode, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_ANSWER);
        out.extend_from_slice(&self.id.to_be_bytes());
        // QR, the query's opcode and RD; RA set.
        out.push(0x80 | (self.flags_hi & 0x79));
        out.push(0x80 | rcode as u8);
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&[0; 6]); // counts filled below
        out.extend_from_slice(&self.question);
        let mut count: u16 = 0;
        if rcode == Rcode::NoError && self.qclass == CLASS_IN {
            for ip in addrs {
                let rdata: &[u8] = match (self.qtype, ip) {
                    (TYPE_A, IpAddr::V4(v4)) => &v4.octets(),
                    (TYPE_AAAA, IpAddr::V6(v6)) => &v6.octets(),
                    _ => continue,
                };
                if out.len() + 12 + rdata.len() > MAX_ANSWER {
                    break;
                }
                out.extend_from_slice(&[0xc0, 0x0c]); // the name in the question
                out.extend_from_slice(&self.qtype.to_be_bytes());
                out.extend_from_slice(&CLASS_IN.to_be_bytes());
                out.extend_from_slice(&ttl.to_be_bytes());
                out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
                out.extend_from_slice(rdata);
                count += 1;
            }
        }
        out[6..8].copy_from_slice(&count.to_be_bytes());
        out
    }
}

/// A bare error answer for a query that could not be parsed.
pub fn error_answer(id: u16, flags_hi: u8, rcode: Rcode) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x80 | (flags_hi & 0x79));
    out.push(0x80 | rcode as u8);
    out.extend_from_slice(&[0; 8]);
    out
}

/// Builds a query (for tests and the fuzz target's seeds).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The rcode and the addresses of an answer (for tests).
pub fn parse_answer(msg: &[u8]) -> Option<(Rcode, Vec<IpAddr>)> {
    if msg.len() < HEADER || msg[2] & 0x80 == 0 {
        return None;
    }
    let rcode = match msg[3] & 0x0f {
        0 => Rcode::NoError,
        1 => Rcode::FormErr,
        2 => Rcode::ServFail,
        3 => Rcode::NxDomain,
        4 => Rcode::NotImp,
        5 => Rcode::Refused,
        _ => return None,
    };
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = HEADER;
    for _ in 0..qd {
        let (_, end) = parse_name(msg, at)?;
        at = end + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        // Our answers always point at the question's name.
        let rr = msg.get(at..at + 12)?;
        let len = usize::from(u16::from_be_bytes([rr[10], rr[11]]));
        let data = msg.get(at + 12..at + 12 + len)?;
        match len {
            4 => addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            16 => addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => return None,
        }
        at += 12 + len;
    }
    Some((rcode, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let q = parse_query(&build_query(7, "WWW.Example.Test", TYPE_A)).unwrap();
        assert_eq!(q.name.as_deref(), Some("www.example.test"));
        assert!(q.asks_address());
        let addrs: Vec<IpAddr> = vec![
            "192.0.2.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
        ];
        let a = q.answer(Rcode::NoError, &addrs, 60);
        assert_eq!(&a[0..2], &7u16.to_be_bytes());
        let (rcode, got) = parse_answer(&a).unwrap();
        assert_eq!(rcode, Rcode::NoError);
        assert_eq!(got, vec![addrs[0], addrs[2]]);
        let q6 = parse_query(&build_query(8, "x.test", TYPE_AAAA)).unwrap();
        let (_, got) = parse_answer(&q6.answer(Rcode::NoError, &addrs, 60)).unwrap();
        assert_eq!(got, vec![addrs[1]]);
        let (rcode, got) = parse_answer(&q.answer(Rcode::NxDomain, &addrs, 60)).unwrap();
        assert_eq!((rcode, got.len()), (Rcode::NxDomain, 0));
    }

    #[test]
    fn answers_fit_in_512_bytes() {
        let q = parse_query(&build_query(1, "x.test", TYPE_A)).unwrap();
        let many: Vec<IpAddr> = (0..200u8).map(|i| IpAddr::from([192, 0, 2, i])).collect();
        let a = q.answer(Rcode::NoError, &many, 1);
        assert!(a.len() <= MAX_ANSWER);
        assert!(parse_answer(&a).unwrap().1.len() > 20);
    }

    #[test]
    fn hostile_queries() {
        assert_eq!(parse_query(&[0; 5]), Err(ParseError::Header));
        let mut resp = build_query(1, "a.test", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(ParseError::Header));
        let mut op = build_query(1, "a.test", TYPE_A);
        op[2] |= 2 << 3;
        assert!(matches!(parse_query(&op), Err(ParseError::Opcode { .. })));
        // A compression pointer in the question.
        let mut ptr = build_query(1, "", TYPE_A);
        ptr[12] = 0xc0;
        ptr.push(0);
        assert!(matches!(
            parse_query(&ptr),
            Err(ParseError::Malformed { .. })
        ));
        // A label running past the end.
        let mut trunc = build_query(1, "abc", TYPE_A);
        trunc[12] = 60;
        assert!(matches!(
            parse_query(&trunc),
            Err(ParseError::Malformed { .. })
        ));
        // Two questions.
        let mut two = build_query(1, "a.test", TYPE_A);
        two[5] = 2;
        assert!(matches!(
            parse_query(&two),
            Err(ParseError::Malformed { .. })
        ));
        // Missing type and class.
        let short = build_query(1, "a.test", TYPE_A);
        assert!(parse_query(&short[..short.len() - 2]).is_err());
        // A byte no host name has: parsed, but no name to answer for.
        let mut odd = build_query(1, "a.test", TYPE_A);
        odd[13] = b' ';
        assert_eq!(parse_query(&odd).unwrap().name, None);
        // An over-long name.
        let mut long = vec![0u8; 12];
        long[5] = 1;
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(parse_query(&long).is_err());
        let e = error_answer(9, 0x01, Rcode::FormErr);
        assert_eq!(parse_answer(&e).unwrap().0, Rcode::FormErr);
    }
}
