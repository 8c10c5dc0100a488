//! API errors: a stable code (kiln-api's [`ErrorCode`], which fixes the HTTP status) and a
//! message that says what was wrong and what to do.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{ErrorBody, ErrorCode};

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ValidationException, message)
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            ErrorCode::ResourceNotFoundException,
            format!("{what} {id:?} does not exist"),
        )
    }
    /// A kilnd quota is reached (429): the message names it and the flag that raises it.
    pub fn quota(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ServiceQuotaExceededException, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ConflictException, message)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InternalError, e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            code: self.code,
            message: self.message,
        };
        (status, Json(body)).into_response()
    }
}

impl From<kiln_store::StoreError> for ApiError {
    fn from(e: kiln_store::StoreError) -> Self {
        use kiln_store::StoreError;
        match e {
            // Another transition won the race: the caller sees where the microVM is now.
            StoreError::Transition { .. } => ApiError::conflict(e.to_string()),
            StoreError::NoSuchMicrovm(id) => ApiError::not_found("microVM", &id),
            e @ StoreError::NodeFull { .. } => ApiError::quota(format!(
                "{e}: terminate some, or give the node more with kilnd --capacity-memory-mib"
            )),
            e if e.is_unavailable() => ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "the database is unreachable ({}); nothing was changed: retry once it is back",
                    kiln_vmm::error_chain(&e)
                ),
            ),
            e => ApiError::internal(format!("database: {}", kiln_vmm::error_chain(&e))),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
