//! Word splitting with quotes, JSON (exec) form, and variable substitution.

/// Splits on whitespace, honouring "double" and 'single' quotes and the escape character.
pub fn split_words(s: &str, escape: char) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c == escape => {
                in_word = true;
                match chars.next() {
                    Some(n) => word.push(n),
                    None => word.push(c),
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(e) if e == escape => match chars.next() {
                            Some(n) if n == '"' || n == escape || n == '$' => word.push(n),
                            Some(n) => {
                                word.push(e);
                                word.push(n);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(other) => word.push(other),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(other) => word.push(other),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The exec (JSON array) form, if `s` is one.
pub fn json_array(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    if !s.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(s).ok()
}

/// Most bytes one word may expand to: `ENV A=$A$A` doubles per line, and 30 such lines
/// would ask for 16 GiB.
pub const MAX_EXPANDED_BYTES: usize = 64 * 1024;

/// Replaces `$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME:+alternative}`; `\$` is a
/// literal dollar. Unknown names become empty, as in Docker. A word that would expand past
/// [`MAX_EXPANDED_BYTES`] is refused.
pub fn substitute(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if out.len() > MAX_EXPANDED_BYTES {
            return Err(too_long());
        }
        if c == '\\' && chars.peek() == Some(&'$') {
            out.push('$');
            chars.next();
            continue;
        }
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('{') => {
                chars.next();
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => inner.push(ch),
                        None => return Err(format!("unterminated ${{ in {text:?}")),
                    }
                }
                let (name, op, word) = match inner.find(":-").or_else(|| inner.find(":+")) {
                    Some(i) => (&inner[..i], &inner[i..i + 2], &inner[i + 2..]),
                    None => (inner.as_str(), "", ""),
                };
                if !valid_name(name) {
                    return Err(format!("bad variable name {name:?} in {text:?}"));
                }
                let value = lookup(name).filter(|v| !v.is_empty());
                match (op, value) {
                    ("", v) => out.push_str(&v.unwrap_or_default()),
                    (":-", Some(v)) => out.push_str(&v),
                    (":-", None) => out.push_str(&substitute(word, lookup)?),
                    (":+", Some(_)) => out.push_str(&substitute(word, lookup)?),
                    _ => {}
                }
            }
            Some(ch) if ch.is_ascii_alphabetic() || *ch == '_' => {
                let mut name = String::new();
                while let Some(ch) = chars.peek() {
                    if ch.is_ascii_alphanumeric() || *ch == '_' {
                        name.push(*ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(&lookup(&name).unwrap_or_default());
            }
            _ => out.push('$'),
        }
    }
    if out.len() > MAX_EXPANDED_BYTES {
        return Err(too_long());
    }
    Ok(out)
}

fn too_long() -> String {
    format!(
        "a word expands to over {MAX_EXPANDED_BYTES} bytes after variable substitution (the \
         limit); shorten the variables it uses"
    )
}

pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `key=value` pairs (ENV, LABEL, ARG); the legacy `ENV key value` form when allowed.
pub fn key_values(
    args: &str,
    escape: char,
    legacy_space_form: bool,
) -> Result<Vec<(String, String)>, String> {
    let words = split_words(args, escape)?;
    if words.is_empty() {
        return Err("expected key=value".into());
    }
    if legacy_space_form && !words[0].contains('=') {
        let (key, value) = args
            .trim()
            .split_once(char::is_whitespace)
            .ok_or("expected a value after the name")?;
        let value = split_words(value, escape)?.join(" ");
        return Ok(vec![(key.to_string(), value)]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{w:?} is not key=value")),
        })
        .collect()
}
