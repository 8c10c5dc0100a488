//! The error body every failed call answers with, and its stable codes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A failed call: a stable code and a message that says what was wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes. Clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum ErrorCode {
    /// 400: the request is malformed or a value is out of range.
    ValidationException,
    /// 401: no or a wrong `Authorization: Bearer` key.
    UnauthorizedException,
    /// 404: the microVM, image, artifact or token does not exist.
    ResourceNotFoundException,
    /// 404: no such route.
    UnknownOperation,
    /// 409: the resource is not in a state that allows the call (the message says which).
    ConflictException,
    /// 413: the upload is over kilnd's limit.
    PayloadTooLarge,
    /// 429: a kilnd quota is reached (the message names the flag that raises it).
    ServiceQuotaExceededException,
    /// 500: kilnd failed; the message says where.
    InternalError,
    /// 502: the guest agent failed to run the command.
    ExecFailed,
    /// 502: the guest agent failed to return the app's logs.
    LogsFailed,
    /// 403: the guest user may not touch that path (the message is the guest's own error).
    AccessDenied,
    /// 411: an upload without a Content-Length.
    LengthRequired,
    /// 502: the guest agent failed a file operation.
    FilesFailed,
    /// 502: the guest agent failed a process operation.
    ProcessesFailed,
    /// 503: a service kilnd depends on is unreachable (a cluster's PostgreSQL): nothing was
    /// changed; retry once it is back.
    ServiceUnavailable,
    /// Any code a newer kilnd answers with that this client does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status kilnd answers with for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::ValidationException => 400,
            ErrorCode::UnauthorizedException => 401,
            ErrorCode::ResourceNotFoundException | ErrorCode::UnknownOperation => 404,
            ErrorCode::ConflictException => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ServiceQuotaExceededException => 429,
            ErrorCode::InternalError | ErrorCode::Unknown => 500,
            ErrorCode::ExecFailed
            | ErrorCode::LogsFailed
            | ErrorCode::FilesFailed
            | ErrorCode::ProcessesFailed => 502,
            ErrorCode::AccessDenied => 403,
            ErrorCode::LengthRequired => 411,
            ErrorCode::ServiceUnavailable => 503,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationException => "ValidationException",
            ErrorCode::UnauthorizedException => "UnauthorizedException",
            ErrorCode::ResourceNotFoundException => "ResourceNotFoundException",
            ErrorCode::UnknownOperation => "UnknownOperation",
            ErrorCode::ConflictException => "ConflictException",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::ServiceQuotaExceededException => "ServiceQuotaExceededException",
            ErrorCode::InternalError => "InternalError",
            ErrorCode::ExecFailed => "ExecFailed",
            ErrorCode::LogsFailed => "LogsFailed",
            ErrorCode::AccessDenied => "AccessDenied",
            ErrorCode::LengthRequired => "LengthRequired",
            ErrorCode::FilesFailed => "FilesFailed",
            ErrorCode::ProcessesFailed => "ProcessesFailed",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
            ErrorCode::Unknown => "Unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_their_names_on_the_wire() {
        let body = ErrorBody {
            code: ErrorCode::ConflictException,
            message: "m".into(),
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["code"], "ConflictException");
        assert_eq!(ErrorCode::ConflictException.as_str(), "ConflictException");
        let newer: ErrorBody =
            serde_json::from_str(r#"{"code":"SomethingNew","message":"x"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
    }
}
