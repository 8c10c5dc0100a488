//! `kiln proc …`: processes that run on in a microVM, through kilnd's processes API. `start`
//! follows the process's output to its exit (and exits with its code) unless `--detach`;
//! `attach` follows one started earlier, from any offset.

use std::io::{Read, Write};

use clap::{Args, Subcommand};
use kiln_client::api::{
    ListProcessesQuery, OutputStreamName, Process, StartProcessRequest, TerminalSize,
};
use kiln_client::{Client, ClientError, OutputItem};

use crate::remote::{print_json, Conn};

#[derive(Subcommand)]
pub enum ProcCommand {
    /// Start a process: `kiln proc start ID -- make -j2`, or `--shell 'make -j2 > log'`.
    Start(StartArgs),
    /// The processes started in a microVM (running and exited).
    Ls {
        id: String,
        /// Only running ones.
        #[arg(long, conflicts_with = "exited")]
        running: bool,
        /// Only exited ones.
        #[arg(long)]
        exited: bool,
        #[arg(long)]
        tag: Option<String>,
    },
    /// Follow a process's output to its exit (exits with its code).
    Attach {
        id: String,
        pid: u32,
        /// The output offset to start from (0: the oldest kept).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Wait for a process to exit and print it (exits with its code).
    Wait { id: String, pid: u32 },
    /// Send a signal to a process's group.
    Kill {
        id: String,
        pid: u32,
        /// A name (TERM, INT, KILL, HUP, …) or a number.
        #[arg(short, long, default_value = "TERM")]
        signal: String,
    },
    /// Send this command's stdin to a process's stdin.
    Stdin {
        id: String,
        pid: u32,
        /// Close the process's stdin after it.
        #[arg(long)]
        eof: bool,
    },
    /// Resize a process's terminal: `kiln proc resize ID PID 120x40`.
    Resize {
        id: String,
        pid: u32,
        #[arg(value_parser = parse_size)]
        size: TerminalSize,
    },
}

#[derive(Args)]
pub struct StartArgs {
    id: String,
    /// The program and its arguments (after `--`).
    #[arg(trailing_var_arg = true, conflicts_with = "shell")]
    command: Vec<String>,
    /// A line for /bin/sh -c instead of a command.
    #[arg(long)]
    shell: Option<String>,
    /// KEY=VALUE added to its environment (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    #[arg(long)]
    cwd: Option<String>,
    /// The guest user (name, uid or uid:gid).
    #[arg(long)]
    user: Option<String>,
    /// Run it on a terminal of this size (COLSxROWS).
    #[arg(long, value_parser = parse_size)]
    tty: Option<TerminalSize>,
    /// Forward this command's stdin to it (closed at its end).
    #[arg(long, short = 'i')]
    stdin: bool,
    #[arg(long)]
    tag: Option<String>,
    /// Print the process and return; it runs on.
    #[arg(long, short = 'd')]
    detach: bool,
}

fn parse_size(text: &str) -> Result<TerminalSize, String> {
    let (c, r) = text
        .split_once(['x', 'X'])
        .ok_or("a terminal size is COLSxROWS, like 120x40")?;
    let n = |s: &str| s.parse::<u16>().map_err(|e| format!("{s:?}: {e}"));
    let size = TerminalSize {
        cols: n(c)?,
        rows: n(r)?,
    };
    size.check()?;
    Ok(size)
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn client(conn: &Conn) -> Result<Client, ClientError> {
    Client::from_env(conn.endpoint.clone(), conn.api_key.clone())
}

pub fn run(conn: Conn, cmd: ProcCommand) -> i32 {
    match command(&conn, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

fn command(conn: &Conn, cmd: ProcCommand) -> Result<i32, ClientError> {
    let c = client(conn)?;
    match cmd {
        ProcCommand::Start(args) => start(conn, &c, args),
        ProcCommand::Ls {
            id,
            running,
            exited,
            tag,
        } => {
            let q = ListProcessesQuery {
                running: (running || exited).then_some(running),
                tag,
                ..Default::default()
            };
            let all = c.list_all_processes(&id, &q)?;
            show(conn, &all);
            Ok(0)
        }
        ProcCommand::Attach { id, pid, from } => follow(&c, &id, pid, from),
        ProcCommand::Wait { id, pid } => {
            let p = c.wait_process(&id, pid)?;
            show(conn, std::slice::from_ref(&p));
            Ok(exit_code(&p))
        }
        ProcCommand::Kill { id, pid, signal } => c.signal_process(&id, pid, &signal).map(|()| 0),
        ProcCommand::Stdin { id, pid, eof } => {
            forward_stdin(&c, &id, pid, eof)?;
            Ok(0)
        }
        ProcCommand::Resize { id, pid, size } => c.resize_process(&id, pid, size).map(|()| 0),
    }
}

fn start(conn: &Conn, c: &Client, args: StartArgs) -> Result<i32, ClientError> {
    let req = StartProcessRequest {
        command: (!args.command.is_empty()).then_some(args.command),
        shell: args.shell,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        user: args.user,
        pty: args.tty,
        stdin: args.stdin,
        tag: args.tag,
    };
    let p = c.start_process(&args.id, &req)?;
    if args.detach {
        if conn.json() {
            print_json(&p);
        } else {
            println!("{}", p.pid);
        }
        return Ok(0);
    }
    if args.stdin {
        let (c, id, pid) = (client(conn)?, args.id.clone(), p.pid);
        std::thread::spawn(move || {
            if let Err(e) = forward_stdin(&c, &id, pid, true) {
                eprintln!("kiln: stdin: {e}");
            }
        });
    }
    follow(c, &args.id, p.pid, 0)
}

/// Sends this process's stdin, in parts of at most 1 MiB.
fn forward_stdin(c: &Client, id: &str, pid: u32, eof: bool) -> Result<(), ClientError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = stdin.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return if eof {
                c.write_process_stdin(id, pid, &[], true)
            } else {
                Ok(())
            };
        }
        c.write_process_stdin(id, pid, &buf[..n], false)?;
    }
}

/// Copies the output to stdout and stderr until the exit; its exit code.
fn follow(c: &Client, id: &str, pid: u32, from: u64) -> Result<i32, ClientError> {
    for item in c.process_output(id, pid, from)? {
        match item? {
            OutputItem::Output { stream, data, .. } => {
                let _ = match stream {
                    OutputStreamName::Stdout => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&data).and_then(|()| out.flush())
                    }
                    OutputStreamName::Stderr => std::io::stderr().write_all(&data),
                };
            }
            OutputItem::Exit(p) => return Ok(exit_code(&p)),
        }
    }
    Err(ClientError::Api {
        status: 409,
        code: "OutputEnded".into(),
        message: format!("the output of process {pid} ended before its exit"),
    })
}

