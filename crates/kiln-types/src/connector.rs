//! Egress connectors as the API takes them (kiln-net compiles them into a policy).

use serde::{Deserialize, Serialize};

/// One egress connector. Host loopback and every host address stay closed whatever the
/// connectors; only a `host-service` opens a host port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Connector {
    /// No network at all: the guest's NIC is detached.
    None,
    /// Public destinations only.
    Internet,
    /// Only the listed destinations.
    Allowlist { destinations: Vec<Destination> },
    /// One host port the operator defined by name (kilnd `--host-service NAME=ADDR:PORT`).
    HostService { name: String },
}

/// An allowlist entry: a CIDR or a DNS name (`*.example.com` matches subdomains), and the
/// ports allowed (empty: every port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(example = "10.1.0.0/16"))]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(example = "api.example.com"))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// A microVM's network counters: bytes each way, connections, denials and DNS queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct NetworkCounters {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub connections: u64,
    pub denials: u64,
    pub dns_queries: u64,
}
