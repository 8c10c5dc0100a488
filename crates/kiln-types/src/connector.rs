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
/// ports allowed (empty: every port). Exactly one of `cidr` and `name` is given (the
/// policy compiler checks it; the schema says it with a `oneOf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        deserialize_with = "crate::whole::de_vec",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<u16>,
}

#[cfg(feature = "schema")]
mod destination_schema {
    use utoipa::openapi::schema::{
        AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type,
    };
    use utoipa::openapi::RefOr;

    const CIDR: &str = concat!(
        "^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
        "(\\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}",
        "(/([0-9]|[12][0-9]|3[0-2]))?$"
    );
    const NAME: &str = "^(\\*\\.)?[A-Za-z0-9_-]{1,63}(\\.[A-Za-z0-9_-]{1,63})*\\.?$";

    /// `{KEY, ports}` and nothing else.
    fn entry(key: &str, pattern: &str, example: &str, description: &str) -> ObjectBuilder {
        let port = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(65535));
        ObjectBuilder::new()
            .property(
                key,
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(253))
                    .pattern(Some(pattern))
                    .description(Some(description))
                    .examples([example]),
            )
            .required(key)
            .property(
                "ports",
                ArrayBuilder::new()
                    .items(port)
                    .max_items(Some(64))
                    .description(Some("Ports allowed; empty or absent: every port")),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
    }

    impl utoipa::PartialSchema for super::Destination {
        fn schema() -> RefOr<Schema> {
            OneOfBuilder::new()
                .item(entry(
                    "cidr",
                    CIDR,
                    "10.1.0.0/16",
                    "An IPv4 network or address",
                ))
                .item(entry(
                    "name",
                    NAME,
                    "api.example.com",
                    "A DNS name; `*.example.com` matches its subdomains",
                ))
                .description(Some(
                    "An allowlist entry: a CIDR or a DNS name, and the ports allowed",
                ))
                .into()
        }
    }

    impl utoipa::ToSchema for super::Destination {}
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
