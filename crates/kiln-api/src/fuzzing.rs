//! Entry point of the `rest_body` fuzz target (`fuzz/`) and of the corpus replay test: a
//! client's JSON body read as every request type kilnd takes. None may panic, and whatever is
//! accepted reads back the same after it is written (what `buildRequest` relies on).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    CreateImageRequest, CreateTokenRequest, ExecRequest, RunMicrovmRequest, SignalProcessRequest,
    StartProcessRequest, TerminalSize,
};

fn round_trips<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(data) {
        // INVARIANT: a value that was read can be written, and reads back the same.
        #[allow(clippy::expect_used)]
        let written = serde_json::to_vec(&value).expect("an accepted request serializes");
        #[allow(clippy::expect_used)]
        let again: T = serde_json::from_slice(&written).expect("and reads back");
        assert_eq!(again, value, "a request changed on a round trip");
    }
}

/// A request body as each request type.
pub fn rest_body(data: &[u8]) {
    round_trips::<CreateImageRequest>(data);
    round_trips::<RunMicrovmRequest>(data);
    round_trips::<ExecRequest>(data);
    round_trips::<CreateTokenRequest>(data);
    round_trips::<StartProcessRequest>(data);
    round_trips::<SignalProcessRequest>(data);
    round_trips::<TerminalSize>(data);
    // Validation of an accepted request never panics either.
    if let Ok(req) = serde_json::from_slice::<StartProcessRequest>(data) {
        let _ = req.argv();
    }
}