/// Its exit code, or 128 + the signal that ended it (as a shell reports it).
fn exit_code(p: &Process) -> i32 {
    p.exit_code
        .or(p.signal.map(|s| 128 + s))
        .unwrap_or(if p.running { 0 } else { 1 })
}

fn show(conn: &Conn, procs: &[Process]) {
    if conn.json() {
        return print_json(&procs);
    }
    println!(
        "{:>7}  {:<9}  {:>10}  {:<10}  COMMAND",
        "PID", "STATE", "OUTPUT", "TAG"
    );
    for p in procs {
        let state = match (p.running, p.exit_code, p.signal) {
            (true, _, _) => "running".to_string(),
            (false, Some(c), _) => format!("exit {c}"),
            (false, None, Some(s)) => format!("signal {s}"),
            _ => "exited".to_string(),
        };
        println!(
            "{:>7}  {:<9}  {:>10}  {:<10}  {}",
            p.pid,
            state,
            p.output_end,
            p.tag.as_deref().unwrap_or("-"),
            p.command.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_env_parse_with_clear_errors() {
        assert_eq!(
            parse_size("120x40"),
            Ok(TerminalSize {
                cols: 120,
                rows: 40
            })
        );
        assert!(parse_size("120").unwrap_err().contains("COLSxROWS"));
        assert!(parse_size("0x40").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("A").is_err());
    }
}
