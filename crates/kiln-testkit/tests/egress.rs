//! Egress connectors on real guests: kiln's network backend lets a guest reach exactly what
//! its policy allows. Test hosts live in network namespaces this test creates; the canary
//! listens on host loopback; nothing else is addressed.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_testkit::netns::{Canary, NetnsHost};
use kiln_testkit::{machine, TestVm};
use kiln_vmm::kiln_net::{
    Connector, Denial, EgressPolicy, HostFacts, HostService, NetCounters, OperatorConfig,
};
use kiln_vmm::NetworkAttachment;

const ALLOWED_NAME: &str = "allowed.kiln.test";

struct Guest {
    vm: TestVm,
    counters: Arc<NetCounters>,
    denials: Arc<Mutex<Vec<Denial>>>,
}

async fn boot(connectors: &[Connector], operator: &OperatorConfig) -> Guest {
    let policy = EgressPolicy::compile(connectors, operator, HostFacts::read()).unwrap();
    let counters = Arc::new(NetCounters::default());
    let denials = Arc::new(Mutex::new(Vec::new()));
    let sink = denials.clone();
    let network = NetworkAttachment::Egress {
        policy: Arc::new(policy),
        counters: counters.clone(),
        denials: Arc::new(move |d| sink.lock().unwrap().push(d)),
        control: None,
    };
    Guest {
        vm: TestVm::boot_with_network(machine(), network).await,
        counters,
        denials,
    }
}

/// `wget` from the guest: Ok(body) or Err(stderr).
async fn fetch(vm: &TestVm, url: &str) -> Result<String, String> {
    let out = vm
        // (busybox wget's -T crashes it; the backend answers refusals at once anyway)
        .sh(&format!("wget -q -O - '{url}'"))
        .await
        .unwrap();
    if out.status.success() {
        Ok(out.stdout_text())
    } else {
        Err(out.stderr_text())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_host_service_and_internet_reach_only_what_they_allow() {
    let allowed = NetnsHost::start("allowed", 8080);
    let other = NetnsHost::start("other", 8080);
    let canary = Canary::start();
    let service = LoopbackService::start();
    let operator = OperatorConfig {
        host_services: vec![HostService {
            name: "svc".into(),
            target: format!("127.0.0.1:{}", service.port).parse().unwrap(),
        }],
        static_hosts: HashMap::from([(ALLOWED_NAME.to_string(), vec![allowed.addr])]),
    };
    let allowlist: Vec<Connector> = serde_json::from_value(serde_json::json!([
        {"type": "allowlist", "destinations": [
            {"cidr": format!("{}/32", allowed.addr), "ports": [8080]},
            {"name": ALLOWED_NAME, "ports": [8080]}
        ]},
        {"type": "host-service", "name": "svc"}
    ]))
    .unwrap();
    let g = boot(&allowlist, &operator).await;
    let vm = &g.vm;

    // The allowed host, by address and by name.
    let by_addr = fetch(vm, &allowed.url(&allowed.addr.to_string())).await;
    assert_eq!(
        by_addr.as_deref().map(str::trim),
        Ok(allowed.token.as_str())
    );
    let by_name = fetch(vm, &allowed.url(ALLOWED_NAME)).await;
    assert_eq!(
        by_name.as_deref().map(str::trim),
        Ok(allowed.token.as_str())
    );
    // The named host service, at the gateway.
    let svc = fetch(vm, &format!("http://10.0.2.2:{}/", service.port)).await;
    assert_eq!(svc.as_deref(), Ok("service\n"));

    // Everything else is refused: another test host, another port, the canary on host
    // loopback through the gateway, the metadata address, names not allowed.
    for url in [
        other.url(&other.addr.to_string()),
        format!("http://{}:8081/", allowed.addr),
        format!("http://10.0.2.2:{}/", canary.port),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://not-allowed.kiln.test:8080/".to_string(),
    ] {
        assert!(fetch(vm, &url).await.is_err(), "{url} must be refused");
    }
    let nslookup = vm
        .sh("nslookup not-allowed.kiln.test 10.0.2.3")
        .await
        .unwrap();
    assert!(!nslookup.status.success(), "unlisted names do not resolve");
    assert_eq!(canary.hits(), 0, "the canary was never reached");

    let counts = settled(&g.counters, |c| {
        c.connections >= 3 && c.bytes_in > 0 && c.bytes_out > 0 && c.denials >= 5
    })
    .await;
    assert!(counts.connections >= 3, "{counts:?}");
    assert!(counts.bytes_in > 0 && counts.bytes_out > 0, "{counts:?}");
    assert!(counts.denials >= 5, "{counts:?}");
    let denials: Vec<String> = g
        .denials
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert!(
        denials
            .iter()
            .any(|d| d.contains(&format!("{}:8080", other.addr)) && d.contains("private range")),
        "{denials:?}"
    );
    assert!(
        denials
            .iter()
            .any(|d| d.contains("169.254.169.254:80") && d.contains("link-local")),
        "{denials:?}"
    );
    drop(g);

    // `internet`: public destinations only. A name that resolves to a private address
    // resolves, but the connection is refused; the host-service is not granted.
    let g = boot(&[Connector::Internet], &operator).await;
    for url in [
        allowed.url(&allowed.addr.to_string()),
        allowed.url(ALLOWED_NAME),
        format!("http://10.0.2.2:{}/", service.port),
        format!("http://10.0.2.2:{}/", canary.port),
    ] {
        assert!(fetch(&g.vm, &url).await.is_err(), "{url} must be refused");
    }
    assert_eq!(canary.hits(), 0, "the canary was never reached");
    let counts = settled(&g.counters, |c| c.denials >= 4).await;
    assert!(counts.denials >= 4, "{counts:?}");
}

/// The counters once `ok` holds for them, or after 5 s: the backend is a process of its own
/// and reports them every 100 ms (denials at once), so they trail the guest slightly.
async fn settled(
    counters: &NetCounters,
    ok: impl Fn(&kiln_vmm::kiln_net::CounterSnapshot) -> bool,
) -> kiln_vmm::kiln_net::CounterSnapshot {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let c = counters.snapshot();
        if ok(&c) || std::time::Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A plain HTTP server on host loopback standing for an operator's host service.
struct LoopbackService {
    port: u16,
}

impl LoopbackService {
    fn start() -> LoopbackService {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nservice\n",
                );
            }
        });
        LoopbackService { port }
    }
}

