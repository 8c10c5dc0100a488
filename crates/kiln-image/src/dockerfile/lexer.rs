//! Physical lines → logical lines: parser directives, comments, continuations.

use super::ParseError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalLine {
    /// 1-based number of the line the instruction starts on.
    pub line: usize,
    pub keyword: String,
    pub args: String,
    /// Keyword and arguments as one line, continuations joined.
    pub text: String,
    pub escape: char,
}

pub fn logical_lines(text: &str) -> Result<Vec<LogicalLine>, ParseError> {
    let mut escape = '\\';
    let mut in_directives = true;
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let trimmed = line.trim_start();
        if in_directives {
            if let Some((key, value)) = directive(trimmed) {
                // `syntax` and unknown directives are ignored, as Docker does.
                if key == "escape" {
                    escape = match value.as_str() {
                        "\\" => '\\',
                        "`" => '`',
                        other => {
                            return Err(ParseError::new(
                                number,
                                format!("escape directive must be \\ or `, not {other:?}"),
                            ))
                        }
                    };
                }
                continue;
            }
            in_directives = false;
        }
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_some()) {
            continue; // comments, and empty lines inside a continuation
        }
        if trimmed.is_empty() {
            continue;
        }
        let body = line.trim_end();
        let (continues, content) = match body.strip_suffix(escape) {
            Some(rest) => (true, rest),
            None => (false, body),
        };
        let (start, mut joined) = current.take().unwrap_or((number, String::new()));
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(content.trim());
        if continues {
            current = Some((start, joined));
        } else {
            out.push(split_keyword(start, joined, escape)?);
        }
    }
    if let Some((start, joined)) = current {
        // A trailing continuation ends the instruction at end of file, like Docker.
        out.push(split_keyword(start, joined, escape)?);
    }
    Ok(out)
}

fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix('#')?.trim();
    let (key, value) = rest.split_once('=')?;
    let key = key.trim().to_ascii_lowercase();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((key, value.trim().to_string()))
}

fn split_keyword(line: usize, text: String, escape: char) -> Result<LogicalLine, ParseError> {
    let trimmed = text.trim();
    let (keyword, args) = match trimmed.find(char::is_whitespace) {
        Some(i) => (&trimmed[..i], trimmed[i..].trim()),
        None => (trimmed, ""),
    };
    if !keyword.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(ParseError::new(
            line,
            format!("{keyword:?} is not an instruction"),
        ));
    }
    Ok(LogicalLine {
        line,
        keyword: keyword.to_ascii_uppercase(),
        args: args.to_string(),
        text: trimmed.to_string(),
        escape,
    })
}
