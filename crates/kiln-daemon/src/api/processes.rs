//! The processes API: programs started in a RUNNING microVM that the guest agent keeps
//! (protocol generation 6). They run on with no client attached, and across suspend and
//! resume; their output is kept in the guest (the newest 1 MiB each) and streamed as
//! server-sent events from any offset, so a client that lost its stream resumes where it
//! left off.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use http_body_util::BodyExt;
use kiln_api::process::{parse_signal, MAX_STDIN_BYTES};
use kiln_api::{
    ErrorBody, ErrorCode, GetProcessQuery, ListProcessesQuery, OutputStreamName, Process,
    ProcessList, ProcessOutputEvent, ProcessOutputQuery, ProcessOutputSse, SignalProcessRequest,
    StartProcessRequest, TerminalSize, WriteStdinQuery, MAX_WAIT_SECONDS,
};
use kiln_proto::{OutputStream, ProcInfo, ProcOp, ProcStartRequest, ProcessSpec, TermSize};
use kiln_vmm::agent_procs::{ProcEvent, PROCESSES_GENERATION};
use kiln_vmm::{AgentClient, AgentError};
use tokio::sync::mpsc;

use super::{ApiJson, ApiPath, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::files::{agent_of_generation, guest_error, Busy, Channel};
use crate::manager::Manager;

/// Raw stdin bytes, for the spec.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct StdinBytes(#[allow(dead_code)] Vec<u8>);

fn agent(m: &Manager, id: &str) -> ApiResult<AgentClient> {
    agent_of_generation(m, id, "the processes API", PROCESSES_GENERATION)
}

fn error(e: AgentError) -> ApiError {
    match &e {
        AgentError::Guest(g) if g.kind == kiln_proto::ErrorKind::TooLarge => {
            ApiError::quota(format!("in the guest: {}", g.message))
        }
        _ => guest_error(e, ErrorCode::ProcessesFailed),
    }
}

pub fn process_view(p: ProcInfo) -> Process {
    Process {
        pid: p.pid,
        command: p.argv,
        cwd: p.cwd,
        user: p.user,
        tag: p.tag,
        pty: p.pty.map(|s| TerminalSize {
            cols: s.cols,
            rows: s.rows,
        }),
        running: p.exit.is_none(),
        stdin_open: p.stdin_open,
        started_ms: p.started_ms,
        exit_code: p.exit.and_then(|e| e.code),
        signal: p.exit.and_then(|e| e.signal),
        output_start: p.output_start,
        output_end: p.output_end,
    }
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/processes", operation_id = "StartProcess", tag = "processes", security(("bearer" = [])),
    description = "Starts a process that runs on its own: on pipes or on a pseudo-terminal, \
        as a guest user, in a directory, with added environment. It keeps running with no \
        client attached and across suspend and resume; follow it with ProcessOutput, wait \
        with GetProcess. Starting one is activity. A microVM keeps 128 processes (running or \
        exited); the oldest exited one makes room for a new one.",
    params(("id" = String, Path, description = "The microVM's id")),
    request_body = StartProcessRequest,
    responses(
        (status = 201, description = "It started", body = Process),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM, program or working directory", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 413, description = "A body over 1 MiB", body = ErrorBody),
        (status = 429, description = "128 processes are running", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn start_process(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<StartProcessRequest>,
) -> ApiResult<Response> {
    let argv = req.argv().map_err(ApiError::bad_request)?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    let start = ProcStartRequest {
        process: ProcessSpec {
            argv,
            env: req.env.into_iter().collect(),
            cwd: req.cwd,
            user: req.user,
        },
        pty: req.pty.map(|s| TermSize {
            cols: s.cols,
            rows: s.rows,
        }),
        stdin: req.stdin,
        tag: req.tag,
    };
    let info = agent.start_tracked(start).await.map_err(error)?;
    tracing::info!(microvm = %id, pid = info.pid, "process started");
    Ok((StatusCode::CREATED, Json(process_view(info))).into_response())
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/processes", operation_id = "ListProcesses", tag = "processes", security(("bearer" = [])),
    description = "The processes started through this API that the guest still keeps, by pid.",
    params(("id" = String, Path, description = "The microVM's id"), ListProcessesQuery),
    responses(
        (status = 200, description = "The processes", body = ProcessList),
        (status = 400, description = "A malformed filter, limit or cursor", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn list_processes(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ListProcessesQuery>,
) -> ApiResult<Json<ProcessList>> {
    kiln_api::process::check_tag(q.tag.as_deref()).map_err(ApiError::bad_request)?;
    let agent = agent(&m, &id)?;
    let all = agent.list_processes().await.map_err(error)?;
    let wanted: Vec<Process> = all
        .into_iter()
        .map(process_view)
        .filter(|p| q.running.is_none_or(|r| p.running == r))
        .filter(|p| q.tag.is_none() || p.tag == q.tag)
        .collect();
    let key = |p: &Process| format!("{:010}", p.pid);
    let (processes, next_cursor) = super::list::page(wanted, key, q.limit, q.cursor.as_deref())?;
    Ok(Json(ProcessList {
        processes,
        next_cursor,
    }))
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/processes/{pid}", operation_id = "GetProcess", tag = "processes", security(("bearer" = [])),
    description = "One process; with `waitSeconds`, once it exited or when they passed.",
    params(("id" = String, Path, description = "The microVM's id"), ("pid" = u32, Path, description = "The process's pid"), GetProcessQuery),
    responses(
        (status = 200, description = "The process", body = Process),
        (status = 400, description = "A wait over 300 seconds", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM or process", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn get_process(
    State(m): State<Arc<Manager>>,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiQuery(q): ApiQuery<GetProcessQuery>,
) -> ApiResult<Json<Process>> {
    let wait = q.wait_seconds.unwrap_or(0);
    if wait > MAX_WAIT_SECONDS {
        return Err(ApiError::bad_request(format!(
            "waitSeconds {wait} is over {MAX_WAIT_SECONDS}: wait again after it answers"
        )));
    }
    let agent = agent(&m, &id)?;
    let info = agent
        .process(pid, Duration::from_secs(wait))
        .await
        .map_err(error)?;
    Ok(Json(process_view(info)))
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/processes/{pid}/output", operation_id = "ProcessOutput", tag = "processes", security(("bearer" = [])),
    description = "A process's output as server-sent events, from offset `from` (or the SSE \
        `Last-Event-ID`) on: `output` events (a ProcessOutputEvent; the event id is the \
        offset after it), then one `exit` event with the Process once it exited and all its \
        output was sent. Output older than the newest 1 MiB is gone: the first event's offset \
        says where it resumes. A suspend or stop ends the stream with an `error` event; after \
        a resume, open it again from the last id. An open stream is activity: it keeps the \
        microVM from idling. At most 32 open per microVM.",
    params(("id" = String, Path, description = "The microVM's id"), ("pid" = u32, Path, description = "The process's pid"), ProcessOutputQuery),
    responses(
        (status = 200, description = "The event stream", body = ProcessOutputSse, content_type = "text/event-stream"),
        (status = 400, description = "A malformed offset", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM or process", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 429, description = "It already has 32 open output streams", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn process_output(
    State(m): State<Arc<Manager>>,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiQuery(q): ApiQuery<ProcessOutputQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let resume = super::last_event_id::<u64>(&headers, "an output offset kilnd gave out")?;
    let from = resume.or(q.from).unwrap_or(0);
    let agent = agent(&m, &id)?;
    let slot = m.output_streams.take(&id)?;
    let mut attached = agent.attach_process(pid, from).await.map_err(error)?;
    let busy = (Busy::new(&m, &id), slot);
    let (tx, rx) = mpsc::channel::<Result<Event, std::convert::Infallible>>(16);
    tokio::spawn(async move {
        let _busy = busy;
        loop {
            let next = tokio::select! {
                next = attached.next() => next,
                () = tx.closed() => break,
            };
            let event = match next {
                Ok(Some(ProcEvent::Output(out))) => output_event(out),
                Ok(Some(ProcEvent::Exited(_))) => {
                    let info = agent.process(pid, Duration::ZERO).await;
                    let data = info.map(process_view).map_err(|e| error(e).message);
                    let ev = match data {
                        Ok(p) => Event::default().event("exit").json_data(p),
                        Err(why) => Ok(Event::default().event("error").data(why)),
                    };
                    let _ = tx.send(Ok(ev.unwrap_or_default())).await;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    let why = format!(
                        "the output stream ended: {} (a suspend or stop ends it; after a \
                         resume, open it again from the last event id)",
                        crate::manager::error_chain(&e)
                    );
                    let _ = tx.send(Ok(Event::default().event("error").data(why))).await;
                    break;
                }
            };
            if tx.send(Ok(event)).await.is_err() {
                break;
            }
        }
    });
    Ok(Sse::new(Channel(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn output_event(out: kiln_proto::ProcOutput) -> Event {
    let end = out.offset + out.data.len() as u64;
    let view = ProcessOutputEvent {
        stream: match out.stream {
            OutputStream::Stdout => OutputStreamName::Stdout,
            OutputStream::Stderr => OutputStreamName::Stderr,
        },
        offset: out.offset,
        data: base64::engine::general_purpose::STANDARD.encode(&out.data),
    };
    Event::default()
        .event("output")
        .id(end.to_string())
        .json_data(view)
        .unwrap_or_default()
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/processes/{pid}/stdin", operation_id = "WriteProcessStdin", tag = "processes", security(("bearer" = [])),
    description = "Writes the body (at most 1 MiB) to a process's stdin or terminal; with \
        `eof=true`, then closes stdin (a terminal gets ^D). Answers once the guest took the \
        bytes.",
    params(("id" = String, Path, description = "The microVM's id"), ("pid" = u32, Path, description = "The process's pid"), WriteStdinQuery),
    request_body(content = StdinBytes, content_type = "application/octet-stream", description = "The bytes; none to only close stdin (with `eof=true`)"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "A malformed query or a body that broke off", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM or process", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, the process exited, or its stdin is closed", body = ErrorBody),
        (status = 413, description = "Over 1 MiB", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn write_process_stdin(
    State(m): State<Arc<Manager>>,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiQuery(q): ApiQuery<WriteStdinQuery>,
    mut body: Body,
) -> ApiResult<StatusCode> {
    let agent = agent(&m, &id)?;
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if let Some(chunk) = frame.data_ref() {
            if data.len() + chunk.len() > MAX_STDIN_BYTES {
                super::linger(&mut body).await;
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("stdin writes are at most {MAX_STDIN_BYTES} bytes: send it in parts"),
                ));
            }
            data.extend_from_slice(chunk);
        }
    }
    m.record_activity(&id);
    if !data.is_empty() {
        let op = ProcOp::Stdin(serde_bytes::ByteBuf::from(data));
        agent.control_process(pid, op).await.map_err(error)?;
    }
    if q.eof == Some(true) {
        agent
            .control_process(pid, ProcOp::CloseStdin)
            .await
            .map_err(error)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/processes/{pid}/signal", operation_id = "SignalProcess", tag = "processes", security(("bearer" = [])),
    description = "Sends a signal to a process's process group (its children too).",
    params(("id" = String, Path, description = "The microVM's id"), ("pid" = u32, Path, description = "The process's pid")),
    request_body = SignalProcessRequest,
    responses(
        (status = 204, description = "Sent"),
        (status = 400, description = "An unknown signal", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM or process", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, or the process exited", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn signal_process(
    State(m): State<Arc<Manager>>,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiJson(req): ApiJson<SignalProcessRequest>,
) -> ApiResult<StatusCode> {
    let signal = parse_signal(&req.signal).map_err(ApiError::bad_request)?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    agent
        .control_process(pid, ProcOp::Signal(signal))
        .await
        .map_err(error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/processes/{pid}/resize", operation_id = "ResizeProcess", tag = "processes", security(("bearer" = [])),
    description = "Resizes a process's terminal (its foreground programs get SIGWINCH).",
    params(("id" = String, Path, description = "The microVM's id"), ("pid" = u32, Path, description = "The process's pid")),
    request_body = TerminalSize,
    responses(
        (status = 204, description = "Resized"),
        (status = 400, description = "A size out of range, or the process has no terminal", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM or process", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, or the process exited", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn resize_process(
    State(m): State<Arc<Manager>>,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiJson(size): ApiJson<TerminalSize>,
) -> ApiResult<StatusCode> {
    size.check().map_err(ApiError::bad_request)?;
    let agent = agent(&m, &id)?;
    let op = ProcOp::Resize(TermSize {
        cols: size.cols,
        rows: size.rows,
    });
    agent.control_process(pid, op).await.map_err(error)?;
    Ok(StatusCode::NO_CONTENT)
}
