//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: each feeds
//! untrusted bytes to a parser a guest or a client reaches. None may panic.

use crate::backend::BackendEvent;
use crate::dns::{self, Answer};
use crate::policy::{Connector, EgressPolicy, HostFacts, OperatorConfig};

/// A guest's DNS query: parsed, and answered every way kiln answers.
pub fn dns(data: &[u8]) {
    if let Ok(q) = dns::parse(data) {
        for answer in [
            Answer::Addresses(vec![std::net::Ipv4Addr::new(192, 0, 2, 1)]),
            Answer::NoSuchName,
            Answer::Refused,
            Answer::ServerFailure,
        ] {
            let reply = dns::reply(&q, &answer);
            assert!(reply.len() <= 4096, "a reply is bounded");
        }
    }
}

/// The guest link's framing: frames read until the bytes run out or the framing is lost.
pub fn link(data: &[u8]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    rt.block_on(async {
        let mut r = data;
        while let Ok(frame) = crate::device::read_frame(&mut r).await {
            assert!(frame.len() <= crate::device::MAX_FRAME);
        }
    });
}

/// A client's connectors (RunMicrovm, CreateMicrovmImage), compiled as kilnd does.
pub fn connectors(data: &[u8]) {
    if let Ok(c) = serde_json::from_slice::<Vec<Connector>>(data) {
        if let Ok(p) = EgressPolicy::compile(&c, &OperatorConfig::default(), HostFacts::default()) {
            let dst = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(203, 0, 113, 1), 443);
            let _ = p.check_tcp(dst, &[], false);
            let _ = p.name_rule("example.com");
        }
    }
}

/// A network backend's report line, as kilnd reads it.
pub fn backend_event(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Some(e) = BackendEvent::parse(line) {
            let _ = e.into_denial();
        }
    }
}
