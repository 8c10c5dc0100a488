//! kiln's resolver for guests: answers A queries on 10.0.2.3:53 under the microVM's policy.
//! With `internet` any name resolves through the host's resolver; with an allowlist only
//! allowed names do, and the addresses they resolve to are remembered so connections to
//! them can be allowed. Everything else gets NXDOMAIN (or REFUSED for what is not a plain
//! query). Queries are untrusted bytes: parsing failures are dropped, sizes are bounded.

use std::net::Ipv4Addr;

use simple_dns::rdata::{RData, A};
use simple_dns::{
    Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, OPCODE, QTYPE, RCODE, TYPE,
};

/// Answers are cached by guests for this long.
pub const ANSWER_TTL: u32 = 60;
/// Longest query kiln looks at.
pub const MAX_QUERY: usize = 512;
/// At most this many addresses go into one answer.
const MAX_ANSWERS: usize = 16;

/// A parsed query: the one question kiln answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub name: String,
    /// True for A (or ANY) questions; other types get an empty answer.
    pub wants_ipv4: bool,
    raw_name: String,
    qtype: QTYPE,
    qclass: simple_dns::QCLASS,
}

/// What to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Addresses(Vec<Ipv4Addr>),
    NoSuchName,
    Refused,
    ServerFailure,
}

/// Parses a guest's query. `Err(Some(id))`: answer REFUSED; `Err(None)`: drop it.
pub fn parse(bytes: &[u8]) -> Result<Query, Option<u16>> {
    if bytes.len() > MAX_QUERY {
        return Err(None);
    }
    let packet = Packet::parse(bytes).map_err(|_| None)?;
    let id = packet.id();
    if packet.has_flags(PacketFlag::RESPONSE)
        || packet.opcode() != OPCODE::StandardQuery
        || packet.questions.len() != 1
    {
        return Err(Some(id));
    }
    let q = &packet.questions[0];
    let raw_name = q.qname.to_string();
    Ok(Query {
        id,
        name: crate::policy::normalize_name(&raw_name),
        wants_ipv4: matches!(q.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY),
        raw_name,
        qtype: q.qtype,
        qclass: q.qclass,
    })
}

/// Builds the reply to `query`.
pub fn reply(query: &Query, answer: &Answer) -> Vec<u8> {
    let mut packet = Packet::new_reply(query.id);
    packet.set_flags(PacketFlag::RECURSION_AVAILABLE | PacketFlag::RECURSION_DESIRED);
    let name = Name::new_unchecked(&query.raw_name);
    packet.questions.push(Question::new(
        name.clone(),
        query.qtype,
        query.qclass,
        false,
    ));
    match answer {
        Answer::Addresses(addrs) => {
            if query.wants_ipv4 {
                for addr in addrs.iter().take(MAX_ANSWERS) {
                    packet.answers.push(ResourceRecord::new(
                        name.clone(),
                        CLASS::IN,
                        ANSWER_TTL,
                        RData::A(A {
                            address: u32::from(*addr),
                        }),
                    ));
                }
            }
        }
        Answer::NoSuchName => *packet.rcode_mut() = RCODE::NameError,
        Answer::Refused => *packet.rcode_mut() = RCODE::Refused,
        Answer::ServerFailure => *packet.rcode_mut() = RCODE::ServerFailure,
    }
    packet.build_bytes_vec().unwrap_or_default()
}

/// The REFUSED reply for a query kiln does not handle.
pub fn refused(id: u16) -> Vec<u8> {
    let mut packet = Packet::new_reply(id);
    *packet.rcode_mut() = RCODE::Refused;
    packet.build_bytes_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(0x1234);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn answers_a_queries_and_refuses_the_rest() {
        let q = parse(&query("Allowed.Test.", TYPE::A)).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.wants_ipv4),
            (0x1234, "allowed.test", true)
        );
        let bytes = reply(&q, &Answer::Addresses(vec![Ipv4Addr::new(10, 213, 1, 2)]));
        let parsed = Packet::parse(&bytes).unwrap();
        assert_eq!(parsed.answers.len(), 1);
        assert!(
            matches!(parsed.answers[0].rdata, RData::A(A { address }) if address == 0x0AD5_0102)
        );

        let aaaa = parse(&query("allowed.test", TYPE::AAAA)).unwrap();
        let bytes = reply(&aaaa, &Answer::Addresses(vec![Ipv4Addr::LOCALHOST]));
        let parsed = Packet::parse(&bytes).unwrap();
        assert!(parsed.answers.is_empty(), "no IPv6 answers");

        let nx = Packet::parse(&reply(&q, &Answer::NoSuchName))
            .unwrap()
            .rcode();
        assert_eq!(nx, RCODE::NameError);
        assert_eq!(parse(&[0u8; 3]), Err(None), "garbage is dropped");
        assert_eq!(
            parse(&vec![0u8; MAX_QUERY + 1]),
            Err(None),
            "oversized is dropped"
        );
    }
}