/// Whatever the connectors say: cloud metadata, link-local and a host address the host gained
/// after the guest started stay closed, also to an allowlist CIDR that covers them. The
/// running backend re-reads the host's addresses (a network namespace created now adds
/// one), and a canary listening on the new address never sees a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_addresses_stay_closed_and_new_host_addresses_close_at_once() {
    let wide: Vec<Connector> = serde_json::from_value(serde_json::json!([
        {"type": "allowlist", "destinations": [
            {"cidr": "10.213.0.0/16"}, {"cidr": "169.254.0.0/16"}, {"cidr": "168.63.129.16/32"}
        ]}
    ]))
    .unwrap();
    let g = boot(&wide, &OperatorConfig::default()).await;
    // Created after the guest's backend read the host's addresses.
    let late = NetnsHost::start("late", 8080);
    // A canary on the new host address: it counts every connection that reaches it.
    let listener = std::net::TcpListener::bind((late.host_side, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    // Past the backend's one-second cache of the host's addresses (wall clock, not work).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let refused = fetch(&g.vm, &format!("http://{}:{port}/", late.host_side)).await;
    assert!(refused.is_err(), "the host's new address is refused");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the host's new address"
    );
    let body = fetch(&g.vm, &late.url(&late.addr.to_string())).await;
    assert_eq!(
        body.as_deref().map(str::trim),
        Ok(late.token.as_str()),
        "the CIDR still opens the test host itself"
    );
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://168.63.129.16/machine",
    ] {
        assert!(fetch(&g.vm, url).await.is_err(), "{url} must be refused");
    }
    let denials: Vec<String> = {
        let _ = settled(&g.counters, |c| c.denials >= 3).await;
        g.denials
            .lock()
            .unwrap()
            .iter()
            .map(|d| d.to_string())
            .collect()
    };
    for (dst, why) in [
        (
            format!("{}:{port}", late.host_side),
            "host addresses are closed",
        ),
        ("169.254.169.254:80".to_string(), "link-local"),
        ("168.63.129.16:80".to_string(), "metadata or wire server"),
    ] {
        assert!(
            denials.iter().any(|d| d.contains(&dst) && d.contains(why)),
            "{dst} ({why}) in {denials:?}"
        );
    }
}
