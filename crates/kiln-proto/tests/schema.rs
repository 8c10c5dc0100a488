//! Schema snapshot: the encoding of one sample of every message and variant is stored in
//! `schema/gen-N.txt` for the current generation N. Changing any encoding without bumping
//! `GENERATION_CURRENT` fails here. To record a new generation: bump the constant, then run
//! this test once with `KILN_BLESS_SCHEMA=1` (it never overwrites an existing file).

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write;
use std::path::PathBuf;

use kiln_proto::frame::encode;
use kiln_proto::handshake::{Hello, HelloAck, HelloReply, ENTROPY_LEN};
use kiln_proto::*;
use serde::Serialize;
use serde_bytes::ByteBuf;

fn line<T: Serialize + std::fmt::Debug>(out: &mut String, since: u16, value: &T) {
    let name = format!("{value:?}");
    let name: String = name
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    assert!(
        since <= GENERATION_CURRENT,
        "{name} claims a future generation {since}"
    );
    let hex: String = encode(value)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    writeln!(
        out,
        "{} {name} since={since} {hex}",
        std::any::type_name::<T>().rsplit("::").next().unwrap()
    )
    .unwrap();
}

fn render() -> String {
    let mut out = String::new();
    let spec = ProcessSpec {
        argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec![("K".into(), "V".into())],
        cwd: Some("/tmp".into()),
        user: Some("1000:1000".into()),
    };
    let status = ExitStatus {
        code: Some(3),
        signal: None,
        timed_out: false,
    };
    let hello = Hello {
        nonce: 99,
        min_generation: 1,
        max_generation: 2,
        entropy: ByteBuf::from(vec![0xab; ENTROPY_LEN]),
        unix_time_secs: 1_700_000_000,
        unix_time_nanos: 5,
    };
    line(&mut out, 1, &hello);
    let ack = HelloAck {
        nonce: 99,
        generation: 1,
        agent_version: "0.1.0".into(),
        sessions: 2,
    };
    line(&mut out, 1, &HelloReply::Accept(ack));
    line(
        &mut out,
        1,
        &HelloReply::Reject {
            nonce: 99,
            agent_min: 1,
            agent_max: 1,
        },
    );
    let requests = [
        Request::Ping,
        Request::Exec(ExecRequest {
            process: spec.clone(),
            stdin: true,
            timeout_ms: Some(1500),
        }),
        Request::PutFile(PutFileRequest {
            path: "/a".into(),
            mode: 0o644,
            size: 3,
            create_parents: true,
        }),
        Request::GetFile(GetFileRequest {
            path: "/a".into(),
            max_bytes: 10,
        }),
        Request::Http(HttpRequest {
            port: 9000,
            method: "POST".into(),
            path: "/run".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: ByteBuf::from(b"{}".to_vec()),
            timeout_ms: 2000,
            max_response_bytes: 4096,
        }),
        Request::Connect { port: 8080 },
        Request::StartApp(spec.clone()),
        Request::AppStatus,
        Request::AppLogs { max_bytes: 100 },
        Request::Detach,
        Request::PutArchive(PutArchiveRequest {
            dest: "/app".into(),
            chown: Some("1000:1000".into()),
            chmod: Some(0o640),
            max_bytes: 1 << 20,
        }),
    ];
    let shell = Request::Shell(ShellRequest {
        process: spec.clone(),
        cols: 80,
        rows: 24,
    });
    let requests: Vec<Request> = requests
        .into_iter()
        .chain([shell, Request::DetachNic, Request::Stats])
        .chain(fs_requests())
        .chain(proc_requests(&spec))
        .collect();
    for r in &requests {
        line(&mut out, r.since(), r);
    }
    let host_frames = [
        HostFrame::Stdin(ByteBuf::from(b"in".to_vec())),
        HostFrame::StdinEof,
        HostFrame::Signal(15),
        HostFrame::Chunk(ByteBuf::from(vec![1, 2])),
        HostFrame::End,
        HostFrame::Resize {
            cols: 100,
            rows: 30,
        },
    ];
    for f in &host_frames {
        line(&mut out, f.since(), f);
    }
    let guest_frames = [
        GuestFrame::Ok,
        GuestFrame::Error(GuestError::new(ErrorKind::NotFound, "no such file")),
        GuestFrame::Pong(AgentInfo {
            version: "0.1.0".into(),
            generation: 1,
            uptime_ms: 42,
            sessions: 1,
        }),
        GuestFrame::Started { pid: 77 },
        GuestFrame::Stdout(ByteBuf::from(b"out".to_vec())),
        GuestFrame::Stderr(ByteBuf::from(b"err".to_vec())),
        GuestFrame::Exited(status),
        GuestFrame::FileMeta {
            size: 3,
            mode: 0o100644,
        },
        GuestFrame::Chunk(ByteBuf::from(vec![3])),
        GuestFrame::End,
        GuestFrame::Http(HttpResponse {
            status: 200,
            headers: vec![],
            body: ByteBuf::from(b"ok".to_vec()),
        }),
        GuestFrame::App(AppState {
            pid: Some(9),
            running: false,
            exit: Some(status),
        }),
        GuestFrame::Logs(ByteBuf::from(b"log".to_vec())),
        GuestFrame::Connected,
        GuestFrame::Stats(GuestStats {
            mem_total_kib: 500_000,
            mem_available_kib: 400_000,
            disk_total_bytes: 1 << 30,
            disk_free_bytes: 1 << 29,
        }),
    ];
    for f in guest_frames
        .iter()
        .chain(&fs_frames())
        .chain(&proc_frames())
    {
        line(&mut out, f.since(), f);
    }
    for kind in [
        ErrorKind::InvalidRequest,
        ErrorKind::NotFound,
        ErrorKind::PermissionDenied,
        ErrorKind::TooLarge,
        ErrorKind::Timeout,
        ErrorKind::Io,
        ErrorKind::Unsupported,
    ] {
        line(&mut out, 1, &kind);
    }
    line(&mut out, 5, &ErrorKind::Conflict);
    out
}

