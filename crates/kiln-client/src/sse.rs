//! A reader of server-sent events (the `text/event-stream` format of the HTML standard), as
//! kilnd's streams (WatchFiles, ProcessOutput) send them.

use std::io::{BufRead, BufReader, Read};

/// One event: its name (`message` when the stream gave none), its data lines joined with
/// `\n`, and the last id the stream gave, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Reads events off a response body.
pub(crate) struct SseReader {
    lines: BufReader<Box<dyn Read + Send + Sync>>,
    id: Option<String>,
}

impl SseReader {
    pub fn new(body: Box<dyn Read + Send + Sync>) -> Self {
        SseReader {
            lines: BufReader::new(body),
            id: None,
        }
    }

    /// The next event, or `None` once the stream ended (or broke off: an event cut short is
    /// dropped, as the standard says).
    pub fn next_event(&mut self) -> Option<SseEvent> {
        let mut event = None;
        let mut data: Option<String> = None;
        let mut line = String::new();
        loop {
            line.clear();
            match self.lines.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let text = line.trim_end_matches(['\r', '\n']);
            if text.is_empty() {
                if let Some(data) = data.take() {
                    return Some(SseEvent {
                        event: event.unwrap_or_else(|| "message".to_string()),
                        data,
                        id: self.id.clone(),
                    });
                }
                event = None;
                continue;
            }
            let (field, value) = match text.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (text, ""),
            };
            match field {
                "" => {} // a comment (keep-alive)
                "event" => event = Some(value.to_string()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                "id" if !value.contains('\0') => self.id = Some(value.to_string()),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &'static str) -> Vec<SseEvent> {
        let mut r = SseReader::new(Box::new(text.as_bytes()));
        std::iter::from_fn(|| r.next_event()).collect()
    }

    #[test]
    fn events_are_read_whole_with_their_name_and_the_last_id() {
        let got = events(
            ": keep-alive\n\nevent: output\nid: 9\ndata: {\"a\":1}\n\r\n\
             data: one\ndata:two\n\nevent: exit\ndata: done\n\nevent: cut\ndata: short",
        );
        let ev = |event: &str, data: &str, id: Option<&str>| SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.map(str::to_string),
        };
        assert_eq!(
            got,
            vec![
                ev("output", "{\"a\":1}", Some("9")),
                ev("message", "one\ntwo", Some("9")),
                ev("exit", "done", Some("9")),
            ]
        );
    }
}
