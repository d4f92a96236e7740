//! The gateway's DNS server, as pure functions over messages: reading the guest's
//! query and writing the answer the policy chose. The guest only ever gets
//! addresses (A records) of names the policy allows and the host resolved; every
//! other question gets an empty or negative answer made here, never forwarded.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// Queries longer than this are not DNS over UDP as a stub resolver sends it.
pub const MAX_QUERY: usize = 4096;

/// One question from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Lowercase, without the trailing dot, ASCII (IDNs arrive as punycode).
    pub name: String,
    pub qtype: RecordType,
    question: HQuery,
    recursion_desired: bool,
}

/// What the gateway answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The name does not exist (as far as the guest may know): policy denied it.
    NxDomain,
    /// The name exists, but not with this type (AAAA, TXT, HTTPS, ...): the gateway
    /// offers IPv4 addresses only.
    NoData,
    /// The host could not resolve it, or refused the answer (a private address).
    ServFail,
    /// The addresses the host resolved and pinned, with the TTL to give.
    Addresses(Vec<Ipv4Addr>, u32),
}

/// Why a datagram is not a query we answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Not worth an answer (garbage, a response, oversized).
    Drop,
    /// A DNS message we answer with this error (FORMERR, NOTIMP) and the raw reply.
    Answer(Vec<u8>),
}

pub fn parse_query(bytes: &[u8]) -> Result<Query, Bad> {
    if bytes.len() > MAX_QUERY {
        return Err(Bad::Drop);
    }
    let msg = Message::from_vec(bytes).map_err(|_| Bad::Drop)?;
    let meta = &msg.metadata;
    if meta.message_type != MessageType::Query {
        return Err(Bad::Drop);
    }
    let error = |code| {
        let mut m = Message::error_msg(meta.id, meta.op_code, code);
        m.metadata.recursion_desired = meta.recursion_desired;
        m.metadata.recursion_available = true;
        Bad::Answer(m.to_vec().unwrap_or_default())
    };
    if meta.op_code != OpCode::Query {
        return Err(error(ResponseCode::NotImp));
    }
    let [question] = msg.queries.as_slice() else {
        return Err(error(ResponseCode::FormErr));
    };
    if question.query_class != DNSClass::IN {
        return Err(error(ResponseCode::NotImp));
    }
    let ascii = question.name.to_ascii().to_ascii_lowercase();
    let name = ascii.strip_suffix('.').unwrap_or(&ascii).to_string();
    if name.is_empty() || !name.is_ascii() {
        return Err(error(ResponseCode::FormErr));
    }
    Ok(Query {
        id: meta.id,
        name,
        qtype: question.query_type,
        question: question.clone(),
        recursion_desired: meta.recursion_desired,
    })
}

/// The answer to `q`, ready to send.
pub fn reply(q: &Query, r: &Reply) -> Vec<u8> {
    let mut m = Message::response(q.id, OpCode::Query);
    m.metadata.recursion_desired = q.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(q.question.clone());
    match r {
        Reply::NxDomain => m.metadata.response_code = ResponseCode::NXDomain,
        Reply::ServFail => m.metadata.response_code = ResponseCode::ServFail,
        Reply::NoData => {}
        Reply::Addresses(ips, ttl) => {
            let name = q.question.name.clone();
            for ip in ips {
                m.add_answer(Record::from_rdata(name.clone(), *ttl, RData::A(A(*ip))));
            }
        }
    }
    m.to_vec().unwrap_or_default()
}

/// A query for tests and the benchmark: `name` asking for `qtype`.
pub fn build_query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(HQuery::query(
        Name::from_ascii(name).expect("a valid test name"),
        qtype,
    ));
    m.to_vec().expect("a query encodes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn questions_and_answers() {
        let q = parse_query(&build_query(7, "Deb.Debian.ORG.", RecordType::A)).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (7, "deb.debian.org", RecordType::A)
        );

        let ips = vec![
            Ipv4Addr::new(198, 51, 100, 7),
            Ipv4Addr::new(198, 51, 100, 8),
        ];
        let out = Message::from_vec(&reply(&q, &Reply::Addresses(ips.clone(), 60))).unwrap();
        assert_eq!(out.metadata.id, 7);
        assert_eq!(out.metadata.message_type, MessageType::Response);
        assert_eq!(out.metadata.response_code, ResponseCode::NoError);
        let got: Vec<Ipv4Addr> = out
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(got, ips);
        assert!(out.answers.iter().all(|r| r.ttl == 60));

        let nx = Message::from_vec(&reply(&q, &Reply::NxDomain)).unwrap();
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(nx.answers.is_empty());
        let nodata = Message::from_vec(&reply(&q, &Reply::NoData)).unwrap();
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.queries.len(), 1);
    }

    #[test]
    fn what_is_not_a_plain_query() {
        // A response, garbage, and an oversized datagram are dropped.
        let q = parse_query(&build_query(1, "a.com", RecordType::A)).unwrap();
        assert_eq!(parse_query(&reply(&q, &Reply::NoData)), Err(Bad::Drop));
        assert_eq!(parse_query(b"\x00\x01garbage"), Err(Bad::Drop));
        assert_eq!(parse_query(&vec![0; MAX_QUERY + 1]), Err(Bad::Drop));
        // Two questions: FORMERR, answered.
        let mut m = Message::from_vec(&build_query(2, "a.com", RecordType::A)).unwrap();
        m.add_query(HQuery::query(
            Name::from_ascii("b.com").unwrap(),
            RecordType::A,
        ));
        let Err(Bad::Answer(a)) = parse_query(&m.to_vec().unwrap()) else {
            panic!("two questions must be answered with an error");
        };
        let a = Message::from_vec(&a).unwrap();
        assert_eq!(
            (a.metadata.id, a.metadata.response_code),
            (2, ResponseCode::FormErr)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(q) = parse_query(&bytes) {
                let _ = reply(&q, &Reply::Addresses(vec![Ipv4Addr::new(203, 0, 113, 1)], 30));
                prop_assert!(q.name.is_ascii() && !q.name.ends_with('.'));
            }
        }

        #[test]
        fn mutated_queries_never_panic(pos in any::<prop::sample::Index>(), val in any::<u8>()) {
            let mut b = build_query(9, "www.example.org", RecordType::A);
            let i = pos.index(b.len());
            b[i] = val;
            if let Ok(q) = parse_query(&b) {
                let _ = reply(&q, &Reply::NxDomain);
            }
        }
    }
}