fn file_ref() -> FileRef {
    FileRef {
        path: "/a".into(),
        user: Some("app".into()),
    }
}

fn fs_requests() -> Vec<Request> {
    let ops = [
        FsOp::List {
            path: "/".into(),
            limit: 10,
        },
        FsOp::Stat { path: "/a".into() },
        FsOp::Mkdir {
            path: "/d".into(),
            mode: 0o755,
            parents: true,
        },
        FsOp::Remove {
            path: "/d".into(),
            recursive: true,
        },
        FsOp::Rename {
            from: "/a".into(),
            to: "/b".into(),
        },
    ];
    let mut out: Vec<Request> = ops
        .into_iter()
        .map(|op| Request::Fs(FsRequest { op, user: None }))
        .collect();
    out.extend([
        Request::ReadFile(file_ref()),
        Request::WriteFile(WriteFileRequest {
            file: file_ref(),
            mode: Some(0o600),
            size: 3,
            create_parents: false,
        }),
        Request::GetArchive(file_ref()),
        Request::UnpackArchive(UnpackRequest {
            dest: file_ref(),
            max_bytes: 1 << 20,
        }),
        Request::Watch(file_ref()),
    ]);
    out
}

fn fs_frames() -> Vec<GuestFrame> {
    let entry = FileEntry {
        name: "a".into(),
        path: "/a".into(),
        kind: FileKind::Symlink,
        size: 1,
        mode: 0o777,
        uid: 1000,
        gid: 1000,
        modified_ms: 1_700_000_000_000,
        link_target: Some("b".into()),
    };
    vec![
        GuestFrame::Entry(entry.clone()),
        GuestFrame::Entries(vec![entry]),
        GuestFrame::FsEvent(FsEvent {
            kind: FsEventKind::Delete,
            path: "/a".into(),
            is_dir: false,
        }),
    ]
}

fn proc_requests(spec: &ProcessSpec) -> Vec<Request> {
    let size = TermSize { cols: 80, rows: 24 };
    let ops = [
        ProcOp::Stdin(ByteBuf::from(b"in".to_vec())),
        ProcOp::CloseStdin,
        ProcOp::Signal(15),
        ProcOp::Resize(size),
    ];
    let mut out = vec![
        Request::ProcStart(ProcStartRequest {
            process: spec.clone(),
            pty: Some(size),
            stdin: true,
            tag: Some("build".into()),
        }),
        Request::ProcList,
        Request::ProcAttach(ProcAttachRequest { pid: 42, from: 7 }),
        Request::ProcWait(ProcWaitRequest {
            pid: 42,
            timeout_ms: 1000,
        }),
    ];
    out.extend(
        ops.into_iter()
            .map(|op| Request::ProcControl(ProcControlRequest { pid: 42, op })),
    );
    out
}

fn proc_frames() -> Vec<GuestFrame> {
    let info = ProcInfo {
        pid: 42,
        argv: vec!["sh".into()],
        cwd: Some("/".into()),
        user: None,
        tag: Some("t".into()),
        pty: Some(TermSize { cols: 80, rows: 24 }),
        stdin_open: true,
        started_ms: 1_700_000_000_000,
        exit: Some(ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: false,
        }),
        output_start: 1,
        output_end: 9,
    };
    vec![
        GuestFrame::Process(info.clone()),
        GuestFrame::Processes(vec![info]),
        GuestFrame::Output(ProcOutput {
            stream: OutputStream::Stderr,
            offset: 3,
            data: ByteBuf::from(b"err".to_vec()),
        }),
    ]
}

#[test]
fn wire_format_matches_the_snapshot_of_the_current_generation() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("schema/gen-{GENERATION_CURRENT}.txt"));
    let current = render();
    match std::fs::read_to_string(&path) {
        Ok(stored) => assert!(
            stored == current,
            "The wire format changed but GENERATION_CURRENT is still {GENERATION_CURRENT}.\n\
             Bump it, tag new variants with the new generation, and record the snapshot with \
             KILN_BLESS_SCHEMA=1.\n--- stored\n{stored}\n--- now\n{current}"
        ),
        Err(_) if std::env::var_os("KILN_BLESS_SCHEMA").is_some() => {
            std::fs::write(&path, &current).unwrap();
        }
        Err(e) => panic!(
            "No schema snapshot at {}: {e}. Record one with KILN_BLESS_SCHEMA=1.",
            path.display()
        ),
    }
}
