//! Auth tokens for the ingress: CreateMicrovmAuthToken, revocation, key rotation.

use kiln_types::TokenKind;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowedPort {
    #[schema(minimum = 1, maximum = 65535)]
    #[serde(deserialize_with = "kiln_types::whole::de")]
    pub port: u16,
}

/// CreateMicrovmAuthToken's request: a token scoped to one microVM, its ports and an expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub microvm_identifier: String,
    #[schema(minimum = 1, maximum = 60)]
    #[serde(deserialize_with = "kiln_types::whole::de")]
    pub expiration_in_minutes: u64,
    /// Default: port 8080. The lifecycle hook port is never reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ports: Vec<AllowedPort>,
    /// Default `ingress`; `shell` tokens open a terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TokenKind>,
}

/// The headers that carry a token (either name works).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuthTokenHeaders {
    #[serde(rename = "X-aws-proxy-auth")]
    pub aws_proxy_auth: String,
    #[serde(rename = "X-Kiln-Auth")]
    pub kiln_auth: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateTokenResponse {
    pub auth_token: AuthTokenHeaders,
    /// Revoke it with `DELETE /v1/auth-tokens/{tokenId}`.
    pub token_id: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotateKeyResponse {
    /// The new signing key's id; tokens signed before stay valid until they expire.
    pub key_id: String,
}
