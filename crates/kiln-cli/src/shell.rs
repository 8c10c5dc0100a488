//! `kiln shell <microvmId>`: an interactive terminal in a microVM through the ingress (a
//! shell token and the `/.kiln/shell` WebSocket). Raw mode when stdin is a terminal; with
//! piped stdin it sends the input and exits with the shell's exit code.

use std::io::{IsTerminal, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kiln_client::api::{CreateTokenRequest, TokenKind};
use kiln_client::{Client, ClientError};

fn ws_send(s: &mut TcpStream, opcode: u8, data: &[u8]) -> std::io::Result<()> {
    let mask: [u8; 4] = rand_mask();
    let mut f = vec![0x80 | opcode];
    match data.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f)
}

fn rand_mask() -> [u8; 4] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7);
    nanos.to_le_bytes()
}

fn ws_read(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head)?;
    let mut len = (head[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    if len > 1 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok((head[0] & 0x0f, payload))
}

/// Restores the terminal mode when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enable() -> RawMode {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = nix::sys::termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

fn terminal_size() -> (u16, u16) {
    let stdout = std::io::stdout();
    let mut ws = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    if stdout.is_terminal() {
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCGWINSZ writes one winsize struct, which lives for the call.
        unsafe { libc::ioctl(stdout.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    }
    (ws.ws_col.max(1), ws.ws_row.max(1))
}

pub fn run(client: &Client, id: &str, ingress: &str) -> Result<i32, ClientError> {
    let token = client
        .create_token(&CreateTokenRequest {
            microvm_identifier: id.to_string(),
            expiration_in_minutes: 60,
            allowed_ports: Vec::new(),
            kind: Some(TokenKind::Shell),
        })?
        .auth_token
        .kiln_auth;
    let unreachable = |e: std::io::Error| ClientError::Unreachable {
        endpoint: ingress.to_string(),
        detail: e.to_string(),
    };
    let mut s = TcpStream::connect(ingress).map_err(unreachable)?;
    let (cols, rows) = terminal_size();
    write!(
        s,
        // Path style: it names the microVM whatever the ingress domain is.
        "GET /m/{id}/.kiln/shell?cols={cols}&rows={rows} HTTP/1.1\r\nHost: {ingress}\r\nX-Kiln-Auth: {token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: a2lsbi1zaGVsbC1rZXkhIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut reader = std::io::BufReader::new(s.try_clone().map_err(unreachable)?);
    let mut status = String::new();
    std::io::BufRead::read_line(&mut reader, &mut status).map_err(unreachable)?;
    if !status.contains(" 101 ") {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest);
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(502);
        return Err(ClientError::Api {
            status: code,
            code: "ShellRefused".into(),
            message: rest.lines().last().unwrap_or("").to_string(),
        });
    }
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).map_err(unreachable)?;
        if line.trim().is_empty() {
            break;
        }
    }
    let _raw = RawMode::enable();
    let mut writer = s.try_clone().map_err(unreachable)?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // Piped input ended: let the shell finish what it was given.
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
                Ok(n) => {
                    if ws_send(&mut writer, 2, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = std::io::stdout();
    loop {
        match ws_read(&mut reader) {
            Ok((2, data)) => {
                let _ = stdout.write_all(&data);
                let _ = stdout.flush();
            }
            Ok((1, text)) => {
                let v: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
                if v["type"] == "exit" {
                    return Ok(v["code"].as_i64().unwrap_or(1) as i32);
                }
            }
            Ok((8, _)) | Err(_) => return Ok(1),
            Ok(_) => {}
        }
    }
}
